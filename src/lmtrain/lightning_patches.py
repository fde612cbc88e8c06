"""What lmtrain needs of Lightning beyond its public API: behaviour no supported option changes yet, patched from
outside, and the layout of its loops' state in a checkpoint. tests/test_lightning_patches.py fails when a
Lightning release renames or removes what is used here, or adds the option that replaces it."""

from __future__ import annotations

import lightning as L


def skip_the_per_batch_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Under DDP, Lightning 2.6 broadcasts a SIGTERM flag from rank 0 after every training batch, a collective with
    a host sync (.item()) each time (Lightning issue #21487). PR #21640 makes its interval an option
    (`Trainer(broadcast_sigterm_every_n_steps=...)`) but is in no release yet. ResumeCheckpoints agrees on a stop
    by signal once per logging interval instead."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def rewind_to_step_start(checkpoint: dict, micro_batches: int) -> None:
    """A checkpoint written `micro_batches` micro-batches into an optimizer step made the one Lightning writes at
    the end of the step before: the loops' counts of those micro-batches, of the step's zero_grad and of the
    batches stepped are taken back, so that a resumed run redoes the whole step."""
    loops = checkpoint["loops"]["fit_loop"]
    batches = loops["epoch_loop.batch_progress"]
    zero_grad = loops["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["zero_grad"]
    for counts in (batches["total"], batches["current"]):
        for key in ("ready", "started", "processed", "completed"):
            counts[key] -= micro_batches
    for counts in (zero_grad["total"], zero_grad["current"]):
        for key in ("ready", "started", "completed"):
            counts[key] -= 1
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
