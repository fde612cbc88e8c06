"""Where text and tokenizer files come from: a public URL checked by sha256, a local mirror, or a user's files.

Both data/ (the corpus) and tokenizer/ (GPT-2's files, training inputs) read through it; it imports neither.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .errors import UserError
from .fileio import atomic_write_bytes, sha256_bytes, sha256_file


class Remote(NamedTuple):
    url: str
    sha256: str
    name: str  # path inside a mirror folder and inside the download cache


TINYSHAKESPEARE = Remote(
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "tinyshakespeare.txt",
)
GPT2_VOCAB_BPE = Remote(
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "gpt2/vocab.bpe",
)
GPT2_ENCODER_JSON = Remote(
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt2/encoder.json",
)
REMOTES = {"shakespeare": TINYSHAKESPEARE}


def cache_and_mirror() -> tuple[Path, Path | None]:
    """Where downloads are cached and copied from (LMTRAIN_CACHE, LMTRAIN_DATA_MIRROR), as the commands read them."""
    mirror = os.environ.get("LMTRAIN_DATA_MIRROR")
    return Path(os.environ.get("LMTRAIN_CACHE", "~/.cache/lmtrain")).expanduser(), Path(mirror) if mirror else None


def fetch(remote: Remote, cache_dir: Path, mirror: Path | None = None) -> Path:
    """A verified local copy of `remote`: from the cache, else the mirror folder, else the network."""
    dest = Path(cache_dir).expanduser() / "downloads" / remote.name
    if dest.is_file() and sha256_file(dest) == remote.sha256:
        return dest
    if mirror is not None:
        source = Path(mirror).expanduser() / remote.name
        if not source.is_file():
            raise UserError(
                f"{remote.name} is not in the data mirror {mirror}; copy it there, or unset "
                f"LMTRAIN_DATA_MIRROR (data.mirror) to download it from {remote.url}"
            )
        data, origin = source.read_bytes(), str(source)
    else:
        data, origin = _download(remote), remote.url
    if sha256_bytes(data) != remote.sha256:
        raise UserError(
            f"{origin} has sha256 {sha256_bytes(data)[:12]}…, expected {remote.sha256[:12]}…; "
            "replace it with the original file"
        )
    return atomic_write_bytes(dest, data)


def _download(remote: Remote) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(remote.url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise UserError(
            f"could not download {remote.url} ({getattr(err, 'reason', err)}); check the network, or set "
            f"LMTRAIN_DATA_MIRROR (data.mirror) to a folder holding {remote.name}"
        ) from err


def read_text(path: Path) -> str:
    """A UTF-8 file, or the .txt files of a folder in name order joined by newlines. Only regular files are read:
    a FIFO would block and a device such as /dev/zero never ends; dangling and looping links lead nowhere."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*.txt") if f.is_file())
        if not files:
            raise UserError(
                f"the folder {path} holds no readable .txt files (regular files; folders, FIFOs, devices and broken "
                "links are passed over); set data.path to a UTF-8 file or such a folder"
            )
        return "\n".join(_read_utf8(f) for f in files)
    if not path.is_file():
        what = "does not exist" if not (path.exists() or path.is_symlink()) else "is not a regular file"
        raise UserError(f"data file {path} {what}; set data.path to a UTF-8 text file or a folder of .txt files")
    return _read_utf8(path)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"data file {path} is empty; give data.path a file with text in it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"data file {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            f"convert it, e.g. `iconv -f latin1 -t utf-8`, or choose another data.path"
        ) from err
