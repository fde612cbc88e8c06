"""GPT: a GPT-2 style decoder-only Transformer in one file.

Shapes: B batch, T time, C = n_embd, H = n_head, D = C // H head size, V = padded vocabulary.
Options beyond GPT-2 (all off by default): rotary position embeddings, QK-norm, ReLU² MLP,
zero-initialised output projections, RMS norms without parameters. No speed code: lmtrain.fast swaps faster
implementations of the same math into a built model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.1
    bias: bool = False
    rope: bool = False  # rotary position embeddings instead of learned ones
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp: str = "gelu"  # "gelu" (erf), "gelu_tanh" (GPT-2's own tanh approximation) or "relu2" (ReLU squared)
    norm: str = "layernorm"  # "layernorm" (GPT-2: a gain, a bias if `bias`) or "rms" (RMS norm, no parameters)
    zero_init_proj: bool = False  # output projections start at zero: each block starts as the identity
    vocab_multiple: int = 64  # pad the embedding table so the head's matmul is tensor-core aligned

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer for generation: (B, H, block_size, D) buffers filled left to right."""

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.head_size)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled, the same in every layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def rotary_tables(config: GPTConfig, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of each position's rotation angles, (block_size, 1, 1, D) each: the angles of the
    pairs (i, i + D/2) repeated over both halves, sin negated in the first, broadcast over q|k and heads."""
    inv_freq = base ** (-torch.arange(0, config.head_size, 2, dtype=torch.float32) / config.head_size)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (block_size, D/2)
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)
    return cos[:, None, None, :], sin[:, None, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x1[i], x2[i]) of the halves of x (B, T, 2, H, D) by their positions' angles (see
    rotary_tables): x1·cos - x2·sin and x2·cos + x1·sin, computed in float32 as x·cos + swapped halves·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer = layer
        self.n_head, self.head_size = config.n_head, config.head_size
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary=None, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_size)
        q, k, v = (t.transpose(1, 2) for t in self.queries_keys_values(qkv, rotary))  # (B, H, T, D)
        causal = True
        if cache is not None:
            # Generation fills the cache from empty (prompt, causal) and then one token at a time,
            # which may attend to every cached position.
            causal = cache.length == 0
            k, v = cache.append(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal and T > 1
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def queries_keys_values(self, qkv: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, T, H, D) of qkv (B, T, 3, H, D): q and k with QK-norm and rotary positions, as configured."""
        if not (self.qk_norm or rotary is not None):
            return qkv.unbind(2)
        qk, v = qkv.split((2, 1), dim=2)  # queries and keys normalised and rotated together
        if self.qk_norm:
            qk = F.rms_norm(qk, (self.head_size,))
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        return *qk.unbind(2), v.squeeze(2)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activate(self.fc(x))))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "relu2":
            h = F.relu(h)
            return h * h  # not h.square(): autocast would compute that in float32
        return F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")


def norm_layer(config: GPTConfig) -> nn.Module:
    if config.norm == "rms":  # no gain: its backward skips the per-feature reduction over every row
        return nn.RMSNorm(config.n_embd, elementwise_affine=False)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary=None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = None if config.rope else nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        if config.rope:
            cos, sin = rotary_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one add per sub-block
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters counted once (tied weights once); without embeddings: without wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normalised hidden states (B, T, C) of token ids (B, T)."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        assert start + T <= self.config.block_size, f"{start + T} positions exceed block_size"
        x = self.wte(idx)
        rotary = None
        if self.config.rope:
            rotary = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])
        else:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rotary, cache)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) over the real vocabulary; the padding ids are never predicted."""
        return self.lm_head(self.hidden_states(idx, cache))[..., : self.config.vocab_size]

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats; logits in float32 for an accurate log-sum-exp."""
        logits = self(idx)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield each new token (B, 1) as it is drawn. temperature 0 is greedy.

        With the cache, each step feeds only the new token. Past block_size the context slides:
        the last block_size tokens are recomputed each step, exactly as without the cache.
        """
        was_training = self.training
        self.eval()
        block = self.config.block_size
        cache = None
        if use_cache:
            cache = KVCache(self.config, idx.size(0), idx.device, self.wte.weight.dtype)
        try:
            for _ in range(max_new_tokens):
                if cache is not None and idx.size(1) <= block:
                    logits = self(idx[:, cache.length :], cache)[:, -1, :]
                else:
                    logits = self(idx[:, -block:])[:, -1, :]
                next_id = sample_next(logits.float(), temperature, top_k, top_p, generator)
                idx = torch.cat((idx, next_id), dim=1)
                yield next_id
        finally:
            self.train(was_training)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """The prompt (B, T) followed by max_new_tokens sampled tokens: (B, T + max_new_tokens)."""
        new = list(self.generate_stream(idx, max_new_tokens, **options))
        return torch.cat([idx, *new], dim=1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one id per row of logits (B, V): temperature, then top-k, then top-p (nucleus).

    The draw is argmax(p / E) with E ~ Exp(1) per entry (the exponential race: the same distribution as
    torch.multinomial), so that it has no data-dependent shapes; `noise` gives E, else it comes from generator.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div(noise.clamp_min(1e-30)).argmax(dim=-1, keepdim=True)
