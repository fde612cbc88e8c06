"""What lmtrain.lightning_patches patches is still what the installed Lightning runs, and no option replaces it."""

from __future__ import annotations

import inspect

import lightning as L

from lmtrain.lightning_patches import skip_the_per_batch_sigterm_broadcast


def test_the_per_batch_sigterm_broadcast_is_still_there_to_skip():
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    loop = type(trainer.fit_loop.epoch_loop)
    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(loop.advance), (
        f"lightning {L.__version__}: {loop.__name__}.advance no longer calls _broadcast_sigterm_tensor, so "
        "lmtrain.lightning_patches.skip_the_per_batch_sigterm_broadcast patches nothing; see whether Lightning "
        "issue #21487 is fixed, and change or delete the patch"
    )
    skip_the_per_batch_sigterm_broadcast(trainer)
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None


def test_no_trainer_option_replaces_the_patch_yet():
    assert "broadcast_sigterm_every_n_steps" not in inspect.signature(L.Trainer).parameters, (
        f"lightning {L.__version__} has Trainer(broadcast_sigterm_every_n_steps=...) (PR #21640, issue #21487): "
        "pass it in build.build_trainer and delete lmtrain.lightning_patches"
    )
