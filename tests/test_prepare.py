"""lmtrain.prepare and data=prepared: deterministic shards for any worker count, exact resume after a kill,
windows across shards from the seeded generator, TinyShakespeare's figures unchanged, each bad input one line."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtrain.data import shards as shards_module
from lmtrain.data.corpus import prepare_corpus
from lmtrain.data.datamodule import PreparedDataModule
from lmtrain.data.shards import open_prepared
from lmtrain.data.windows import DeviceTokens, HostTokens, RandomWindows
from lmtrain.errors import UserError
from lmtrain.prepare import prepare
from lmtrain.tokenizer import gpt2

from .conftest import MIRROR, REPO, SHAKESPEARE, compose, run_cli


def make_corpus(folder: Path, megabytes: float = 2.5, seed: int = 0) -> Path:
    """Documents cut from TinyShakespeare in every input format: jsonl, jsonl.gz, txt, md, parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, rng = SHAKESPEARE.read_text(encoding="utf-8"), random.Random(seed)

    def documents(n_bytes: int) -> list[str]:
        out, size = [], 0
        while size < n_bytes:
            start = rng.randrange(len(source) - 6000)
            out.append(source[start : start + rng.randrange(200, 6000)])
            size += len(out[-1])
        return out

    part = int(megabytes * 1e6 / 5)
    (folder / "sub").mkdir(parents=True)
    lines = [json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents(2 * part))]
    (folder / "a.jsonl").write_text("".join(lines))
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents(part))
    for i, doc in enumerate(documents(part)):
        (folder / "sub" / f"book-{i:03d}.{'md' if i % 2 else 'txt'}").write_text(doc)
    pq.write_table(pa.table({"text": documents(part)}), folder / "c.parquet", row_group_size=50)
    (folder / "empty.txt").write_text("")
    (folder / "notes.csv").write_text("ignored,because,csv\n")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "in")


def run_prepare(source: Path, out: Path, *overrides: str) -> dict:
    prepare(
        compose(
            f"data.path={source}", f"out={out}", "progress=false", "data.chunk_mb=1", *overrides, config_name="prepare"
        )
    )
    return json.loads((out / "manifest.json").read_text())


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "one-worker"
    run_prepare(corpus, out, "data.workers=1")
    return out


def test_the_same_inputs_give_the_same_shards_for_any_worker_count(corpus, prepared, tmp_path):
    manifest = run_prepare(corpus, tmp_path / "three", "data.workers=3")
    assert file_hashes(tmp_path / "three") == file_hashes(prepared)
    assert manifest["splits"]["train"]["shards"] >= 3 and manifest["dtype"] == "uint16"
    assert {f["path"] for f in manifest["inputs"]["files"]} >= {"a.jsonl", "b.jsonl.gz", "c.parquet", "empty.txt"}
    assert "notes.csv" not in {f["path"] for f in manifest["inputs"]["files"]}
    assert manifest["inputs"]["empty_files"] == 1


