"""Prepare a corpus once: `python -m lmtrain.prepare data.path=INPUT out=DIR [tokenizer=gpt2] [data.workers=N]`.

INPUT is a text file, a folder (.txt .md .jsonl .jsonl.gz .parquet, recursively) or hf:NAME (a Hugging Face
dataset, streamed). Every core tokenizes its pieces (lmtrain.data.documents) into shards (lmtrain.data.shards);
memory stays bounded by the pieces in flight. Killed and started again with the same command, it goes on
from the finished pieces and ends with the same files; manifest.json, written last, marks the folder done.
    python -m lmtrain.prepare data.path=corpus/ out=data/corpus tokenizer=gpt2
    python -m lmtrain.train data=prepared data.path=data/corpus
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .cli import command
from .config import choice_problems, unknown_key_problems
from .console import say
from .data.documents import HF_PREFIX, Piece, Source, in_validation, plan_pieces, read_documents, source_files
from .data.shards import FORMAT, MANIFEST, SPLITS, VERSION, ShardWriter, shard_dtype, shard_name, write_manifest
from .errors import StoppedBySignal, UserError
from .fileio import atomic_write_bytes, write_failure
from .tokenizer import Tokenizer, fingerprint, from_state

STATE = ".prepare"  # the plan and each finished piece's record, until the manifest is written
FLUSH_TOKENS = 1 << 20
PROGRESS_BYTES = 1 << 22


def prepare(cfg: DictConfig) -> None:
    check_config(cfg)
    data, out = cfg.data, Path(cfg.out).expanduser()
    source = make_source(data)
    files = [] if source.hf_name else source_files(source)
    settings = {
        "input": source.path if source.hf_name else str(source.root.resolve()),
        "files": files,
        "tokenizer": OmegaConf.to_container(cfg.tokenizer, resolve=True),
        **{k: data[k] for k in ("val_fraction", "text_field", "errors", "chunk_mb", "tokenizer_sample_mb")},
        **({"hf": [source.hf_config, source.hf_split, source.hf_data_files]} if source.hf_name else {}),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if finished(out, key):
        say(f"{out} is prepared already (its manifest matches these settings); nothing to do")
        return
    plan = read_plan(out, key) or new_plan(cfg, source, files, out, key)
    tokenizer = from_state(plan["tokenizer"], data.cache_dir, data.mirror)
    tasks = [[Piece(**p) for p in task] for task in plan["tasks"]]
    for partial in out.rglob("*.partial"):  # a piece being written when the last run was killed
        partial.unlink()
    records = finished_records(out, len(tasks))
    todo = [i for i in range(len(tasks)) if i not in records]
    workers = min(data.workers or available_cores(), max(len(todo), 1))
    if todo:
        say(
            f"prepare: {len(tasks)} pieces of {source.path}, {len(todo)} to tokenize on {workers} processes"
            + (f" ({len(tasks) - len(todo)} done before)" if records else "")
        )
    job = Job(source, tasks, tokenizer, separator_ids(tokenizer), data.val_fraction, out)
    records.update(
        run_pool(
            job,
            todo,
            workers,
            total_bytes=sum(size for _, size in files) or None,
            done_bytes=sum(r["input_bytes"] for r in records.values()),
            progress=cfg.progress,
        )
    )
    manifest = assemble_manifest(plan, records, tokenizer, job, files, source)
    write_manifest(out, manifest)
    shutil.rmtree(out / STATE, ignore_errors=True)
    splits = manifest["splits"]
    say(
        f"prepared {out}: train {splits['train']['tokens']:,} tokens ({splits['train']['documents']:,} documents), "
        f"val {splits['val']['tokens']:,} tokens; python -m lmtrain.train data=prepared data.path={out}"
    )


def check_config(cfg: DictConfig) -> None:
    problems = unknown_key_problems(cfg, groups=("data",))
    if not problems:
        schema = OmegaConf.to_object(cfg.data)
        problems = choice_problems(schema, "data") + schema.problems()
    if problems:
        raise UserError("; ".join(problems))


def make_source(data: DictConfig) -> Source:
    path = str(data.path)
    hf_name = path[len(HF_PREFIX) :] if path.startswith(HF_PREFIX) else None
    return Source(path, data.text_field, data.errors, hf_name, data.hf_config, data.hf_split, data.hf_data_files)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the output folder: fresh, unfinished (resumed) or finished ----------------------------------------------
def finished(out: Path, key: str) -> bool:
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"out={out} is a file; give out a new or empty folder")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            same = json.loads(manifest.read_text(encoding="utf-8")).get("settings_key") == key
        except (UnicodeDecodeError, json.JSONDecodeError):
            same = False
        if same:
            return True
        raise UserError(
            f"out={out} holds a corpus prepared from other inputs or settings; choose another out, or delete it "
            "to prepare again"
        )
    if not (out / STATE / "plan.json").is_file() and any(out.iterdir()):
        raise UserError(f"out={out} is not empty and is no lmtrain.prepare folder; give out a new or empty folder")
    return False


def read_plan(out: Path, key: str) -> dict | None:
    path = out / STATE / "plan.json"
    if not path.is_file():
        return None
    plan = json.loads(path.read_text(encoding="utf-8"))
    if plan.get("settings_key") != key:
        raise UserError(
            f"out={out} holds an unfinished preparation of other inputs or settings; run that command again to "
            "finish it, or choose another out"
        )
    return plan


def new_plan(cfg: DictConfig, source: Source, files: list, out: Path, key: str) -> dict:
    data = cfg.data
    pieces = plan_pieces(source, files, data.chunk_mb << 20, data.val_fraction)
    if not pieces:
        raise UserError(f"data.path={source.path} holds only empty files; give it files with text")
    tasks = group_pieces(pieces, data.chunk_mb << 20)
    tokenizer = build_tokenizer(cfg, source, tasks)
    plan = {
        "settings_key": key,
        "tokenizer": tokenizer.state(),
        "split_by": "characters" if pieces[0].split else "document",
        "tasks": [[asdict(p) for p in task] for task in tasks],
    }
    atomic_write_bytes(out / STATE / "plan.json", json.dumps(plan).encode())
    return plan


def group_pieces(pieces: list[Piece], chunk_bytes: int) -> list[list[Piece]]:
    """Consecutive pieces joined into tasks of about chunk_bytes of input (small files share one)."""
    tasks, size = [[]], 0
    for piece in pieces:
        length = piece.end - piece.start if piece.kind in ("text", "jsonl") else chunk_bytes
        if tasks[-1] and size + length > chunk_bytes:
            tasks.append([])
            size = 0
        tasks[-1].append(piece)
        size += length
    return tasks


def finished_records(out: Path, n_tasks: int) -> dict[int, dict]:
    """The pieces finished before, whose shards are still there whole."""
    records = {}
    for path in (out / STATE / "done").glob("*.json"):
        record = json.loads(path.read_text(encoding="utf-8"))
        dtype_size = np.dtype(record["dtype"]).itemsize
        whole = all(
            (out / s["path"]).is_file() and (out / s["path"]).stat().st_size == s["tokens"] * dtype_size
            for s in record["shards"]
        )
        if whole and record["index"] < n_tasks:
            records[record["index"]] = record
    return records


# --- the tokenizer ----------------------------------------------------------------------------------------
def build_tokenizer(cfg: DictConfig, source: Source, tasks: list[list[Piece]]) -> Tokenizer:
    """GPT-2's as it is; char from every character of the corpus; bpe and sentencepiece trained on the first
    data.tokenizer_sample_mb of the training documents."""
    make = instantiate(cfg.tokenizer)
    kind = cfg.tokenizer._target_.rsplit(".", 2)[-2]
    text = ""
    if kind == "char":
        chars = set("\n")
        for task in tasks:
            for piece in task:
                for document, _ in read_documents(source, piece):
                    chars.update(document.text)
        text = "".join(sorted(chars))
    elif kind != "gpt2":
        budget, parts = cfg.data.tokenizer_sample_mb << 20, []
        for piece in (p for task in tasks for p in task):
            for document, _ in read_documents(source, piece):
                if split_of(document, cfg.data.val_fraction) == "train":
                    parts.append(document.text)
                    budget -= len(document.text)
            if budget <= 0:
                break
        text = "\n".join(parts)
    return make(text=text, train_text=text, cache_dir=cfg.data.cache_dir, mirror=cfg.data.mirror)


def separator_ids(tokenizer: Tokenizer) -> list[int]:
    """What goes between documents: the end-of-text token where the tokenizer has one, else a blank line."""
    if tokenizer.kind == "gpt2":
        return [tokenizer.encoding.eot_token]
    specials = getattr(tokenizer, "special_tokens", {})
    if "<|endoftext|>" in specials:
        return [specials["<|endoftext|>"]]
    return tokenizer.encode("\n\n")


def split_of(document, val_fraction: float) -> str:
    return document.split or ("val" if in_validation(document.key, val_fraction) else "train")


# --- the workers ------------------------------------------------------------------------------------------
class Job:
    """What every worker needs; forked into them, not pickled."""

    def __init__(self, source, tasks, tokenizer, separator, val_fraction, out):
        self.source, self.tasks, self.tokenizer, self.separator = source, tasks, tokenizer, separator
        self.val_fraction, self.out, self.dtype = val_fraction, out, shard_dtype(tokenizer.vocab_size)
        self.progress = None  # a queue of (input bytes, tokens) increments


_job: Job | None = None


def tokenize_task(index: int) -> dict:
    """One task's shards written (each atomically) and its record, written last."""
    job = _job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    writers = {split: ShardWriter(job.out, shard_name(split, index), job.dtype) for split in SPLITS}
    pending: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    pending_tokens = dict.fromkeys(SPLITS, 0)
    stats = {split: dict.fromkeys(("documents", "characters", "bytes", "tokens"), 0) for split in SPLITS}
    empty, input_bytes, unreported = 0, 0, [0, 0]
    separator = np.asarray(job.separator, dtype=np.int64)
    try:
        for piece in job.tasks[index]:
            for document, consumed in read_documents(job.source, piece):
                input_bytes += consumed
                unreported[0] += consumed
                if not document.text:
                    empty += 1
                    continue
                split = split_of(document, job.val_fraction)
                ids = np.asarray(job.tokenizer.encode(document.text), dtype=np.int64)
                pending[split] += [ids, separator] if document.ends else [ids]
                counts = stats[split]
                counts["documents"] += document.ends
                counts["characters"] += len(document.text)
                counts["bytes"] += len(document.text.encode("utf-8", errors="surrogatepass"))
                n = len(ids) + (len(separator) if document.ends else 0)
                counts["tokens"] += n
                unreported[1] += n
                pending_tokens[split] += n
                if pending_tokens[split] >= FLUSH_TOKENS:
                    writers[split].write(np.concatenate(pending[split]))
                    pending[split], pending_tokens[split] = [], 0
                if unreported[0] >= PROGRESS_BYTES:
                    job.progress.put(tuple(unreported))
                    unreported = [0, 0]
        for split in SPLITS:
            if pending[split]:
                writers[split].write(np.concatenate(pending[split]))
        shards = [shard for split in SPLITS if (shard := writers[split].close()) is not None]
    except BaseException as err:
        for writer in writers.values():
            writer.discard()
        if isinstance(err, OSError):
            raise UserError(f"could not write the shards in {job.out}: {write_failure(err)}") from None
        raise
    job.progress.put(tuple(unreported))
    for shard in shards:
        shard["split"] = shard["path"].split("/")[0]
    record = {
        "index": index,
        "dtype": job.dtype.name,
        "shards": shards,
        "stats": stats,
        "empty_documents": empty,
        "input_bytes": input_bytes,
    }
    try:
        atomic_write_bytes(job.out / STATE / "done" / f"{index:06d}.json", json.dumps(record).encode())
    except UserError as err:
        raise UserError(f"{err}; the finished shards are kept: free space and run the same command") from None
    return record


