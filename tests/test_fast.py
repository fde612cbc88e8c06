"""The speed options (issue 6) on the CPU: each trains, the chunked loss is exact, FLOPs and the bench JSON."""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lmtrain import build
from lmtrain.bench import main as bench_main
from lmtrain.bench_train import flops_per_token, peak_flops
from lmtrain.build import check_device_options
from lmtrain.errors import UserError
from lmtrain.losses import chunked_linear_cross_entropy, fused_linear_cross_entropy
from lmtrain.model import GPT, GPTConfig, rotary_tables
from lmtrain.module import LanguageModel
from lmtrain.optim import Combined, OptimConfig, StackedMuon, build_optimizer, step_unless_found_inf
from lmtrain.train import train
from lmtrain.weight_copies import WeightCopies

from .conftest import SHAKESPEARE, compose


@pytest.mark.parametrize(
    "option",
    [
        "model.rope=true",
        "model.qk_norm=true",
        "model.mlp=relu2",
        "model.mlp=gelu_tanh",
        "model.norm=rms",
        "model.zero_init_proj=true",
        "model.low_precision_residual=true",
        "optim=muon",
        "optim.fused=true",
        "optim.fused=false",
        "model.loss_chunk_rows=96",
        "trainer.matmul_precision=high",
        "trainer.eval_batches=null",
        "model.compile=true",
        "model.compile=true model.compile_scope=blocks",
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


def test_model_loss_with_chunks_equals_the_full_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    idx = torch.randint(65, (3, 17))
    full = model.loss(idx[:, :-1], idx[:, 1:])
    chunked = model.loss(idx[:, :-1], idx[:, 1:], chunk_rows=20)
    assert torch.allclose(full, chunked, atol=1e-6)


def test_compiled_blocks_share_one_graph_and_train_as_the_eager_model():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=32, dropout=0.0, rope=True)
    eager, compiled = GPT(config), GPT(config)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    idx = torch.randint(65, (3, 17))
    for model in (eager, compiled):
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # three layers, one graph
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints are alike
    compiled.eval()  # evaluation and generation run the eager blocks: nothing more is compiled
    compiled.loss(idx[:, :-1], idx[:, 1:])
    compiled.generate(idx[:, :4], 3, cuda_graph=False)
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
def test_fused_head_loss_equals_cross_entropy_in_values_and_gradients(dtype, block, spike, monkeypatch):
    pytest.importorskip("triton")  # in the dev extra; without a GPU the kernel runs in Triton's interpreter
    if block:
        from lmtrain import kernels

        monkeypatch.setattr(kernels, "BLOCK", block)
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
def test_fused_qk_norm_rope_equals_the_eager_attention_inputs(qk_norm, rope):
    pytest.importorskip("triton")  # the kernel in Triton's interpreter here; the GPU path is chosen by device
    from lmtrain.model import fused_qk_norm_rope

    torch.manual_seed(0)
    config = GPTConfig(block_size=16, n_head=3, n_embd=48, rope=rope, qk_norm=qk_norm)
    attention = GPT(config).blocks[0].attn
    rotary = None
    if rope:
        cos, sin = rotary_tables(config)
        rotary = (cos[5:15], sin[5:15])  # positions 5.. as when a cache holds 5 tokens
    qkv = (3 * torch.randn(2, 10, 3, 3, 16)).requires_grad_()
    weights = torch.randn(3, 2, 10, 3, 16)  # a loss that weighs every output differently
    expected = attention.normalize_and_rotate(qkv, rotary)
    sum((w * t).sum() for w, t in zip(weights, expected)).backward()
    expected_grad, qkv.grad = qkv.grad, None
    fused = fused_qk_norm_rope(qkv, rotary, qk_norm)
    (weights * fused).sum().backward()
    assert fused.shape == (3, 2, 10, 3, 16)
    assert torch.allclose(fused, torch.stack(expected), atol=1e-5)
    assert torch.allclose(qkv.grad, expected_grad, atol=1e-5)
    assert torch.equal(fused[2], qkv[:, :, 2])  # v passes through


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
    from lmtrain.cublaslt import gelu_mlp

    operands, grad = _mlp_operands(torch.float64)
    mlp = torch.compile(gelu_mlp, fullgraph=True) if compiled else gelu_mlp  # the custom ops trace as one graph
    got = _mlp_and_gradients(mlp, operands, grad)
    expected = _mlp_and_gradients(_linear_gelu_linear, operands, grad)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.allclose(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's epilogues run on a GPU (the device tool)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cublaslt_gelu_epilogues_are_as_close_to_float32_as_pytorchs_own_ops(dtype):
    from lmtrain.cublaslt import gelu_mlp, supported

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


def test_model_loss_fused_equals_the_full_loss():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    idx = torch.randint(65, (3, 17))
    full = model.loss(idx[:, :-1], idx[:, 1:])
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fused = model.loss(idx[:, :-1], idx[:, 1:], fused=True)
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
    losses = {fused: ten_step_best_val(tmp_path / fused, f"model.fused_loss={fused}") for fused in ("false", "true")}
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)


def test_fused_adamw_clips_inside_its_step_as_clip_grad_norm_does(tmp_path):
    def best_val(name, *overrides):
        return ten_step_best_val(tmp_path / name, *overrides)

    # a clip value every step exceeds: fused AdamW divides the gradients inside its step (grad_scale),
    # foreach AdamW gets them from clip_grad_norm_
    clipped = {
        fused: best_val(fused, f"optim.fused={fused}", "trainer.gradient_clip_val=0.01") for fused in ("true", "false")
    }
    unclipped = best_val("unclipped", "optim.fused=true", "trainer.gradient_clip_val=null")
    assert clipped["true"] == pytest.approx(clipped["false"], abs=2e-5)  # 2.4e-7 apart here
    assert abs(unclipped - clipped["true"]) > 5e-4  # Adam barely feels a rescaled gradient; 1.7e-3 apart


def test_gradient_buffers_accumulated_in_place_outlive_the_evaluations(tmp_path, monkeypatch):
    # Under CUDA graphs with accumulation (reduce-overhead on a GPU) the gradients are buffers of our own, added
    # to in place; were they freed before an evaluation, as Lightning does, the next micro-batch's gradient
    # would be the graph's output buffer, and the one after it would overwrite it.
    started = []
    on_train_start = LanguageModel.on_train_start

    def on_train_start_under_cuda_graphs(self):
        self._cudagraphs = True  # what model.compile_mode=reduce-overhead sets on a GPU
        on_train_start(self)
        started.append((self, [p.grad for p in self.parameters()]))

    monkeypatch.setattr(LanguageModel, "on_train_start", on_train_start_under_cuda_graphs)
    ten_step_best_val(tmp_path, "trainer.accumulate_grad_batches=2", eval_interval=5)
    module, buffers = started[0]
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


def test_float32_accumulation_kernel_casts_and_adds_exactly():
    pytest.importorskip("triton")
    from lmtrain.kernels import accumulate_float32_

    grad = torch.randn(3, 5000).bfloat16()  # not a multiple of the kernel's block
    total = torch.randn(3, 5000)
    expected = total + grad.float()
    accumulate_float32_(total, grad, add=True)
    assert torch.equal(total, expected)
    accumulate_float32_(total, grad, add=False)
    assert torch.equal(total, grad.float())


def test_training_with_weight_copies_is_bit_identical_to_autocast(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "check_device_options", lambda cfg: None)  # bf16 autocast on the CPU, for the test
    refreshes = []
    refresh = WeightCopies.refresh
    monkeypatch.setattr(WeightCopies, "refresh", lambda self: refreshes.append(1) or refresh(self))
    options = ("precision=bf16", "trainer.accumulate_grad_batches=2")
    autocast = ten_step_best_val(tmp_path / "autocast", *options)
    copied = ten_step_best_val(tmp_path / "copies", *options, "model.cast_weights_once=true")
    assert len(refreshes) == 10  # once per optimizer step: the copies were used
    assert copied == autocast


def test_cuda_graphs_are_captured_once_without_autocast_caching_or_the_runs_random_numbers(tmp_path, monkeypatch):
    """On the CPU the capture is faked: it notes autocast's weight cache and, as its warm-up passes do, runs the
    loss and draws random numbers. Training must then equal a run without the option, dropout masks and all."""
    monkeypatch.setattr(build, "check_device_options", lambda cfg: None)
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
    graphed = ten_step_best_val(tmp_path / "graphed", "model.cuda_graphs=true", eval_interval=5)
    assert cache_enabled == [False]
    assert step_marks == []
    assert graphed == plain


@pytest.mark.parametrize("option", ["cast_weights_once", "cuda_graphs"])
def test_single_process_options_refuse_to_train_several_processes(tmp_path, monkeypatch, option):
    monkeypatch.setattr(build, "check_device_options", lambda cfg: None)
    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))  # as under strategy=auto on 2 GPUs
    with pytest.raises(UserError, match=f"model.{option} trains one process, not 2.*model.{option}=false"):
        ten_step_best_val(tmp_path, "precision=bf16", f"model.{option}=true")


