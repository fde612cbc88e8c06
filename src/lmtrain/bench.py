"""Benchmarks, each against a baseline measured in the same run; timings never decide a test.

python -m lmtrain.bench tokenizer [--sizes 512,1024,4096,8192] [--repeats 3] [--no-naive] [--out FILE]
python -m lmtrain.bench train [--raw] [--steps N] [--warmup N] [--out FILE] [training overrides ...]
python -m lmtrain.bench prepare [--sizes-gb 0.2,1,2] [--workers N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def shakespeare_text() -> str:
    from .sources import TINYSHAKESPEARE, cache_and_mirror, fetch

    return fetch(TINYSHAKESPEARE, *cache_and_mirror()).read_text(encoding="utf-8")


# --- tokenizer ------------------------------------------------------------------------------------
def _hf_train(path: str, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([path], trainer)
    return tokenizer


def _cli_train(path: str, vocab_size: int, out: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "lmtrain.tokenizer", "train", path, "--vocab-size", str(vocab_size), "--out", out],
        check=True,
        capture_output=True,
    )


def bench_tokenizer(args) -> dict:
    from .tokenizer.bpe import PATTERNS, BPETokenizer
    from .tokenizer.bpe_naive import naive_merges
    from .tokenizer.bpe_train import train_bpe

    text = shakespeare_text()
    megabytes = len(text.encode()) / 1e6
    results: dict = {"text_mb": megabytes, "train": [], "encode": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "input.txt")
        Path(path).write_text(text, encoding="utf-8")
        for size in args.sizes:
            row = {
                "vocab_size": size,
                "ours_whole_process_s": best_time(
                    lambda size=size: _cli_train(path, size, f"{tmp}/t.json"), args.repeats
                ),
                "ours_in_process_s": best_time(lambda size=size: train_bpe([text], size), args.repeats),
                "hf_tokenizers_s": best_time(lambda size=size: _hf_train(path, size), args.repeats),
            }
            if size == min(args.sizes) and args.naive:
                row["naive_s"] = best_time(lambda size=size: naive_merges([text], size - 256, PATTERNS["gpt2"]), 1)
            results["train"].append(row)
            _print(f"train vocab {size}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "vocab_size"))

        import tiktoken

        ours = train_bpe([text], 4096)
        hf = _hf_train(path, 4096)
        gpt2 = tiktoken.get_encoding("gpt2") if _tiktoken_gpt2_available() else None
        encoders = {
            "ours (tiktoken core, 4096)": lambda: ours.encode(text),
            "ours (pure Python, 4096)": lambda: BPETokenizer(ours.merges).encode_python(text),
            "HF tokenizers (4096)": lambda: hf.encode(text),
        }
        if gpt2 is not None:
            encoders["tiktoken gpt2 (50257)"] = lambda: gpt2.encode_ordinary(text)
        for name, encode in encoders.items():
            seconds = best_time(encode, args.repeats)
            results["encode"].append({"encoder": name, "seconds": seconds, "mb_per_s": megabytes / seconds})
    _print_tokenizer_table(results)
    return results


def _tiktoken_gpt2_available() -> bool:
    from .sources import cache_and_mirror
    from .tokenizer.gpt2 import load_gpt2

    try:
        load_gpt2(*cache_and_mirror())
        return True
    except Exception:  # noqa: BLE001 - the benchmark just leaves the row out
        return False


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_tokenizer_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    train = Table(title=f"BPE training on TinyShakespeare ({results['text_mb']:.2f} MB), best of runs, seconds")
    for column in (
        "vocab",
        "ours (whole process)",
        "ours (in process)",
        "HF tokenizers",
        "ours / HF",
        "naive",
        "naive / ours",
    ):
        train.add_column(column, justify="right")
    for row in results["train"]:
        naive = row.get("naive_s")
        train.add_row(
            str(row["vocab_size"]),
            f"{row['ours_whole_process_s']:.3f}",
            f"{row['ours_in_process_s']:.3f}",
            f"{row['hf_tokenizers_s']:.3f}",
            f"{row['ours_whole_process_s'] / row['hf_tokenizers_s']:.2f}",
            f"{naive:.1f}" if naive else "",
            f"{naive / row['ours_in_process_s']:.0f}x" if naive else "",
        )
    encode = Table(title="Encoding all of TinyShakespeare")
    for column in ("encoder", "seconds", "MB/s", "vs tiktoken gpt2"):
        encode.add_column(column, justify="right")
    reference = next((r["mb_per_s"] for r in results["encode"] if r["encoder"].startswith("tiktoken")), None)
    for row in results["encode"]:
        ratio = f"{row['mb_per_s'] / reference:.2f}" if reference else ""
        encode.add_row(row["encoder"], f"{row['seconds']:.3f}", f"{row['mb_per_s']:.1f}", ratio)
    console = Console()
    console.print(train)
    console.print(encode)


# --- generation -----------------------------------------------------------------------------------
def bench_generate(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """Tokens/s of sampling one block: KV cache, none, and (on a GPU) CUDA-graph replays (random weights)."""
    import torch

    from .build import model_arguments
    from .cli import compose
    from .fast.cuda_graphs import generate as graphed_generate
    from .model import GPT
    from .module import gpt_config

    parser = argparse.ArgumentParser(prog="python -m lmtrain.bench generate")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out")
    args, overrides = parser.parse_known_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose("train", [*overrides, f"output_dir={tmp}"])
    model = GPT(gpt_config(model_arguments(cfg, args.vocab))).to(device).eval()
    new_tokens = model.config.block_size - 1
    prompt = torch.zeros(args.batch, 1, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "new_tokens": new_tokens,
        "overrides": overrides,
    }
    modes = {"cache": partial(model.generate, use_cache=True), "no_cache": partial(model.generate, use_cache=False)}
    if device.type == "cuda":
        modes["cuda_graph"] = partial(graphed_generate, model)  # fast.decode_graphs
    for name, sample in modes.items():

        def generate(sample=sample):
            with autocast:
                sample(prompt, new_tokens, temperature=1.0, top_k=40)
            if device.type == "cuda":
                torch.cuda.synchronize()

        seconds = best_time(generate, 3)
        results[f"tokens_per_s_{name}"] = args.batch * new_tokens / seconds
    print(
        f"generate {new_tokens} tokens x {args.batch} on {results['device']}, tokens/s: "
        + ", ".join(f"{name.replace('_', ' ')} {results['tokens_per_s_' + name]:,.0f}" for name in modes)
    )
    return args, results


def tokenizer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lmtrain.bench tokenizer")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", dest="naive", action="store_false", help="skip the slow naive reference")
    parser.add_argument("--out", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("tokenizer", "train", "generate", "prepare"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    from .errors import exit_on_user_error

    with exit_on_user_error():
        if argv[0] == "tokenizer":
            args = tokenizer_parser().parse_args(argv[1:])
            results = bench_tokenizer(args)
        elif argv[0] == "generate":
            args, results = bench_generate(argv[1:])
        elif argv[0] == "prepare":
            from .bench_prepare import bench_prepare

            args, results = bench_prepare(argv[1:])
        else:
            from .bench_train import bench_train

            args, results = bench_train(argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
