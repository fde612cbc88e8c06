"""Optimizers: AdamW with weight decay on matrices only (nanoGPT's grouping), and Muon for the hidden
matrices with AdamW for the rest, stepped together as one optimizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class OptimConfig:
    name: str = "adamw"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 200
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    fused: bool | None = None  # None: fused on CUDA where the precision allows it, else foreach
    muon_lr: float = 0.02  # optim=muon: peak lr of the hidden 2-D weights (scaled by the schedule too)
    muon_momentum: float = 0.95


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the ≥2-D weights (matmuls, embeddings); not biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    if config.name == "muon":
        return build_muon(model, config, fused)
    return _adamw(param_groups(model, config.weight_decay), config, fused)


def _adamw(groups: list[dict], config: OptimConfig, fused: bool) -> torch.optim.AdamW:
    return AdamW(
        groups,
        lr=config.max_lr,
        betas=tuple(config.betas),
        eps=config.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def build_muon(model: nn.Module, config: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """Muon (torch.optim.Muon's update, StackedMuon) for the blocks' 2-D weights; AdamW for the embedding/head
    and the gains."""
    if not hasattr(torch.optim, "Muon"):
        from .errors import UserError

        raise UserError(f"optim=muon needs torch.optim.Muon (PyTorch 2.9 or newer; this is {torch.__version__})")
    hidden = [p for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("blocks.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    adamw = _adamw(
        [
            {"name": "adamw_decay", "params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
            {"name": "adamw_no_decay", "params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        config,
        fused,
    )
    muon = StackedMuon(
        [{"name": "muon", "params": hidden}],
        lr=config.muon_lr,
        momentum=config.muon_momentum,
        weight_decay=config.weight_decay,
    )
    return Combined([muon, adamw])


def clip_gradients_(model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Scale the gradients to a total norm of at most max_norm (None: measure only); returns the norm before.
    `model` as the strategy wraps it: FSDP's clip_grad_norm_ takes the norm over every rank's shard."""
    max_norm = max_norm or math.inf
    if hasattr(model, "clip_grad_norm_"):
        return model.clip_grad_norm_(max_norm)
    if optimizer.defaults.get("fused"):
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        # fused AdamW divides the gradients by grad_scale as it reads them: clipping without a pass of its own
        optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
        return norm
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


def loss_of(closure) -> torch.Tensor | None:
    """What an optimizer's step runs first: the closure (forward and backward) with gradients on, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class StackedMuon(torch.optim.Muon):
    """torch.optim.Muon's update, made for matrices of the same shape together: the Newton-Schulz iterations
    as batched matmuls over a stack. torch.optim.Muon launches ~23 kernels per matrix from Python (~550 for
    the 24 of gpt10m), which bound a small model's step by host time; here ~25 per shape. Same groups,
    options and state (a momentum buffer per parameter), so its checkpoints load either way.
    Honours `found_inf` (a 0-d tensor, 1.0 = skip) on the device, as fused AdamW does."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = loss_of(closure)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                self._update_stack(group, shape, params, found_inf)
        return loss

    def _update_stack(self, group: dict, shape: torch.Size, params: list[torch.Tensor], found_inf) -> None:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        lr, momentum = group["lr"], group["momentum"]
        grad, old_buffer = torch.stack([p.grad for p in params]), torch.stack(buffers)  # (n, rows, cols)
        buffer = old_buffer.lerp(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = stacked_newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        param = torch.stack(params)
        new_param = param * (1 - lr * group["weight_decay"])
        new_param.add_(update, alpha=-lr * math.sqrt(max(1.0, shape[0] / shape[1])))  # Muon's 'original' scale
        if found_inf is not None:  # a skipped step keeps the weights and the momentum as they were
            skip = found_inf.bool()
            buffer, new_param = torch.where(skip, old_buffer, buffer), torch.where(skip, param, new_param)
        torch._foreach_copy_(buffers, list(buffer.unbind(0)))
        torch._foreach_copy_(params, list(new_param.unbind(0)))


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW that honours `found_inf` (a 0-d tensor, 1.0 = skip this update) without a host sync:
    the fused form reads it itself; the foreach form reads it on the CPU, where that waits for nothing, and on a
    GPU has its step undone on the device (step_unless_found_inf)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = loss_of(closure)
        found_inf = None if self.defaults.get("fused") else self.__dict__.pop("found_inf", None)
        if found_inf is None:
            super().step()
        elif found_inf.is_cuda:
            step_unless_found_inf(super().step, self.param_groups, self.state, found_inf)
        elif not found_inf.item():
            super().step()
        return loss


def stacked_newton_schulz(
    stack: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation of each matrix of a (n, rows, cols) stack."""
    a, b, c = coefficients
    x = stack.bfloat16()
    tall = stack.size(1) > stack.size(2)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


@torch.no_grad()
def step_unless_found_inf(step, param_groups: list[dict], state: dict, found_inf: torch.Tensor) -> None:
    """An optimizer's step(), undone on the device when found_inf is 1: parameters and state tensors are
    snapshotted, the step runs on gradients with non-finite entries zeroed (so everything stays finite),
    and x = x * (1 - found_inf) + snapshot * found_inf restores them exactly."""
    params = [p for group in param_groups for p in group["params"] if p.grad is not None]
    tensors = params + [t for p in params for t in state.get(p, {}).values() if torch.is_tensor(t)]
    tensors = [t for t in tensors if t.is_floating_point()]
    snapshot = torch._foreach_mul(tensors, 1.0)
    for p in params:
        p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    step()
    torch._foreach_mul_(tensors, 1.0 - found_inf)
    torch._foreach_add_(tensors, torch._foreach_mul(snapshot, found_inf))


class Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one: what Lightning's automatic optimization and a LambdaLR expect.

    Its param_groups are the sub-optimizers' own group dicts, so a scheduler's lr reaches them.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @property
    def state(self):
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    @state.setter
    def state(self, value) -> None:  # set by Optimizer.__init__; the sub-optimizers own the state
        pass

    @torch.no_grad()
    def step(self, closure=None):
        loss = loss_of(closure)
        found_inf = getattr(self, "found_inf", None)
        for optimizer in self.optimizers:
            if found_inf is not None:
                optimizer.found_inf = found_inf
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)