def test_gpu_only_options_without_a_gpu_are_clear_errors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="model.fused_loss=true runs a Triton kernel.*model.fused_loss=false"):
        check_device_options(compose("experiment=smoke", "model.fused_loss=true"))
    with pytest.raises(UserError, match="model.cuda_graphs=true replays CUDA graphs.*model.cuda_graphs=false"):
        check_device_options(compose("experiment=smoke", "model.cuda_graphs=true"))
    check_device_options(compose("experiment=smoke"))  # the default needs neither


def test_flops_per_token_of_a_small_config_counted_by_hand():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False))
    # wte 64*32; per block: two LayerNorm gains 2*32, qkv 32*96, proj 32*32, fc 32*128, proj 128*32; ln_f 32.
    # The position table is left out, the tied head counted once.
    params = 64 * 32 + 2 * (2 * 32 + 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32
    attention = 12 * 2 * 2 * 16 * 16  # 12 * layers * heads * head size * block
    assert flops_per_token(model) == 6 * params + attention


def test_peak_flops_is_looked_up_by_the_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    h100 = peak_flops(torch.device("cuda"), "bf16-mixed")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    a100 = peak_flops(torch.device("cuda"), "bf16-mixed")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    h200 = peak_flops(torch.device("cuda"), "bf16-mixed")  # dense, as the H100 SXM; not in Lightning's table
    assert h100 == pytest.approx(989.4e12, rel=0.01) and a100 == pytest.approx(312e12, rel=0.01)
    assert h200 == h100
    assert peak_flops(torch.device("cpu"), "32-true") is None


@pytest.mark.parametrize("path", [[], ["--raw"]])
def test_bench_train_writes_every_field(tmp_path, path):
    out = tmp_path / "bench.json"
    bench_main(["train", *path, "--steps", "3", "--warmup", "1", "--out", str(out), "experiment=smoke"])
    result = json.loads(out.read_text())
    assert result["path"] == ("raw loop" if path else "Lightning Trainer")
    assert result["device"] == "cpu" and result["steps"] == 3 and result["warmup_steps"] == 1
    assert result["tokens_per_step"] == 8 * 32  # smoke: 8 sequences of 32 tokens
    assert result["ms_per_step"] > 0 and result["startup_compile_warmup_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["ms_per_step"] * 1e3)
    assert result["flops_per_token"] > 0
    assert result["peak_flops"] is None and result["mfu"] is None and result["peak_memory_gib"] is None


def test_stacked_muon_takes_torch_muons_steps_and_state():
    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 16), (16, 64), (16, 64), (16, 64)]  # tall, square and wide stacks
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    options = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.1}
    stacked, reference = StackedMuon(ours, **options), torch.optim.Muon(theirs, **options)
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        stacked.step()
        reference.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4)  # bf16 Newton-Schulz, batched vs one at a time
        torch.testing.assert_close(stacked.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])
    reference.load_state_dict(stacked.state_dict())  # the same state: checkpoints load either way
    assert torch.equal(reference.state[theirs[3]]["momentum_buffer"], stacked.state[ours[3]]["momentum_buffer"])


def test_muon_skips_a_non_finite_step_on_the_device_exactly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    optimizer = build_optimizer(model, OptimConfig(name="muon"), fused=False)
    assert isinstance(optimizer, Combined)
    idx = torch.randint(65, (2, 17))

    def step(poison: bool) -> None:
        optimizer.zero_grad()
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        if poison:
            model.blocks[0].mlp.fc.weight.grad[0, 0] = float("nan")
        optimizer.found_inf = torch.tensor(float(poison))
        optimizer.step()

    step(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_before = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    step(True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for old, new in zip(state_before, optimizer.state.values(), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)
    step(False)
    assert not torch.equal(before["blocks.0.mlp.fc.weight"], model.blocks[0].mlp.fc.weight)


def test_an_undone_step_leaves_a_plain_optimizer_as_it_was():
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    step_unless_found_inf(optimizer, torch.tensor(0.0))
    taken = p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone()
    p.grad = torch.tensor([1.0, float("inf"), float("nan"), 1.0])
    step_unless_found_inf(optimizer, torch.tensor(1.0))
    assert torch.equal(p.detach(), taken[0]) and torch.equal(optimizer.state[p]["momentum_buffer"], taken[1])
