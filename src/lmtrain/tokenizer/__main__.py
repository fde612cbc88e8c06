"""Byte-level BPE from the command line (no torch imported):

python -m lmtrain.tokenizer train INPUT... --vocab-size 4096 --out tok.json [--pattern gpt2|gpt4|none]
                              [--special '<|endoftext|>']
python -m lmtrain.tokenizer encode --tokenizer tok.json FILE [--out ids.npy]   # else ids to stdout
python -m lmtrain.tokenizer decode --tokenizer tok.json IDS_FILE               # whitespace-separated or .npy
python -m lmtrain.tokenizer stats --tokenizer tok.json FILE [--top 20]
python -m lmtrain.tokenizer merges --tokenizer tok.json [--first 20]
python -m lmtrain.tokenizer convert --gpt2 DIR --out gpt2.json                 # GPT-2's vocab.bpe + encoder.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from ..errors import UserError, exit_on_user_error
from .bpe import PATTERNS, BPETokenizer, from_gpt2_files


def read_inputs(paths: list[str]) -> list[str]:
    from ..sources import read_text

    return [read_text(Path(p)) for p in paths]


def show(token: bytes) -> str:
    """A token as readable text: escapes for newlines and invalid UTF-8 pieces."""
    return repr(token.decode("utf-8", errors="backslashreplace"))[1:-1]


def check_out(out: str, example: str) -> None:
    """--out names a file: a folder (or '') is found before the work, not when its result is written."""
    if Path(out).is_dir():
        raise UserError(f"--out {out!r} is a folder; give a file name, e.g. --out {Path(out) / example}")


def cmd_train(args) -> None:
    from ..fileio import writable_folder
    from .bpe_train import train_bpe

    check_out(args.out, "tok.json")
    writable_folder(Path(args.out).resolve().parent)  # before training: a tokenizer that cannot be saved is lost
    texts = read_inputs(args.inputs)
    progress, finish = _progress(args.vocab_size - 256 - len(args.special))
    processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    tokenizer = train_bpe(texts, args.vocab_size, args.pattern, args.special, progress=progress, processes=processes)
    finish()
    tokenizer.save(args.out)
    print(
        f"{args.out}: {tokenizer.vocab_size} ids ({len(tokenizer.merges)} merges, pattern {args.pattern}, "
        f"{len(tokenizer.special_tokens)} special)",
        file=sys.stderr,
    )


def _progress(total: int):
    """Rich progress on a terminal; nothing (and no Rich import) when the output is a pipe or a file."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("merges"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    bar.start()
    task = bar.add_task("merges", total=total)
    return (lambda done: done % 64 == 0 and bar.update(task, completed=done)), bar.stop


def cmd_encode(args) -> None:
    if args.out:
        check_out(args.out, "ids.npy")
    tokenizer = BPETokenizer.load(args.tokenizer)
    ids = tokenizer.encode(read_inputs([args.file])[0])
    if args.out:
        import numpy as np

        from ..fileio import atomic_write

        dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
        atomic_write(args.out, lambda f: np.save(f, np.asarray(ids, dtype=dtype)))
        print(f"{args.out}: {len(ids)} ids", file=sys.stderr)
    else:
        sys.stdout.write(" ".join(map(str, ids)) + "\n")


def read_ids(path: str) -> list[int]:
    try:
        if path.endswith(".npy"):
            import numpy as np

            ids = np.load(path)
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise ValueError(f"an array of {ids.dtype} with shape {ids.shape}, not a row of integers")
            return ids.tolist()
        return [int(token) for token in Path(path).read_text().split()]
    except (OSError, ValueError, EOFError) as err:  # a .npy cut short: EOFError
        raise UserError(
            f"could not read ids from {path} ({err}); give whitespace-separated integers or a .npy file"
        ) from err


def cmd_decode(args) -> None:
    tokenizer = BPETokenizer.load(args.tokenizer)
    sys.stdout.buffer.write(tokenizer.decode_bytes(read_ids(args.file)))


def cmd_stats(args) -> None:
    tokenizer = BPETokenizer.load(args.tokenizer)
    text = read_inputs([args.file])[0]
    ids = tokenizer.encode(text)
    print(
        f"characters {len(text)}  bytes {len(text.encode())}  tokens {len(ids)}  "
        f"chars/token {len(text) / max(1, len(ids)):.3f}  vocab {tokenizer.vocab_size}"
    )
    print(f"most common {args.top} tokens:")
    for token, count in Counter(ids).most_common(args.top):
        print(f"{count:>9}  {token:>6}  '{show(tokenizer.decode_bytes([token]))}'")


def cmd_merges(args) -> None:
    tokenizer = BPETokenizer.load(args.tokenizer)
    table = tokenizer.token_bytes
    for i, (left, right) in enumerate(tokenizer.merges[: args.first]):
        print(
            f"merge {i:>5}: '{show(table[left])}' + '{show(table[right])}' -> '{show(table[256 + i])}' (id {256 + i})"
        )


def cmd_convert(args) -> None:
    check_out(args.out, "gpt2.json")
    tokenizer = from_gpt2_files(args.gpt2)
    tokenizer.save(args.out)
    print(f"{args.out}: GPT-2, {tokenizer.vocab_size} ids", file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lmtrain.tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on text files")
    t.add_argument("inputs", nargs="+", help="UTF-8 text files or folders of .txt files")
    t.add_argument("--vocab-size", type=int, default=4096)
    t.add_argument("--out", required=True)
    t.add_argument("--pattern", choices=sorted(PATTERNS), default="gpt2")
    t.add_argument("--special", action="append", default=[], help="a special token, repeatable")
    t.set_defaults(run=cmd_train)
    for name, run, what in (
        ("encode", cmd_encode, "text file"),
        ("decode", cmd_decode, "ids file"),
        ("stats", cmd_stats, "text file"),
    ):
        c = sub.add_parser(name, help=f"{name} a {what}")
        c.add_argument("--tokenizer", required=True)
        c.add_argument("file")
        c.set_defaults(run=run)
        if name == "encode":
            c.add_argument("--out", help="write the ids as .npy instead of text to stdout")
        if name == "stats":
            c.add_argument("--top", type=int, default=20)
    m = sub.add_parser("merges", help="print the merge sequence")
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--first", type=int, default=20)
    m.set_defaults(run=cmd_merges)
    v = sub.add_parser("convert", help="GPT-2's vocab.bpe + encoder.json to our format")
    v.add_argument("--gpt2", required=True, help="folder holding vocab.bpe and encoder.json")
    v.add_argument("--out", required=True)
    v.set_defaults(run=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with exit_on_user_error():
        args.run(args)


if __name__ == "__main__":
    main()
