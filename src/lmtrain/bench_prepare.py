"""`python -m lmtrain.bench prepare [--sizes-gb 0.2,1,2] [--workers N] [--seed N] [--no-startup] [--out FILE]`

`lmtrain.prepare` against nanoGPT's recipe (data/openwebtext/prepare.py: Hugging Face datasets' `map` over N
processes, then every id written into one np.memmap), on the same generated corpus of jsonl documents and the
same number of processes, each run as its own process: wall clock, MB/s and tokens/s, and the peak PSS of its
process tree (the pages forked workers share counted once). Then, on the largest corpus, the seconds from
`lmtrain.train data=prepared` starting to its first optimizer step, against the same run on a tiny corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import UserError

FILE_BYTES = 8_000_000  # the generated corpus: files of about this size
DOC_BYTES = (1_000, 20_000)  # documents' lengths, log-uniform between these
TINY_BYTES = 1_000_000  # the corpus whose start-up is the fixed cost (imports, model, the first step itself)
EOT = 50256  # GPT-2's <|endoftext|>


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.bench prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes-gb", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 1.0, 2.0])
    parser.add_argument("--workers", type=int, default=None, help="processes for both (default: every core)")
    parser.add_argument("--seed", type=int, default=0, help="of the generated corpus")
    parser.add_argument("--no-startup", dest="startup", action="store_false", help="skip the training start-up runs")
    parser.add_argument("--out", help="also write the results as JSON")
    return parser.parse_args(argv)


# --- the corpus -------------------------------------------------------------------------------------------
def line_pool(rng: np.random.Generator) -> np.ndarray:
    """TinyShakespeare's lines and three times as many made of its words drawn at random."""
    from .sources import TINYSHAKESPEARE, cache_and_mirror, fetch

    text = fetch(TINYSHAKESPEARE, *cache_and_mirror()).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    words = np.array(text.split(), dtype=object)
    made = []
    for length in rng.integers(3, 13, size=3 * len(lines)):
        drawn = words[rng.integers(0, len(words), size=length)].tolist()
        made.append(" ".join(drawn).capitalize() + ".,;:!?"[length % 6])
    return np.array(lines + made, dtype=object)


def write_corpus(folder: Path, n_bytes: int, seed: int) -> dict:
    """About n_bytes of jsonl documents ({"text": ...}, 1-20 KB of lines drawn from line_pool), in files of
    about FILE_BYTES; the same for the same size and seed."""
    rng = np.random.default_rng(seed)
    pool = line_pool(rng)
    mean_line = sum(map(len, pool)) / len(pool) + 1
    folder.mkdir(parents=True, exist_ok=True)
    n_files = max(1, round(n_bytes / FILE_BYTES))
    written = documents = 0
    for index in range(n_files):
        target, records = n_bytes * (index + 1) // n_files, []
        while written < target:
            length = np.exp(rng.uniform(*np.log(DOC_BYTES)))
            text = "\n".join(pool[rng.integers(0, len(pool), size=max(1, int(length / mean_line)))].tolist())
            records.append(json.dumps({"text": text}) + "\n")
            written += len(records[-1])
        (folder / f"part-{index:05d}.jsonl").write_text("".join(records), encoding="utf-8")
        documents += len(records)
    return {"files": n_files, "documents": documents, "bytes": written}


# --- measured runs ----------------------------------------------------------------------------------------
def tree_pss_kb(root: int) -> tuple[int, int]:
    """(PSS, anonymous PSS) in kB of `root` and all its descendants, from /proc/<pid>/smaps_rollup."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    parent = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(parent, []).append(int(entry.name))
    pss = anon = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
                rollup = f.read()
        except OSError:
            continue
        pss += int(re.search(r"^Pss:\s+(\d+)", rollup, re.M).group(1))
        found = re.search(r"^Pss_Anon:\s+(\d+)", rollup, re.M)
        anon += int(found.group(1)) if found else 0
    return pss, anon


def measured(command: list[str], log: Path, env: dict | None = None) -> dict:
    """Runs `command`: its wall clock seconds and the peak PSS of its process tree, sampled every 0.2 s."""
    peak = [0, 0]
    with open(log, "wb") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        while True:
            peak = [max(p, s) for p, s in zip(peak, tree_pss_kb(process.pid))]
            try:
                process.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
        seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise UserError(f"{' '.join(command[:4])} ... failed (exit {process.returncode}):\n{tail}")
    return {"seconds": seconds, "peak_pss_mb": peak[0] / 1024, "peak_anon_pss_mb": peak[1] / 1024}


def run_ours(corpus: Path, out: Path, workers: int, log: Path) -> dict:
    """`lmtrain.prepare` into out; its tokens: every split's in the manifest."""
    command = [sys.executable, "-m", "lmtrain.prepare", f"data.path={corpus}", f"out={out}", "tokenizer=gpt2"]
    result = measured([*command, f"data.workers={workers}", "progress=false"], log)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    splits = manifest["splits"].values()
    empty = manifest["inputs"]["empty_documents"]
    return {**result, "tokens": sum(s["tokens"] for s in splits), "empty_documents": empty}