def test_the_manifest_counts_every_document_and_ends_each_with_end_of_text(corpus, prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    tokenizer = gpt2.load_gpt2(Path(os.environ["LMTRAIN_CACHE"]), MIRROR)
    texts = [json.loads(line)["text"] for line in (corpus / "a.jsonl").read_text().splitlines()]
    texts += [json.loads(line)["text"] for line in gzip.open(corpus / "b.jsonl.gz", "rt").read().splitlines()]
    texts += [p.read_text() for p in sorted((corpus / "sub").iterdir())]
    import pyarrow.parquet as pq

    texts += pq.read_table(corpus / "c.parquet").column("text").to_pylist()
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(texts)
    assert splits["train"]["characters"] + splits["val"]["characters"] == sum(len(t) for t in texts)
    assert 0.03 < splits["val"]["documents"] / len(texts) < 0.2  # val_fraction 0.1, drawn per document
    corpus_ids = open_prepared(prepared)
    ids = np.concatenate([*corpus_ids.shards["train"], *corpus_ids.shards["val"]])
    assert (ids == 50256).sum() == len(texts)
    assert len(ids) == sum(len(tokenizer.encode(t)) + 1 for t in texts)
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["separator"] == [50256]


def test_tinyshakespeare_prepared_keeps_the_character_split_and_the_same_ids(tmp_path):
    manifest = run_prepare(SHAKESPEARE, tmp_path / "ts")
    corpus = prepare_corpus(
        name="shakespeare",
        path=None,
        cache_dir=Path(os.environ["LMTRAIN_CACHE"]),
        mirror=MIRROR,
        val_fraction=0.1,
        block_size=256,
        make_tokenizer=gpt2.build,
    )
    prepared = open_prepared(tmp_path / "ts")
    assert manifest["split_by"] == "characters" and manifest["splits"]["train"]["shards"] >= 1
    assert np.array_equal(np.concatenate(prepared.shards["train"]), corpus.train_ids)
    assert np.array_equal(np.concatenate(prepared.shards["val"]), corpus.val_ids)
    assert manifest["splits"]["val"]["characters"] == corpus.chars["val"]


@pytest.mark.slow
def test_data_prepared_trains_as_data_shakespeare_does(tmp_path):
    """Same ids, same validation windows, same first losses."""
    run_prepare(SHAKESPEARE, tmp_path / "ts")
    common = [
        "experiment=smoke",
        "tokenizer=gpt2",
        "trainer.max_steps=4",
        "trainer.eval_interval=2",
        "optim.warmup_steps=0",
    ]
    summaries = []
    for name, data in (("text", ["data=shakespeare"]), ("prepared", ["data=prepared", f"data.path={tmp_path}/ts"])):
        result = run_cli("lmtrain.train", *common, *data, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-2000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert summaries[0]["best_val_loss"] == summaries[1]["best_val_loss"]
    assert summaries[0]["best_val_bpc"] == summaries[1]["best_val_bpc"]


@pytest.mark.slow
def test_a_killed_prepare_run_again_ends_with_the_same_files(corpus, prepared, tmp_path):
    out = tmp_path / "killed"
    assert subprocess_prepare(corpus, out, stop_after_records=2) is not None, "prepare finished before the kill"
    assert not (out / "manifest.json").exists() and len(list((out / ".prepare" / "done").glob("*.json"))) >= 2
    (out / "train" / "999999.bin.partial").write_bytes(b"\0" * 100)  # as a piece being written leaves it
    run_prepare(corpus, out, "data.workers=2")
    assert file_hashes(out) == file_hashes(prepared)
    assert not (out / ".prepare").exists() and not list(out.rglob("*.partial"))


@pytest.mark.slow
def test_sigterm_stops_prepare_with_143_and_leaves_no_worker(corpus, prepared, tmp_path):
    out = tmp_path / "terminated"
    assert subprocess_prepare(corpus, out, stop_after_records=1, signum=signal.SIGTERM, workers=2) == 143
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the pool's workers were stopped with their parent
        os.killpg(subprocess_prepare.last_group, 0)
    run_prepare(corpus, out)
    assert file_hashes(out) == file_hashes(prepared)


def subprocess_prepare(
    corpus: Path, out: Path, stop_after_records: int, signum: int = signal.SIGKILL, workers: int = 1
) -> int | None:
    """Start prepare in its own process group and, once pieces are recorded, SIGKILL the whole group (or send
    `signum` to prepare's own process): its exit code, None if it finished first."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmtrain.prepare",
            f"data.path={corpus}",
            f"out={out}",
            "progress=false",
            "data.chunk_mb=1",
            f"data.workers={workers}",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    subprocess_prepare.last_group = process.pid
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((out / ".prepare" / "done").glob("*.json"))) >= stop_after_records:
            if signum == signal.SIGKILL:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(signum)
            code = process.wait(timeout=60)
            return 128 + signum if code == -signum else code
        time.sleep(0.02)
    process.kill()
    return None


def test_windows_across_shards_are_the_concatenation_s_and_follow_the_seed(prepared):
    corpus = open_prepared(prepared)
    shards = corpus.shards["train"]
    host = HostTokens(shards, torch.device("cpu"))
    device = DeviceTokens(torch.from_numpy(np.concatenate(shards).astype(np.int32)))
    boundary = len(shards[0])
    starts = torch.tensor([0, boundary - 5, boundary - 40, len(host) - 41])  # inside, and across a shard's end
    for a, b in zip(host.windows(starts, 40), device.windows(starts, 40)):
        assert torch.equal(a, b)

    def batches(first):
        windows = RandomWindows(host, 40, 8, seed=3, num_batches=6, first_batch=lambda: first)
        return [x for x, _ in windows]

    full, resumed = batches(0), batches(4)
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(full[4:], resumed))
    assert not torch.equal(full[0], full[1])


def test_the_data_module_gives_the_same_batches_mapped_or_resident(prepared):
    def first_batches(on_device):
        module = PreparedDataModule(
            tokenizer=gpt2.build,
            path=str(prepared),
            on_device=on_device,
            block_size=32,
            batch_size=4,
            train_batches=3,
            eval_batches=2,
            seed=1,
            eval_train=False,
            mirror=str(MIRROR),
            cache_dir=os.environ["LMTRAIN_CACHE"],
        )
        module.setup("fit")
        kinds = {type(t) for t in module._tokens.values()}
        train = [x for x, _ in module.train_dataloader()]
        val = [x for x, _ in module.val_dataloader()[0]]
        return kinds, train, val, module

    host_kinds, host_train, host_val, module = first_batches(False)
    device_kinds, device_train, device_val, _ = first_batches(True)
    assert host_kinds == {HostTokens} and device_kinds == {DeviceTokens}
    assert all(torch.equal(a, b) for a, b in zip(host_train + host_val, device_train + device_val))
    assert 3.0 < module.chars_per_token("val") < 5.0 and module.bytes_per_token("val") >= module.chars_per_token("val")


# --- bad input --------------------------------------------------------------------------------------------
def prepare_error(source: Path, out: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as err:
        run_prepare(source, out, *overrides)
    return str(err.value)


def test_undecodable_bytes_are_named_with_their_offset_and_replace_goes_on(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("hello there\n" * 50)
    (tmp_path / "in" / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    message = prepare_error(tmp_path / "in", tmp_path / "out")
    assert "bad.txt" in message and "offset 3" in message and "data.errors=replace" in message
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = run_prepare(tmp_path / "in", tmp_path / "out2", "data.errors=replace", "data.val_fraction=0.5")
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 2


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"a.jsonl": '{"body": "x"}\n'}, "no text field 'text' (it has: body); set data.text_field"),
        ({"a.jsonl": '{"text": "x"\n'}, "the line at byte 0 is not JSON"),
        ({"a.csv": "x,y\n", "b.bin": "z"}, "holds no readable files"),
        ({"a.txt": "", "b.jsonl": ""}, "holds only empty files"),
        ({"a.parquet": None}, "no column 'text'"),
        ({"a.parquet": "not parquet"}, "is not a readable parquet file"),
    ],
)
def test_unreadable_inputs_are_one_line(tmp_path, files, expected):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "in").mkdir()
    for name, text in files.items():
        if text is None:
            pq.write_table(pa.table({"content": ["x"]}), tmp_path / "in" / name)
        else:
            (tmp_path / "in" / name).write_text(text)
    assert expected in prepare_error(tmp_path / "in", tmp_path / "out")


def test_an_empty_split_is_an_error_naming_the_fix(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "only one document"}) + "\n")
    assert "change data.val_fraction" in prepare_error(tmp_path / "in", tmp_path / "out")


def test_out_holding_something_else_is_never_overwritten(corpus, prepared, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    assert "is not empty and is no lmtrain.prepare folder" in prepare_error(corpus, tmp_path / "out")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"
    assert "prepared from other inputs or settings" in prepare_error(corpus, prepared, "data.val_fraction=0.2")
    before = file_hashes(prepared)
    run_prepare(corpus, prepared, "data.workers=1")  # the same settings: done already, nothing rewritten
    assert file_hashes(prepared) == before


def test_a_full_disk_keeps_the_finished_shards_and_the_same_command_resumes(corpus, prepared, tmp_path, monkeypatch):
    writes = {"n": 0}
    original = shards_module.ShardWriter.write

    def write(self, ids):
        writes["n"] += 1
        if writes["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, ids)

    monkeypatch.setattr(shards_module.ShardWriter, "write", write)
    message = prepare_error(corpus, tmp_path / "out", "data.workers=1")
    assert "the disk is full" in message and "run the same command" in message
    assert list((tmp_path / "out" / ".prepare" / "done").glob("*.json"))  # finished pieces kept
    assert not list((tmp_path / "out").rglob("*.partial")) and not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(shards_module.ShardWriter, "write", original)
    run_prepare(corpus, tmp_path / "out", "data.workers=1")
    assert file_hashes(tmp_path / "out") == file_hashes(prepared)


def test_training_refuses_an_unfinished_a_changed_or_a_mismatched_folder(corpus, prepared, tmp_path):
    import shutil

    def opened(folder, tokenizer=gpt2.build):
        return PreparedDataModule(
            tokenizer=tokenizer,
            path=str(folder),
            block_size=32,
            batch_size=4,
            train_batches=1,
            eval_batches=1,
            seed=1,
            mirror=str(MIRROR),
            cache_dir=os.environ["LMTRAIN_CACHE"],
        ).prepared

    unfinished = tmp_path / "unfinished"
    shutil.copytree(prepared, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(UserError, match="unfinished preparation"):
        opened(unfinished)
    with pytest.raises(UserError, match="not a folder written by"):
        opened(corpus)
    changed = tmp_path / "changed"
    shutil.copytree(prepared, changed)
    shard = next((changed / "train").glob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its sha256"):
        opened(changed)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match="the manifest says"):
        opened(changed)
    from lmtrain.tokenizer import char

    with pytest.raises(UserError, match="prepared with tokenizer=gpt2.*asks for tokenizer=char"):
        opened(prepared, char.build)


@pytest.mark.slow
def test_training_on_an_unfinished_folder_is_one_line_exit_2(prepared, tmp_path):
    import shutil

    shutil.copytree(prepared, tmp_path / "p")
    (tmp_path / "p" / "manifest.json").unlink()
    result = run_cli(
        "lmtrain.train",
        "experiment=smoke",
        "data=prepared",
        f"data.path={tmp_path / 'p'}",
        "tokenizer=gpt2",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "run the same lmtrain.prepare command again" in result.stderr.strip().splitlines()[-1]


def test_a_hugging_face_dataset_is_read_through_datasets(corpus, tmp_path):
    """Offline: datasets' own json builder over local files, the code path of data.path=hf:NAME."""
    pytest.importorskip("datasets", reason="the optional extra .[hf]")
    manifest = run_prepare("hf:json", tmp_path / "hf", f"data.hf_data_files={corpus / 'a.jsonl'}")
    texts = [json.loads(line)["text"] for line in (corpus / "a.jsonl").read_text().splitlines()]
    splits = manifest["splits"]
    assert splits["train"]["characters"] + splits["val"]["characters"] == sum(len(t) for t in texts)
