"""The speed wing (lmtrain.fast) on the CPU: each piece equals the plain path it replaces, and each trains."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmtrain import config, fast
from lmtrain.config import check_machine, validate
from lmtrain.errors import UserError
from lmtrain.fast.attention import FusedQKNormRopeAttention, fused_qk_norm_rope, use_fused_qk_norm_rope
from lmtrain.fast.compile import compile_blocks
from lmtrain.fast.cuda_graphs import GraphedDecoder, use_decode_graphs
from lmtrain.fast.head_loss import chunked_linear_cross_entropy, fused_linear_cross_entropy, head_loss
from lmtrain.fast.mlp import ReLUSquaredMLP, use_fused_mlp
from lmtrain.fast.residual import use_low_precision_residual
from lmtrain.fast.training import FastTraining
from lmtrain.fast.weight_copies import WeightCopies
from lmtrain.model import GPT, GPTConfig, rotary_tables
from lmtrain.train import train

from .conftest import SHAKESPEARE, compose, run_cli


@pytest.fixture
def kernel_device():
    """Tensors made in the test on the GPU where there is one (Triton runs there), else on the CPU, where the
    kernels run in Triton's interpreter. fp32 matmuls in full precision (no TF32 left by a training test)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize(
    "option",
    [
        "model.rope=true",
        "model.qk_norm=true",
        "model.mlp=relu2",
        "model.mlp=gelu_tanh",
        "model.norm=rms",
        "model.zero_init_proj=true",
        "fast.low_precision_residual=true",
        "fast.fused_mlp=true model.mlp=relu2",
        "fast.fused_qk_norm_rope=true model.rope=true model.qk_norm=true",
        "fast.decode_graphs=true",
        "optim=muon",
        "optim.fused=true",
        "optim.fused=false",
        "fast.loss=chunked fast.loss_chunk_rows=96",
        "trainer.matmul_precision=high",
        "trainer.eval_batches=null",
        "fast.compile=true",
        "fast.compile=true fast.compile_scope=blocks",
    ],
)
def test_each_option_composes_and_trains_the_smoke_experiment(tmp_path, option):
    text = tmp_path / "shakespeare_60k.txt"  # small enough for a full evaluation pass over both splits
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    cfg = compose(
        "experiment=smoke",
        "data=text",
        f"data.path={text}",
        f"output_dir={tmp_path}",
        "trainer.max_steps=40",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        *option.split(),
    )
    best = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 40
    # 65 characters: the untrained loss is ~ln 65 = 4.17; every option must learn something in 40 steps
    assert math.isfinite(best) and best < 3.6


def test_chunked_head_loss_equals_cross_entropy_in_values_and_gradients():
    torch.manual_seed(0)
    vocab, padded = 100, 128
    hidden = torch.randn(70, 16, requires_grad=True)
    weight = torch.randn(padded, 16, requires_grad=True)
    targets = torch.randint(vocab, (70,))
    expected = F.cross_entropy(hidden @ weight[:vocab].T, targets)
    expected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = chunked_linear_cross_entropy(hidden, weight, targets, vocab, 32)  # 70 rows: chunks of 32, 32, 6
    (2 * loss).backward()  # the incoming gradient is honoured
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(hidden.grad, 2 * grads[0], atol=1e-6) and torch.allclose(weight.grad, 2 * grads[1], atol=1e-6)
    assert weight.grad[vocab:].abs().sum() == 0  # the padding rows are never predicted


def test_the_chunked_head_loss_of_a_model_equals_its_plain_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    idx = torch.randint(65, (3, 17))
    full = model.loss(idx[:, :-1], idx[:, 1:])
    chunked = head_loss(model, "chunked", 20)(idx[:, :-1], idx[:, 1:])
    assert torch.allclose(full, chunked, atol=1e-6)
    assert head_loss(model, "plain", 20) == model.loss


