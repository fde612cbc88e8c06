"""Our byte-level BPE: exact training, exact encoding, GPT-2's files, the file format and its errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtrain.errors import UserError
from lmtrain.tokenizer.bpe import PATTERNS, BPETokenizer, encode_chunk, from_gpt2_files, splitter
from lmtrain.tokenizer.bpe_naive import naive_merges
from lmtrain.tokenizer.bpe_train import count_chunks, learn_merges, learn_merges_python, train_bpe

from .conftest import MIRROR, SHAKESPEARE

LESSON_CORPUS = "low low low low low lowest lowest newer newer newer wider"
CAT_CORPUS = "the cat sat on the mat. the cat ate the rat."
RUNS = (
    "aaaa aaa a aaaaa bbbb abab ababab aaab " * 3
    + "aa\r\n\r\n   \t tabs\u00e9\u00e9 \U0001f600\U0001f600 e\u0301e\u0301"
)


def corpora():
    shakespeare = SHAKESPEARE.read_text()
    return {
        "lesson": LESSON_CORPUS,
        "cat": CAT_CORPUS,
        "runs": RUNS,
        "shakespeare-40k": shakespeare[:40_000],
        "unicode": "Grüße, 東京は晴れ。 Ünïcödé ñ ñ ñ 😀😀 😀 " * 20 + shakespeare[:3000],
    }


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
@pytest.mark.parametrize("name", ["lesson", "cat", "runs", "shakespeare-40k", "unicode"])
def test_fast_trainer_equals_the_naive_reference(name, pattern):
    text = corpora()[name]
    n_merges = 60 if pattern == "none" and len(text) > 10_000 else 300
    expected = naive_merges([text], n_merges, PATTERNS[pattern])
    chunks = count_chunks([text], pattern)
    assert learn_merges_python(chunks, n_merges) == expected
    assert learn_merges(chunks, n_merges) == expected  # the C++ loop where it is built


def test_native_merge_loop_is_built_and_equals_python_on_shakespeare():
    pytest.importorskip("lmtrain.tokenizer._bpe_native", reason="no C++ compiler at install: Python runs instead")
    chunks = count_chunks([SHAKESPEARE.read_text()], "gpt4")
    assert learn_merges(chunks, 8192 - 256) == learn_merges_python(chunks, 8192 - 256)


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_counting_in_forked_processes_equals_one_process(pattern):
    text = SHAKESPEARE.read_text() + " Grüße 東京 ñ 😀" * 50
    assert count_chunks([text, text[:5000]], pattern, processes=3) == count_chunks([text, text[:5000]], pattern)


ASCII_TEXT = st.text(alphabet=st.characters(max_codepoint=127), max_size=200)


@settings(max_examples=500, deadline=None)
@given(ASCII_TEXT | st.sampled_from(["a  b", "x \nB", "it's 'S 'LL", "12345 a1b2", ":\n\n x", "\x1c \x1f\x0b"]))
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_ascii_fast_path_splits_like_the_unicode_pattern(pattern, text):
    import regex

    assert splitter(pattern, True).findall(text) == regex.findall(PATTERNS[pattern], text)


def test_special_tokens_are_never_split_nor_merged():
    text = ("<|endoftext|>hello world<|endoftext|>" * 30) + CAT_CORPUS * 5
    specials = ["<|endoftext|>"]
    expected = naive_merges([text], 100, PATTERNS["gpt2"], specials)
    tokenizer = train_bpe([text], 256 + 100 + 1, "gpt2", specials)
    assert tokenizer.merges == expected
    eot = tokenizer.special_tokens["<|endoftext|>"]
    assert eot == 256 + len(expected)
    ids = tokenizer.encode("hi<|endoftext|>there")
    assert ids.count(eot) == 1 and tokenizer.decode(ids) == "hi<|endoftext|>there"
    assert all(b"<|" not in tokenizer.token_bytes[t] for t in range(len(tokenizer.token_bytes)))


def test_lesson_exercise_merges_follow_from_the_pair_counts():
    tokenizer = train_bpe([LESSON_CORPUS], 256 + 10, "none")
    as_text = [tokenizer.token_bytes[256 + i].decode() for i in range(len(tokenizer.merges))]
    # ('l','o') and ('o','w') both occur 7 times; the tie goes to the smaller ids: 'l' < 'o'
    assert as_text[:2] == ["lo", "low"]
    assert tokenizer.decode(tokenizer.encode(LESSON_CORPUS)) == LESSON_CORPUS
    cat = train_bpe([CAT_CORPUS], 256 + 20, "none")
    first = [cat.token_bytes[256 + i].decode() for i in range(3)]
    assert first[0] in ("he", "th", "at", " t", "e ") and cat.decode(cat.encode("the cat")) == "the cat"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_round_trip_on_any_unicode(text):
    tokenizer = _shakespeare_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_python(text) == tokenizer.encode(text)


@pytest.mark.parametrize("text", ["", "\r\n\r\n", " " * 500, "e\u0301\u0327", "👩‍👩‍👧 🇫🇷", "\x00\x7f\U0010ffff"])
def test_round_trip_edge_cases(text):
    tokenizer = _shakespeare_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


_CACHE = {}


def _shakespeare_tokenizer(pattern="gpt2", vocab=1024) -> BPETokenizer:
    key = (pattern, vocab)
    if key not in _CACHE:
        _CACHE[key] = train_bpe([SHAKESPEARE.read_text()[:200_000]], vocab, pattern)
    return _CACHE[key]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4", "none"])
def test_python_encoder_equals_tiktoken_backed(pattern):
    tokenizer = _shakespeare_tokenizer(pattern, 600)
    text = SHAKESPEARE.read_text()[200_000:230_000]
    if tokenizer.tiktoken_encoding is not None:
        assert tokenizer.encode_python(text) == tokenizer.tiktoken_encoding.encode(text, allowed_special="all")
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc", min_size=1, max_size=40))
def test_encode_chunk_follows_tiktokens_rule_where_merges_overlap(chunk):
    import tiktoken

    # tokens that two different merges could build, and ranks that disagree with the left-to-right order
    ranks = {bytes([b]): b for b in range(256)} | {
        b"ab": 256,
        b"bc": 257,
        b"abc": 258,
        b"cab": 259,
        b"ca": 260,
        b"aa": 261,
        b"aaa": 262,
        b"cc": 263,
        b"abcab": 264,
    }
    reference = tiktoken.Encoding("overlap", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={})
    assert encode_chunk(chunk.encode(), ranks) == reference.encode_ordinary(chunk)


def test_gpt2_files_encode_exactly_like_tiktoken_on_all_of_shakespeare():
    import tiktoken

    from lmtrain.tokenizer.gpt2 import load_gpt2

    ours = from_gpt2_files(MIRROR / "gpt2")
    reference = load_gpt2(MIRROR.parent / ".unused", MIRROR).encoding
    assert isinstance(reference, tiktoken.Encoding)
    text = SHAKESPEARE.read_text()
    expected = reference.encode_ordinary(text)
    assert len(expected) == 338025
    assert ours.encode(text) == expected
    assert ours.encode_python(text) == expected
    assert ours.vocab_size == 50257 and ours.special_tokens == {"<|endoftext|>": 50256}


def test_save_load_gives_the_same_ids(tmp_path):
    tokenizer = _shakespeare_tokenizer()
    path = tokenizer.save(tmp_path / "tok.json")
    loaded = BPETokenizer.load(path)
    text = SHAKESPEARE.read_text()[-5000:]
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.merges == tokenizer.merges


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda s: s[: len(s) // 2], "truncated"),
        (lambda s: "\xff not json", "truncated"),
        (lambda s: json.dumps({**json.loads(s), "version": 99}), "version 99"),
        (lambda s: json.dumps({**json.loads(s), "format": "other"}), "not an lmtrain"),
        (lambda s: json.dumps({k: v for k, v in json.loads(s).items() if k != "merges"}), "missing"),
        (lambda s: json.dumps({**json.loads(s), "merges": [[1, 99999]]}), "corrupt"),
        (lambda s: json.dumps({**json.loads(s), "byte_ids": [0] * 256}), "corrupt"),
        (lambda s: json.dumps({**json.loads(s), "special_tokens": {"": 3000}}), "special token '' -> 3000"),
        (lambda s: json.dumps({**json.loads(s), "special_tokens": {"<|x|>": 65}}), "special token '<|x|>' -> 65"),
        (lambda s: json.dumps({**json.loads(s), "regex": "(unclosed"}), "regex does not compile"),
    ],
)
def test_bad_tokenizer_files_are_clear_errors(tmp_path, damage, words):
    path = _shakespeare_tokenizer().save(tmp_path / "tok.json")
    path.write_text(damage(path.read_text()))
    with pytest.raises(UserError, match=words):
        BPETokenizer.load(path)


def test_vocab_size_too_small_is_a_clear_error():
    with pytest.raises(UserError, match="vocab size"):
        train_bpe([CAT_CORPUS], 200, "gpt2")


def test_decoding_an_id_outside_the_vocabulary_is_an_error_not_another_token():
    from lmtrain.tokenizer.char import CharTokenizer

    tokenizer = _shakespeare_tokenizer()
    for bad in (-1, tokenizer.vocab_size):
        with pytest.raises(UserError, match=f"token id {bad} is outside the vocabulary"):
            tokenizer.decode([65, bad])
    with pytest.raises(UserError, match="token id -1 is outside the char vocabulary"):
        CharTokenizer("abc").decode([0, -1])