def run_pool(job: Job, todo: list[int], workers: int, total_bytes, done_bytes: int, progress: bool) -> dict:
    global _job
    if not todo:
        return {}
    context = multiprocessing.get_context("fork")  # the workers share the parent's tokenizer and imports
    job.progress = context.Queue()
    _job = job
    records = {}
    pool = context.Pool(workers)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # after the fork: the workers keep the default
    try:
        with progress_display(progress, total_bytes, done_bytes) as advance:
            pending = pool.imap_unordered(tokenize_task, todo)
            while len(records) < len(todo):
                try:
                    record = pending.next(timeout=0.2)
                    records[record["index"]] = record
                except multiprocessing.TimeoutError:
                    pass
                with contextlib.suppress(queue.Empty):
                    while True:
                        advance(*job.progress.get_nowait())
        pool.close()
    except (KeyboardInterrupt, _Terminated) as stop:
        raise StoppedBySignal(
            signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT,
            f"prepare stopped: {len(records)} of {len(todo)} pieces written this run; run the same command to continue",
        ) from None
    except UserError as err:
        if "disk is full" in str(err) and "kept" not in str(err):
            raise UserError(f"{err}; the finished shards are kept: free space and run the same command") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        pool.terminate()
        pool.join()
        _job = None
    return records