def test_compiled_blocks_share_one_graph_and_train_as_the_eager_model():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.0, rope=True)
    eager, compiled = GPT(config), GPT(config)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, None)
    idx = torch.randint(65, (3, 17))
    for model in (eager, compiled):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # three layers, one graph
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are alike
    compiled.eval()  # evaluation and generation run the eager blocks: nothing more is compiled
    compiled.loss(idx[:, :-1], idx[:, 1:])
    compiled.generate(idx[:, :4], 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "block, spike",
    [
        (None, False),
        (32, False),  # a row in four blocks, the last one part padding
        (32, True),  # a column of the third block far above the first block's logits: its rows are rescaled
    ],
)
def test_fused_head_loss_equals_cross_entropy_in_values_and_gradients(dtype, block, spike, monkeypatch, kernel_device):
    pytest.importorskip("triton")  # in the dev extra; without a GPU the kernel runs in Triton's interpreter
    if block:
        from lmtrain.fast import triton_kernels

        monkeypatch.setattr(triton_kernels, "BLOCK", block)
    torch.manual_seed(0)
    vocab, padded = 100, 128
    hidden = torch.randn(70, 16, dtype=dtype)
    weight = torch.randn(padded, 16, dtype=dtype)
    targets = torch.randint(vocab, (70,))
    if spike:
        weight[90] *= 10
        targets[::3] = 90
    hidden.requires_grad_(), weight.requires_grad_()
    expected = F.cross_entropy((hidden @ weight[:vocab].T).float(), targets)
    expected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    loss = fused_linear_cross_entropy(hidden, weight, targets, vocab)
    (2 * loss).backward()  # the incoming gradient is honoured
    tolerance = 1e-6 if dtype == torch.float32 else 1e-3
    assert torch.allclose(loss, expected, atol=tolerance)
    assert torch.allclose(hidden.grad.float(), 2 * grads[0].float(), atol=tolerance)
    assert torch.allclose(weight.grad.float(), 2 * grads[1].float(), atol=tolerance)
    assert weight.grad[vocab:].abs().sum() == 0  # the padding rows are never predicted
    with torch.no_grad():  # evaluation: the loss alone
        assert torch.allclose(fused_linear_cross_entropy(hidden, weight, targets, vocab), expected, atol=tolerance)


@pytest.mark.parametrize("qk_norm, rope", [(True, True), (True, False), (False, True)])
def test_fused_qk_norm_rope_equals_the_eager_attention_inputs(qk_norm, rope, kernel_device):
    pytest.importorskip("triton")  # the kernel in Triton's interpreter here; the GPU path is chosen by device
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, n_head=3, n_embd=48, rope=rope, qk_norm=qk_norm)
    attention = GPT(config).blocks[0].attn
    rotary = None
    if rope:
        cos, sin = rotary_tables(config)
        rotary = (cos[5:15], sin[5:15])  # positions 5.. as when a cache holds 5 tokens
    qkv = (3 * torch.randn(2, 10, 3, 3, 16)).requires_grad_()
    weights = torch.randn(3, 2, 10, 3, 16)  # a loss that weighs every output differently
    expected = attention.queries_keys_values(qkv, rotary)
    sum((w * t).sum() for w, t in zip(weights, expected)).backward()
    expected_grad, qkv.grad = qkv.grad, None
    fused = fused_qk_norm_rope(qkv, rotary, qk_norm)
    (weights * fused).sum().backward()
    assert fused.shape == (3, 2, 10, 3, 16)
    assert torch.allclose(fused, torch.stack(expected), atol=1e-5)
    assert torch.allclose(qkv.grad, expected_grad, atol=1e-5)
    assert torch.equal(fused[2], qkv[:, :, 2])  # v passes through


def test_the_fused_qk_norm_rope_attention_is_swapped_in_for_power_of_two_heads_only():
    model = GPT(GPTConfig(block_size=16, n_head=2, n_embd=32, rope=True, qk_norm=True))
    keys = model.state_dict().keys()
    use_fused_qk_norm_rope(model)
    assert all(type(block.attn) is FusedQKNormRopeAttention for block in model.blocks)
    assert model.state_dict().keys() == keys
    odd = GPT(GPTConfig(block_size=16, n_head=2, n_embd=48, rope=True))  # head size 24
    use_fused_qk_norm_rope(odd)
    assert all(type(block.attn) is not FusedQKNormRopeAttention for block in odd.blocks)


def _mlp_operands(dtype, device="cpu", tokens=(2, 40), width=64):
    torch.manual_seed(0)
    x = torch.randn(*tokens, width, dtype=dtype, device=device)
    w_fc = torch.randn(4 * width, width, dtype=dtype, device=device) / width**0.5
    w_proj = torch.randn(width, 4 * width, dtype=dtype, device=device) / (4 * width) ** 0.5
    grad = torch.randn(*tokens, width, dtype=dtype, device=device)
    return [t.requires_grad_() for t in (x, w_fc, w_proj)], grad


def _mlp_and_gradients(mlp, operands, grad):
    out = mlp(*operands)
    return [out, *torch.autograd.grad(out, operands, grad)]


