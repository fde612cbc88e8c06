"""Optimizers: AdamW's clipping inside its fused step, Muon, and non-finite steps skipped on the device."""

from __future__ import annotations

import pytest
import torch

from lmtrain.model import GPT, GPTConfig
from lmtrain.optim import AdamW, Combined, OptimConfig, StackedMuon, build_optimizer, step_unless_found_inf

from .test_fast import ten_step_best_val


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
    step_unless_found_inf(optimizer.step, optimizer.param_groups, optimizer.state, torch.tensor(0.0))
    taken = p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone()
    p.grad = torch.tensor([1.0, float("inf"), float("nan"), 1.0])
    step_unless_found_inf(optimizer.step, optimizer.param_groups, optimizer.state, torch.tensor(1.0))
    assert torch.equal(p.detach(), taken[0]) and torch.equal(optimizer.state[p]["momentum_buffer"], taken[1])


def test_foreach_adamw_skips_an_update_whose_found_inf_is_set_and_takes_the_others():
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = AdamW([p], lr=0.1, foreach=True)
    for found_inf, moves in ((0.0, True), (1.0, False), (0.0, True)):
        before = p.detach().clone()
        p.grad = torch.full((4,), float("nan") if found_inf else 1.0)
        optimizer.found_inf = torch.tensor(found_inf)
        optimizer.step()
        assert (not torch.equal(p.detach(), before)) == moves
        assert "found_inf" not in vars(optimizer)  # read once: the next step sets its own
    assert optimizer.state[p]["step"].item() == 2