class _Terminated(Exception):
    pass


def _stop_on_sigterm(signum, frame) -> None:
    raise _Terminated


@contextlib.contextmanager
def progress_display(enabled: bool, total_bytes, done_bytes: int):
    """Rich progress: bytes read, tokens written, tokens/s and the time left."""
    if not enabled:
        yield lambda *_: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    started, tokens = time.monotonic(), [0]
    columns = (
        TextColumn("prepare"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[tokens]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("prepare", total=total_bytes, completed=done_bytes, tokens="")

        def advance(read: int, written: int) -> None:
            tokens[0] += written
            rate = tokens[0] / max(time.monotonic() - started, 1e-9)
            bar.update(task, advance=read, tokens=f"{tokens[0] / 1e6:,.1f}M tokens {rate / 1e6:,.2f}M tok/s")

        yield advance


# --- the manifest -----------------------------------------------------------------------------------------
def assemble_manifest(plan: dict, records: dict, tokenizer, job: Job, files: list, source: Source) -> dict:
    ordered = [records[i] for i in sorted(records)]
    splits = {split: dict.fromkeys(("documents", "characters", "bytes", "tokens"), 0) for split in SPLITS}
    for record in ordered:
        for split in SPLITS:
            for key, value in record["stats"][split].items():
                splits[split][key] += value
    if plan["split_by"] == "characters":
        for split in SPLITS:
            splits[split]["documents"] = 1
    for split in SPLITS:
        if splits[split]["tokens"] == 0:
            raise UserError(
                f"the {split} split of {source.path} is empty ({sum(s['documents'] for s in splits.values())} "
                "documents in all); give more documents, or change data.val_fraction"
            )
    shards = [shard for record in ordered for shard in record["shards"]]
    return {
        "format": FORMAT,
        "version": VERSION,
        "settings_key": plan["settings_key"],
        "tokenizer": {
            "kind": tokenizer.kind,
            "fingerprint": fingerprint(tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "state": plan["tokenizer"],
        },
        "dtype": job.dtype.name,
        "separator": job.separator,
        "split_by": plan["split_by"],
        "val_fraction": job.val_fraction,
        "splits": {split: {**splits[split], "shards": sum(s["split"] == split for s in shards)} for split in SPLITS},
        "shards": sorted(shards, key=lambda s: (SPLITS.index(s["split"]), s["path"])),
        "inputs": {
            "path": source.path,
            "files": [{"path": rel, "bytes": size} for rel, size in files],
            "empty_files": sum(size == 0 for _, size in files),
            "empty_documents": sum(r["empty_documents"] for r in ordered),
        },
    }


main = command(prepare, config_name="prepare")

if __name__ == "__main__":
    main()