def _linear_gelu_linear(x, w_fc, w_proj):
    return F.linear(F.gelu(F.linear(x, w_fc), approximate="tanh"), w_proj)


@pytest.mark.parametrize("compiled", [False, True])
def test_gelu_mlp_equals_linear_gelu_linear_in_values_and_gradients(compiled):
    from lmtrain.fast.cublaslt import gelu_mlp

    operands, grad = _mlp_operands(torch.float64)
    mlp = torch.compile(gelu_mlp, fullgraph=True) if compiled else gelu_mlp  # the custom ops trace as one graph
    got = _mlp_and_gradients(mlp, operands, grad)
    expected = _mlp_and_gradients(_linear_gelu_linear, operands, grad)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.allclose(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogues run on a GPU (the device tool)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublaslt_gelu_epilogues_are_as_close_to_float32_as_pytorchs_own_ops(dtype):
    from lmtrain.fast.cublaslt import gelu_mlp, supported

    operands, grad = _mlp_operands(dtype, "cuda", tokens=(4, 256), width=256)
    assert supported(*operands)
    exact = _mlp_and_gradients(
        _linear_gelu_linear, [t.detach().double().requires_grad_() for t in operands], grad.double()
    )
    pytorch = _mlp_and_gradients(_linear_gelu_linear, operands, grad)
    cublaslt = _mlp_and_gradients(gelu_mlp, operands, grad)
    for name, ours, theirs, e in zip(("output", "x", "w_fc", "w_proj"), cublaslt, pytorch, exact):
        error = ((ours.double() - e).norm() / e.norm()).item()
        assert error <= 1.5 * ((theirs.double() - e).norm() / e.norm()).item() + 1e-4, name
    x = operands[0].detach()
    misaligned = torch.empty(x.numel() + 8, dtype=dtype, device="cuda")[8:].view_as(x).copy_(x)  # 16 bytes off
    assert misaligned.data_ptr() % 256 and torch.equal(gelu_mlp(misaligned, *operands[1:]), cublaslt[0])


def test_relu_squared_as_one_function_equals_the_plain_mlp_in_values_and_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, mlp="relu2"))
    fused = copy.deepcopy(model)
    use_fused_mlp(fused)
    assert all(type(block.mlp) is ReLUSquaredMLP for block in fused.blocks)
    idx = torch.randint(65, (3, 17))
    losses = [m.loss(idx[:, :-1], idx[:, 1:]) for m in (model, fused)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_the_gelu_epilogue_mlp_is_swapped_in_for_tanh_gelu_without_bias_only():
    from lmtrain.fast.mlp import GeluEpilogueMLP

    for mlp, bias, swapped in (("gelu_tanh", False, True), ("gelu_tanh", True, False), ("gelu", False, False)):
        model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, mlp=mlp, bias=bias))
        use_fused_mlp(model)
        assert (type(model.blocks[0].mlp) is GeluEpilogueMLP) == swapped, (mlp, bias)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, mlp="gelu_tanh", dropout=0.0))
    idx = torch.randint(65, (3, 17))
    plain = model.loss(idx[:, :-1], idx[:, 1:])
    use_fused_mlp(model)  # on the CPU it runs the plain MLP: the same value
    assert torch.equal(model.loss(idx[:, :-1], idx[:, 1:]), plain)


def test_relu_squared_gradient():
    from lmtrain.fast.mlp import _ReLUSquared

    x = torch.randn(40, dtype=torch.float64, requires_grad=True)
    assert torch.equal(_ReLUSquared.apply(x), torch.relu(x) ** 2)
    assert torch.autograd.gradcheck(_ReLUSquared.apply, (x,))


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 65, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, **changes}))


@pytest.mark.parametrize("norm", ["layernorm", "rms"])
@pytest.mark.parametrize("low_precision", [False, True])
def test_residual_stream_dtype_under_autocast(low_precision, norm):
    model = tiny(norm=norm, dropout=0.0)
    if low_precision:
        use_low_precision_residual(model)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype, output.dtype)))
    idx = torch.randint(65, (4, 33), generator=torch.Generator().manual_seed(1))
    reference = model.loss(idx[:, :-1], idx[:, 1:])  # no autocast: float32 whatever the option
    assert seen == [(torch.float32, torch.float32)] * 2
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
    stream = torch.bfloat16 if low_precision else torch.float32
    assert seen == [(stream, stream)] * 2
    assert loss.item() == pytest.approx(reference.item(), rel=0.01)


