"""CUDA graphs: the uncompiled training loss captured and replayed (fast.cuda_graphs), and decoding one
token per graph replay (fast.decode_graphs)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..model import GPT, sample_next

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LossModule(torch.nn.Module):
    """A loss function as a module of the GPT's parameters: what make_graphed_callables captures."""

    def __init__(self, model: GPT, loss: LossFunction):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss(x, y)


def capture_loss(model: GPT, loss: LossFunction, x: torch.Tensor, y: torch.Tensor, dtype) -> LossFunction:
    """The loss's forward and backward captured as CUDA graphs for batches shaped like (x, y): each call
    replays them, two launches instead of one per kernel. The warm-up passes draw random numbers the run does
    not keep, so dropout draws what the uncaptured model would. `dtype`: autocast's, or None."""
    with (
        torch.random.fork_rng(devices=[x.device] if x.is_cuda else []),
        torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False),
    ):  # autocast's weight cache would freeze the weights the capture cast
        graphed = torch.cuda.make_graphed_callables(LossModule(model, loss), (x, y), allow_unused_input=True)
    return graphed.forward  # a function: the module would join the module tree and its checkpoints


class GraphedDecoder:
    """Decoding with static shapes, so that one step can be captured as a CUDA graph and replayed.

    The sequence lives in a (B, L) buffer, L = prompt + new tokens <= block_size. Each step recomputes all
    L positions (no KV cache: at these sizes the GPU does that in well under a millisecond), reads the
    logits at the last filled position, held on the device, and writes the drawn id after it. The
    sampling noise is drawn outside the graph from the caller's generator, as the eager loop draws it.
    """

    def __init__(
        self,
        model: GPT,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ):
        B, T = idx.shape
        self.model, self.sampling, self.generator = model, (temperature, top_k, top_p), generator
        self.max_new_tokens = max_new_tokens
        self.tokens = torch.zeros(B, T + max_new_tokens, dtype=torch.long, device=idx.device)  # (B, L)
        self.tokens[:, :T] = idx
        self.last = torch.full((1,), T - 1, dtype=torch.long, device=idx.device)  # last filled position
        self.noise = torch.empty(B, model.config.vocab_size, device=idx.device)  # Exp(1), see sample_next

    def step(self) -> None:
        hidden = self.model.hidden_states(self.tokens)  # (B, L, C)
        logits = self.model.lm_head(hidden.index_select(1, self.last))[:, 0, : self.model.config.vocab_size]
        next_id = sample_next(logits.float(), *self.sampling, noise=self.noise)  # (B, 1)
        self.last += 1
        self.tokens.index_copy_(1, self.last, next_id)

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        if self.max_new_tokens == 0:
            return self.tokens
        was_training = self.model.training
        self.model.eval()
        try:
            replay = self._capture() if self.tokens.is_cuda else self.step
            for _ in range(self.max_new_tokens):
                self.noise.exponential_(generator=self.generator)
                replay()
        finally:
            self.model.train(was_training)
        return self.tokens

    def _capture(self):
        """Warm up on a side stream (as torch.cuda.graphs asks), then capture one step. The autocast
        weight cache is off inside: a graph must not depend on casts made outside it."""
        autocast = torch.autocast(
            "cuda",
            dtype=torch.get_autocast_dtype("cuda"),
            enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False,
        )
        start = self.tokens.clone(), self.last.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast:
            self.step()
        self.tokens.copy_(start[0])  # undo the warm-up step
        self.last.copy_(start[1])
        return graph.replay


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """GPT.generate, each token one replay of a captured graph where that works: on a GPU, with prompt and new
    tokens within block_size. The same draws as the eager loop."""
    if idx.is_cuda and idx.size(1) + max_new_tokens <= model.config.block_size:
        options.pop("use_cache", None)
        return GraphedDecoder(model, idx, max_new_tokens, **options).run()
    return GPT.generate(model, idx, max_new_tokens, **options)


def use_decode_graphs(model: GPT) -> None:
    model.generate = partial(generate, model)
