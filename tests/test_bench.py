"""`python -m lmtrain.bench train`: FLOPs counted by hand, the card's peak looked up, every field written."""

from __future__ import annotations

import json

import pytest
import torch

from lmtrain.bench import main as bench_main
from lmtrain.bench_train import flops_per_token, peak_flops
from lmtrain.model import GPT, GPTConfig


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
    assert result["tokens_per_step"] == 16 * 64  # smoke: 16 sequences of 64 tokens
    assert result["ms_per_step"] > 0 and result["startup_compile_warmup_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["ms_per_step"] * 1e3)
    assert result["flops_per_token"] > 0
    assert result["peak_flops"] is None and result["mfu"] is None and result["peak_memory_gib"] is None


def test_bench_generate_times_each_decoding_path_this_machine_has(tmp_path):
    out = tmp_path / "generate.json"
    bench_main(["generate", "--vocab", "65", "--out", str(out), "experiment=smoke"])
    result = json.loads(out.read_text())
    assert result["new_tokens"] == 63  # smoke: block 64, one prompt token
    paths = {key for key in result if key.startswith("tokens_per_s_")}
    graphs = {"tokens_per_s_cuda_graph"} if torch.cuda.is_available() else set()
    assert paths == {"tokens_per_s_cache", "tokens_per_s_no_cache"} | graphs
    assert all(result[key] > 0 for key in paths)