@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 0.8, "top_k": 5}, {"top_p": 0.9}])
def test_static_shape_decoding_draws_what_the_eager_loop_draws(options):
    model = tiny(rope=True, dropout=0.0)
    prompt = torch.randint(65, (2, 5), generator=torch.Generator().manual_seed(2))
    eager = model.generate(prompt, 27, generator=torch.Generator().manual_seed(4), **options)
    static = GraphedDecoder(model, prompt, 27, generator=torch.Generator().manual_seed(4), **options).run()
    assert static.shape == (2, 32) and torch.equal(eager, static)
    use_decode_graphs(model)  # on the CPU: the eager loop, the same draws
    assert torch.equal(model.generate(prompt, 27, generator=torch.Generator().manual_seed(4), **options), eager)


def test_the_fused_head_loss_of_a_model_equals_its_plain_loss(kernel_device):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    idx = torch.randint(65, (3, 17))
    full = model.loss(idx[:, :-1], idx[:, 1:])
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused = head_loss(model, "fused", 0)(idx[:, :-1], idx[:, 1:])
    fused.backward()
    assert torch.allclose(full, fused, atol=1e-6)
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))


def ten_step_best_val(output_dir, *overrides, eval_interval: int = 10) -> float:
    """Best val loss of 10 small smoke steps, evaluated every eval_interval steps (once, at the end)."""
    return train(
        compose(
            "experiment=smoke",
            f"output_dir={output_dir}",
            "trainer.max_steps=10",
            "trainer.batch_size=4",
            f"trainer.eval_interval={eval_interval}",
            "trainer.eval_batches=1",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            *overrides,
        )
    )


def test_training_with_the_fused_loss_follows_the_plain_loss(tmp_path):
    pytest.importorskip("triton")
    on = ["trainer.accelerator=gpu"] if torch.cuda.is_available() else []  # else Triton's interpreter on the CPU
    losses = {loss: ten_step_best_val(tmp_path / loss, f"fast.loss={loss}", *on) for loss in ("plain", "fused")}
    assert losses["fused"] == pytest.approx(losses["plain"], abs=1e-4)


def test_gradient_buffers_accumulated_in_place_outlive_the_evaluations(tmp_path, monkeypatch):
    # Under CUDA graphs with accumulation (reduce-overhead on a GPU) the gradients are buffers of our own, added
    # to in place; were they freed before an evaluation, as Lightning does, the next micro-batch's gradient
    # would be the graph's output buffer, and the one after it would overwrite it.
    started = []
    start = FastTraining.start

    def start_under_cuda_graphs(self, module, accumulate, optimizer):
        self.graph_trees = True  # what fast.compile_mode=reduce-overhead sets on a GPU
        start(self, module, accumulate, optimizer)
        started.append((module, [p.grad for p in module.parameters()]))

    monkeypatch.setattr(FastTraining, "start", start_under_cuda_graphs)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    ten_step_best_val(tmp_path, "trainer.accumulate_grad_batches=2", eval_interval=5)
    module, buffers = started[0]
    assert module.keep_gradient_buffers
    assert all(p.grad is buffer for p, buffer in zip(module.parameters(), buffers, strict=True))


