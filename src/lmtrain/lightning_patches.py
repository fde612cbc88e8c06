"""Lightning behaviour that no supported option changes yet, patched from outside; tests/test_lightning_patches.py
fails when a Lightning release renames or removes what is patched here, or adds the option that replaces it."""

from __future__ import annotations

import lightning as L


def skip_the_per_batch_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Under DDP, Lightning 2.6 broadcasts a SIGTERM flag from rank 0 after every training batch, a collective with
    a host sync (.item()) each time (Lightning issue #21487). PR #21640 makes its interval an option
    (`Trainer(broadcast_sigterm_every_n_steps=...)`) but is in no release yet. ResumeCheckpoints agrees on a stop
    by signal once per logging interval instead."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
