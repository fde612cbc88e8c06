"""The docs keep up with the code: a row in docs/options.md per schema key, a Layout line per module."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

from lmtrain import config

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {"_target_", "_partial_"}


def schema_keys(schema, prefix: str = "") -> set[str]:
    keys = set()
    for f in fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys |= schema_keys(type(default), f"{prefix}{f.name}.")
        elif f.name not in SKIPPED:
            keys.add(prefix + f.name)
    return keys


def documented(section: str) -> set[str]:
    """The keys in the first column of the tables under the `## <section>` heading of docs/options.md."""
    text = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    body = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", body, flags=re.MULTILINE))


def test_every_training_key_has_a_row_in_the_options_table():
    keys = schema_keys(config.TrainConfig) - {"tokenizer"}
    for tokenizer in (config.BPETokenizerConfig, config.SentencePieceTokenizerConfig):
        keys |= schema_keys(tokenizer, "tokenizer.")
    missing = keys - documented("python -m lmtrain.train")
    assert not missing, f"docs/options.md has no row for {sorted(missing)}"


def test_every_sample_and_schedule_key_has_a_row():
    assert not schema_keys(config.SampleConfig) - documented("python -m lmtrain.sample")
    schedule_only = schema_keys(config.ScheduleConfig) - schema_keys(config.TrainConfig)
    assert not schedule_only - documented("python -m lmtrain.schedule")


def test_every_option_row_names_a_real_key():
    keys = schema_keys(config.TrainConfig) | schema_keys(config.BPETokenizerConfig, "tokenizer.")
    keys |= schema_keys(config.SentencePieceTokenizerConfig, "tokenizer.")
    stale = documented("python -m lmtrain.train") - keys
    assert not stale, f"docs/options.md documents keys that do not exist: {sorted(stale)}"


def test_the_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1]
    package = REPO / "src" / "lmtrain"
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*") if p.suffix in (".py", ".cpp")]
    modules = [m for m in modules if m not in ("__init__.py", "data/__init__.py", "tokenizer/__init__.py")]
    missing = [m for m in modules if not re.search(rf"(^|\s){re.escape(m)}\s", layout, flags=re.MULTILINE)]
    missing = [m for m in missing if not (m.endswith(".cpp") and Path(m).name in layout)]
    assert not missing, f"the README's Layout does not name {missing}"


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150