def test_weight_copies_leave_the_tied_head_out_and_give_autocasts_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    reference = copy.deepcopy(model)
    copies = WeightCopies(model, torch.bfloat16)
    assert "wte.weight" not in copies.weights and len(copies.weights) == 4 * 2  # qkv, proj, fc, proj per block

    def same_values():
        return all(torch.equal(copies.copies[n], w.bfloat16()) for n, w in copies.weights.items())

    assert same_values() and all(c.dtype == torch.bfloat16 for c in copies.copies.values())
    for ids in torch.randint(0, 65, (2, 4, 17)):  # two micro-batches: the first gradient cast, the second added
        x, y = ids[:, :-1], ids[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for logits in (torch.func.functional_call(model, copies.copies, (x,)), reference(x)):
                (F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / 2).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, p in reference.named_parameters():
        assert grads[name].dtype == torch.float32 and torch.equal(grads[name], p.grad), name
    assert all(c.grad is None for c in copies.copies.values())
    with torch.no_grad():
        for w in copies.weights.values():
            w.add_(1.0)
    assert not same_values()
    copies.refresh()
    assert same_values()
    copies.release_grads()
    assert all(w.grad is None for w in copies.weights.values())


def test_float32_accumulation_kernel_casts_and_adds_exactly(kernel_device):
    pytest.importorskip("triton")
    from lmtrain.fast.triton_kernels import accumulate_float32_

    grad = torch.randn(3, 5000).bfloat16()  # not a multiple of the kernel's block
    total = torch.randn(3, 5000)
    expected = total + grad.float()
    accumulate_float32_(total, grad, add=True)
    assert torch.equal(total, expected)
    accumulate_float32_(total, grad, add=False)
    assert torch.equal(total, grad.float())


def test_training_with_weight_copies_is_bit_identical_to_autocast(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "device_problems", lambda cfg: [])  # bf16 autocast on the CPU, for the test
    refreshes = []
    refresh = WeightCopies.refresh
    monkeypatch.setattr(WeightCopies, "refresh", lambda self: refreshes.append(1) or refresh(self))
    options = ("precision=bf16", "trainer.accumulate_grad_batches=2")
    autocast = ten_step_best_val(tmp_path / "autocast", *options)
    copied = ten_step_best_val(tmp_path / "copies", *options, "fast.cast_weights_once=true")
    assert len(refreshes) == 10  # once per optimizer step: the copies were used
    assert copied == autocast


def test_cuda_graphs_are_captured_once_without_autocast_caching_or_the_runs_random_numbers(tmp_path, monkeypatch):
    """On the CPU the capture is faked: it notes autocast's weight cache and, as its warm-up passes do, runs the
    loss and draws random numbers. Training must then equal a run without the option, dropout masks and all."""
    monkeypatch.setattr(config, "device_problems", lambda cfg: [])
    cache_enabled = []

    def capture(module, sample_args, allow_unused_input):
        cache_enabled.append(torch.is_autocast_cache_enabled())
        module(*sample_args)  # its dropout draws
        torch.rand(100)
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    step_marks = []  # Inductor's graph-tree marks: only compiled graphs need them (and the import they cost)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: step_marks.append(1))
    plain = ten_step_best_val(tmp_path / "plain", eval_interval=5)
    graphed = ten_step_best_val(tmp_path / "graphed", "fast.cuda_graphs=true", eval_interval=5)
    assert cache_enabled == [False]
    assert step_marks == []
    assert graphed == plain


@pytest.mark.parametrize("option", ["cast_weights_once", "cuda_graphs"])
def test_single_process_options_refuse_to_train_several_processes(option):
    two = compose("experiment=smoke", "precision=bf16", f"fast.{option}=true", "trainer.devices=2")
    with pytest.raises(UserError, match=f"fast.{option} trains one process.*fast.{option}=false"):
        validate(two)


def test_gpu_only_options_without_a_gpu_are_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="fast.loss=fused runs a Triton kernel.*fast.loss=plain"):
        check_machine(compose("experiment=smoke", "fast.loss=fused"))
    with pytest.raises(UserError, match="fast.cuda_graphs=true replays CUDA graphs.*fast.cuda_graphs=false"):
        check_machine(compose("experiment=smoke", "fast.cuda_graphs=true"))
    check_machine(compose("experiment=smoke"))  # the default needs neither


@pytest.mark.parametrize(
    "old,new", [("model.compile=true", "fast.compile"), ("model.fused_loss=true", "fast.loss=fused")]
)
def test_an_old_speed_key_names_its_new_place(old, new):
    result = run_cli("lmtrain.train", "--cfg", "job", "experiment=smoke", old)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{old.split('=')[0]} moved to the fast group: use {new}" in result.stderr


def test_the_model_file_imports_no_speed_code():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lmtrain.model; "
            "print(sorted(m for m in sys.modules if m.startswith(('lmtrain.fast', 'triton'))))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("preset", ["none", "compiled", "graphs", "max"])
def test_every_fast_preset_composes_and_leaves_the_model_group_alone(preset):
    cfg = compose("experiment=seed", "precision=bf16", f"fast={preset}")  # the presets' precision
    assert cfg.model == compose("experiment=seed").model
    module = _module(cfg)
    (training,) = fast.apply(module, cfg.fast, cfg.trainer.precision)
    assert isinstance(training, FastTraining)
    assert (module.train_loss == module.model.loss) == (cfg.fast.loss == "plain")


def _module(cfg):
    from lmtrain.module import LanguageModel

    return LanguageModel(
        model={**config.to_container(cfg.model), "vocab_size": 65},
        optim=config.to_container(cfg.optim),
        max_steps=10,
        tokenizer_state={"kind": "char", "chars": "ab"},
        chars_per_token={"val": 1.0, "train": 1.0},
    )