def run_baseline(corpus: Path, out: Path, workers: int, log: Path) -> dict:
    """`baseline` in its own process, the Hugging Face caches inside out's folder; its tokens: out's length."""
    cache = out.parent / "hf-cache"
    env = {"HF_HOME": str(cache), "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code = "import sys; from lmtrain.bench_prepare import baseline; baseline(*sys.argv[1:])"
    result = measured([sys.executable, "-c", code, str(corpus), str(out), str(workers), str(cache)], log, env)
    return {**result, "tokens": out.stat().st_size // 2}


def baseline(corpus: str, out: str, workers: str, cache: str) -> None:
    """nanoGPT's data/openwebtext/prepare.py, on local jsonl files (no train/val split): the documents loaded by
    Hugging Face datasets, each tokenized with an end-of-text appended in `map` over `workers` processes, then
    all ids written into one uint16 np.memmap in 1024 contiguous batches."""
    import datasets

    from .sources import cache_and_mirror
    from .tokenizer.gpt2 import load_gpt2

    datasets.disable_progress_bars()
    encoding = load_gpt2(*cache_and_mirror()).encoding
    files = sorted(str(p) for p in Path(corpus).glob("*.jsonl"))
    processes = int(workers)
    dataset = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache, num_proc=processes)

    def tokenize(document: dict) -> dict:
        ids = encoding.encode_ordinary(document["text"])
        ids.append(encoding.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = dataset.map(tokenize, remove_columns=["text"], num_proc=processes)
    total = int(np.sum(tokenized.with_format("numpy")["len"], dtype=np.uint64))
    ids = np.memmap(out, dtype=np.uint16, mode="w+", shape=(total,))
    batches, at = min(1024, len(tokenized)), 0
    for index in range(batches):
        batch = tokenized.shard(num_shards=batches, index=index, contiguous=True).with_format("numpy")
        chunk = np.concatenate(list(batch["ids"]))
        ids[at : at + len(chunk)] = chunk
        at += len(chunk)
    ids.flush()


def id_counts(paths: list[Path]) -> np.ndarray:
    """How often each id occurs in these uint16 files."""
    counts = np.zeros(1 << 16, dtype=np.int64)
    for path in paths:
        ids = np.memmap(path, dtype=np.uint16, mode="r")
        for start in range(0, len(ids), 1 << 26):
            counts += np.bincount(ids[start : start + (1 << 26)], minlength=1 << 16)
    return counts


def compare_tokens(ours: dict, ours_dir: Path, theirs: dict, theirs_file: Path) -> dict:
    """Both totals, equal but for an empty document (ours writes nothing for it, the baseline its end-of-text),
    and whether both hold the same ids as often."""
    same_ids = bool(np.array_equal(id_counts(sorted(ours_dir.glob("*/*.bin"))), id_counts([theirs_file])))
    expected = ours["tokens"] + ours["empty_documents"]
    check = {"ours_tokens": ours["tokens"], "baseline_tokens": theirs["tokens"], "same_id_counts": same_ids}
    check["totals_match"] = theirs["tokens"] == expected
    why = (
        f" ({ours['empty_documents']} empty documents: the baseline writes their end-of-text, ours nothing)"
        if ours["empty_documents"] and check["totals_match"]
        else ""
    )
    verdict = "match" if check["totals_match"] else "DIFFER"
    _print(
        f"tokens: ours {ours['tokens']:,}, baseline {theirs['tokens']:,}: totals {verdict}{why}; "
        f"each id as often in both: {'yes' if same_ids else 'NO'}"
    )
    return check


# --- training start-up ------------------------------------------------------------------------------------
TRAIN = ("tokenizer=gpt2", "model=gpt_tiny", "trainer=cpu", "precision=fp32", "trainer.max_steps=1")
TRAIN_QUIET = ("trainer.eval_at_start=false", "trainer.log_every_n_steps=1", "optim.warmup_steps=0")


def first_step(prepared: Path, run_dir: Path, *overrides: str) -> dict:
    """Seconds to the first optimizer step of `lmtrain.train data=prepared` (the wall time of its train/loss
    point in TensorBoard): from the launch, and from the Trainer being built (Lightning's first record in
    train.log), which comes after the data module has opened (and verified) the shards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [sys.executable, "-m", "lmtrain.train", "data=prepared", f"data.path={prepared}", *TRAIN, *TRAIN_QUIET]
    launched = time.time()
    done = subprocess.run([*command, *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"lmtrain.train on {prepared} failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
    (events,) = {p.parent for p in run_dir.glob("tb/*/events.out.tfevents.*")}
    reader = EventAccumulator(str(events))
    reader.Reload()
    step = min(e.wall_time for e in reader.Scalars("train/loss"))
    stamp = re.search(r"^\[([\d-]+ [\d:]+),(\d{3})\]\[lightning", (run_dir / "train.log").read_text(), re.M)
    built = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1e3
    return {"from_launch_s": step - launched, "from_trainer_s": step - built}


def startup(prepared: Path, tmp: Path, workers: int, repeats: int = 3) -> dict:
    """The median of `repeats` first steps on `prepared`: verifying its shards (the first open: .verified
    removed), verified before (cached in .verified), and with data.verify=false; and on a tiny corpus, the part
    that does not depend on the corpus."""
    write_corpus(tmp / "tiny", TINY_BYTES, 0)
    run_ours(tmp / "tiny", tmp / "tiny-prepared", workers, tmp / "tiny.log")
    cases = {
        "first_open": (prepared, ()),
        "verified_before": (prepared, ()),
        "no_verify": (prepared, ("data.verify=false",)),
        "tiny_corpus": (tmp / "tiny-prepared", ()),
    }
    result = {}
    for name, (folder, overrides) in cases.items():
        runs = []
        for repeat in range(repeats):
            if name == "first_open":
                (folder / ".verified").unlink(missing_ok=True)
            runs.append(first_step(folder, tmp / f"run-{name}-{repeat}", *overrides))
        result[name] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    _print(
        f"seconds to the first optimizer step (median of {repeats}) from the launch (from the Trainer built): "
        + ", ".join(
            f"{name.replace('_', ' ')} {t['from_launch_s']:.1f} ({t['from_trainer_s']:.1f})"
            for name, t in result.items()
        )
    )
    return result


# --- the benchmark ----------------------------------------------------------------------------------------
def bench_prepare(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    args = parse(argv)
    if importlib.util.find_spec("datasets") is None:
        raise UserError("the baseline runs Hugging Face datasets: pip install 'lmtrain[hf]'")
    workers = args.workers or len(os.sched_getaffinity(0))  # lmtrain.prepare's data.workers=null: every core
    results: dict = {"workers": workers, "sizes": []}
    for gb in args.sizes_gb:
        with tempfile.TemporaryDirectory(prefix="lmtrain-bench-prepare-") as folder:
            tmp = Path(folder)
            started = time.perf_counter()
            corpus = write_corpus(tmp / "corpus", int(gb * 1e9), args.seed)
            _print(f"{gb} GB: {corpus['documents']:,} documents in {corpus['files']} files, generated in "
                   f"{time.perf_counter() - started:.1f} s")  # fmt: skip
            ours = run_ours(tmp / "corpus", tmp / "ours", workers, tmp / "ours.log")
            theirs = run_baseline(tmp / "corpus", tmp / "baseline" / "train.bin", workers, tmp / "baseline.log")
            row = {"size_gb": gb, **corpus, "ours": ours, "baseline": theirs}
            for run in (ours, theirs):
                run["mb_per_s"] = corpus["bytes"] / 1e6 / run["seconds"]
                run["tokens_per_s"] = run["tokens"] / run["seconds"]
            row["ratio"] = ours["mb_per_s"] / theirs["mb_per_s"]
            row["check"] = compare_tokens(ours, tmp / "ours", theirs, tmp / "baseline" / "train.bin")
            if args.startup and gb == max(args.sizes_gb):
                results["startup"] = {"size_gb": gb, **startup(tmp / "ours", tmp, workers)}
            results["sizes"].append(row)
    _print_table(results)
    return args, results


def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Preparing a jsonl corpus for GPT-2 on {results['workers']} processes")
    for column in ("corpus", "ours MB/s", "ours tok/s", "ours peak MB", "nanoGPT MB/s", "nanoGPT tok/s",
                   "nanoGPT peak MB", "ours / nanoGPT"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in results["sizes"]:
        cells = [f"{row['size_gb']:g} GB"]
        for run in (row["ours"], row["baseline"]):
            cells += [f"{run['mb_per_s']:.1f}", f"{run['tokens_per_s'] / 1e6:.2f}M", f"{run['peak_pss_mb']:.0f}"]
        table.add_row(*cells, f"{row['ratio']:.2f}x")
    Console().print(table)
