"""Writes on a real full disk and a real read-only folder: one line naming the folder and the fix, exit 2,
no temporary file left, the previous file intact. The file systems are small tmpfs mounts (root only)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from lmtrain.errors import UserError
from lmtrain.fileio import atomic_write, atomic_write_bytes, writable_folder

from .conftest import run_cli


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs at a folder of tmp_path, unmounted after the test."""
    mounted = []

    def make(options: str) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary_one(mount):
    disk = mount("size=256k")
    target = disk / "weights.ckpt"
    atomic_write(target, lambda f: torch.save({"w": torch.zeros(1000)}, f))
    before = target.read_bytes()
    with pytest.raises(UserError, match=r"weights.ckpt in .*fs0: the disk is full.*previous file is intact"):
        atomic_write(target, lambda f: torch.save({"w": torch.zeros(200_000)}, f))  # torch.save: a RuntimeError
    with pytest.raises(UserError, match="the disk is full"):
        atomic_write_bytes(disk / "other.bin", b"x" * 400_000)  # a plain write: ENOSPC
    assert target.read_bytes() == before
    assert sorted(p.name for p in disk.iterdir()) == ["weights.ckpt"]


def test_a_writer_bug_is_not_reported_as_a_disk_problem(tmp_path):
    def broken(f):
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        atomic_write(tmp_path / "x.bin", broken)
    assert list(tmp_path.iterdir()) == []


def test_a_training_run_that_fills_its_disk_stops_with_one_line(mount):
    disk = mount("size=600k")  # best.ckpt fits, the first full checkpoint does not
    result = run_cli("lmtrain.train", "experiment=smoke", f"hydra.run.dir={disk}/run", "trainer.max_steps=20")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the disk is full" in result.stderr.strip().splitlines()[-1]
    assert not [p for p in disk.rglob("*") if ".tmp-" in p.name]


def test_read_only_folders_are_named_before_any_work_is_lost(mount, tmp_path):
    readonly = mount("size=64k,ro")
    with pytest.raises(UserError, match=r"cannot write in .*fs0/sub: the folder is not writable"):
        writable_folder(readonly / "sub")
    text = tmp_path / "t.txt"
    text.write_text("low lower lowest " * 50)
    for module, args in (
        ("lmtrain.tokenizer", ["train", str(text), "--vocab-size", "260", "--out", f"{readonly}/tok.json"]),
        ("lmtrain.schedule", [f"out={readonly}/lr.png"]),
        ("lmtrain.train", ["experiment=smoke", f"hydra.run.dir={readonly}/run"]),
    ):
        result = run_cli(module, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (module, result.stderr[-2000:])
        assert "not writable" in result.stderr.strip().splitlines()[-1], module


def test_a_second_run_into_a_folder_in_use_stops_with_one_line(tmp_path):
    from lmtrain.fileio import run_folder_lock

    with run_folder_lock(tmp_path):
        result = run_cli("lmtrain.train", "experiment=smoke", f"hydra.run.dir={tmp_path}", "trainer.max_steps=20")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"another run (pid {os.getpid()}) is writing {tmp_path}" in result.stderr
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tb").exists()
    with run_folder_lock(tmp_path):  # released with its holder
        pass
