"""Our tokenizers as transformers tokenizer files, for an exported model's folder: GPT-2's own for gpt2; for char
and bpe a tokenizer.json, built with the `tokenizers` library, that gives our ids. lmtrain_tokenizer.json keeps
our tokenizer's state beside them, so that `init_from=<folder>` rebuilds the very tokenizer.

    save_pretrained(tokenizer, folder, cache_dir, mirror, model_max_length=block_size)
    state = saved_state(folder)   # None: the folder has no lmtrain_tokenizer.json
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..fileio import atomic_write_bytes
from ..sources import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, fetch
from .bpe import bytes_to_unicode

STATE_FILE = "lmtrain_tokenizer.json"
EXPORTED_KINDS = ("gpt2", "char", "bpe")


def save_pretrained(tokenizer, folder: Path, cache_dir, mirror, model_max_length: int) -> None:
    """The tokenizer's files in `folder`, which AutoTokenizer.from_pretrained reads, and its state."""
    if tokenizer.kind == "gpt2":
        from transformers import GPT2TokenizerFast

        mirror = Path(mirror).expanduser() if mirror else None
        vocab, merges = (
            fetch(remote, Path(cache_dir).expanduser(), mirror) for remote in (GPT2_ENCODER_JSON, GPT2_VOCAB_BPE)
        )
        fast = GPT2TokenizerFast(str(vocab), str(merges), model_max_length=model_max_length)
    elif tokenizer.kind in EXPORTED_KINDS:
        from transformers import PreTrainedTokenizerFast

        backend = char_tokenizer(tokenizer.chars) if tokenizer.kind == "char" else bpe_tokenizer(tokenizer)
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length)
    else:
        raise UserError(
            f"tokenizer={tokenizer.kind} has no transformers form in lmtrain; export a model trained with "
            f"tokenizer={', '.join(EXPORTED_KINDS)}"
        )
    fast.clean_up_tokenization_spaces = False  # decode must not drop the spaces before punctuation our ids hold
    fast.save_pretrained(str(folder))
    atomic_write_bytes(Path(folder) / STATE_FILE, json.dumps(tokenizer.state()).encode())


def char_tokenizer(chars: str):
    """One id per character (WordLevel over single characters); a character outside them is an error, as ours."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return backend


def bpe_tokenizer(tokenizer):
    """Our byte-level BPE: its pre-tokenization regex, GPT-2's printable stand-ins for bytes, our merges in order
    and a piece that is a token whole kept whole (tiktoken's rule: `ignore_merges`), the special tokens at our ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    stand_in = bytes_to_unicode()

    def token(data: bytes) -> str:
        return "".join(stand_in[b] for b in data)

    vocab: dict[str, int] = {}
    for token_id, data in enumerate(tokenizer.token_bytes):
        vocab.setdefault(token(data), token_id)  # bytes two merges made: the lower id, as our encoder
    vocab.update(tokenizer.special_tokens)
    merges = [(token(tokenizer.token_bytes[a]), token(tokenizer.token_bytes[b])) for a, b in tokenizer.merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.regex_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tokenizer.special_tokens])
    return backend


def saved_state(folder: Path) -> dict | None:
    """The lmtrain tokenizer state an export wrote into `folder`, or None where there is none."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"{path} is damaged ({type(err).__name__}); export the model again") from err
    if not isinstance(state, dict) or "kind" not in state:
        raise UserError(f"{path} is not a tokenizer state lmtrain wrote; export the model again")
    return state
