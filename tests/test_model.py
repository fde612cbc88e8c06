"""The GPT: shapes, parameter counts, initial loss, learning, generation and its KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.model import GPT, GPTConfig, apply_rotary, rotary_tables, sample_next

TINY = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def tiny(**changes) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY.__dict__, **changes}))


def test_logits_shape_is_the_real_vocabulary():
    model = tiny()
    idx = torch.randint(65, (3, 20))
    assert model(idx).shape == (3, 20, 65)
    assert model.wte.weight.shape == (128, 32)  # padded to a multiple of 64


def test_gpt10m_parameter_counts():
    model = GPT(GPTConfig())  # the lesson's config with GPT-2's vocabulary
    assert model.config.padded_vocab_size == 50304
    assert model.num_params(embeddings=False) == pytest.approx(10.6e6, rel=0.01)
    assert model.num_params() == pytest.approx(30.0e6, rel=0.01)
    assert model.lm_head.weight is model.wte.weight


def test_initial_loss_is_uniform_over_the_vocabulary():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    idx = torch.randint(50257, (4, 33))
    loss = model.loss(idx[:, :-1], idx[:, 1:]).item()
    assert loss == pytest.approx(math.log(50257), abs=0.1)


def test_residual_projections_use_scaled_init_or_zero():
    model = tiny(n_layer=8)
    std = model.blocks[0].attn.proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.15)
    assert tiny(zero_init_proj=True).blocks[1].mlp.proj.weight.abs().sum() == 0


@pytest.mark.parametrize("options", [{}, {"rope": True, "qk_norm": True, "mlp": "relu2", "norm": "rms"}])
def test_tiny_model_overfits_one_batch(options):
    model = tiny(**options)
    idx = torch.randint(65, (4, 33), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.loss(x, y).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        optimizer.step()
    assert first > 4.0 and loss.item() < 0.2


def test_rms_norms_have_no_parameters_and_scale_rows_to_unit_rms():
    plain, rms = tiny(), tiny(norm="rms")
    norm_params = 2 * TINY.n_layer * TINY.n_embd + TINY.n_embd  # ln_1, ln_2 per block and ln_f: gains only
    assert plain.num_params() - rms.num_params() == norm_params
    x = torch.randn(3, 5, TINY.n_embd) * 7 + 2
    y = rms.ln_f(x)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(3, 5), atol=1e-4)
    assert torch.allclose(y * x.pow(2).mean(-1, keepdim=True).sqrt(), x, atol=1e-4)  # a per-row scale, no shift


def test_rotary_turns_query_key_products_into_functions_of_their_distance():
    config = GPTConfig(block_size=32, n_head=1, n_embd=16, rope=True)
    cos, sin = rotary_tables(config)
    q, k = torch.randn(2, 16)

    def product(i: int, j: int) -> torch.Tensor:  # q at position i with k at position j
        x = torch.stack([q, k]).view(2, 1, 16).expand(1, 32, 2, 1, 16)
        rotated = apply_rotary(x, cos, sin)
        return rotated[0, i, 0, 0] @ rotated[0, j, 1, 0]

    assert torch.allclose(product(7, 3), product(20, 16), atol=1e-5)
    assert not torch.allclose(product(7, 3), product(7, 4), atol=1e-3)
    assert torch.allclose(apply_rotary(x := torch.randn(1, 32, 2, 1, 16), cos, sin).norm(dim=-1), x.norm(dim=-1))
    x1, x2 = x.chunk(2, dim=-1)  # the pairs (x[i], x[i + D/2]): checkpoints depend on this convention
    angle = torch.arange(32.0)[:, None, None, None] * 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    assert torch.allclose(apply_rotary(x, cos, sin), expected, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"rope": True}])
def test_greedy_generation_is_identical_with_and_without_the_cache(options):
    model = tiny(**options)
    prompt = torch.randint(65, (2, 5))
    # 5 + 40 tokens: past block_size (32), where the context slides
    cached = model.generate(prompt, 40, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cached_logits_match_full_forward():
    model = tiny()
    model.eval()
    idx = torch.randint(65, (1, 12))
    from lmtrain.model import KVCache

    cache = KVCache(model.config, 1, idx.device, torch.float32)
    step_logits = [model(idx[:, :6], cache)[:, -1]] + [model(idx[:, t : t + 1], cache)[:, -1] for t in range(6, 12)]
    full = model(idx)[0, 5:]
    assert torch.allclose(torch.cat(step_logits), full, atol=1e-5)


def test_sampling_with_a_seed_is_deterministic():
    model = tiny()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_top_k_and_top_p_never_leave_their_sets():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, 1.0, 2, None, generator)
    assert set(top2.flatten().tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: mass 0.88 after two tokens
    nucleus = sample_next(logits, 1.0, None, 0.85, generator)
    assert set(nucleus.flatten().tolist()) == {0, 1} and probs[:2].sum() > 0.85


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(40000, 1)
    ids = sample_next(logits, 0.5, None, None, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(ids.flatten(), minlength=4) / len(ids)
    assert torch.allclose(frequencies, (logits[0] / 0.5).softmax(-1), atol=0.01)


def test_generation_leaves_training_mode_as_it_was():
    model = tiny(dropout=0.1)
    model.train()
    model.generate(torch.zeros(1, 1, dtype=torch.long), 3)
    assert model.training
