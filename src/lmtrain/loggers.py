"""TensorBoard as a person reads it: one event file per run, and HPARAMS written once the run has results.

Lightning's TensorBoardLogger closes its writer after the evaluation before training (`trainer.validate`), so
the run's curves are split over two event files, and it writes the HPARAMS row when training starts, with a
NaN point for each metric registered (a run that fails before its first step is a row of NaN). Here the
hyperparameters are kept until RunSummary gives the results: the settings the command line chose first, then
the few that define a run, with the best val loss and bits per character, their step, the final train loss
and tokens/s as metrics.
"""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

DEFINING = (
    "name",
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.block_size",
    "model.dropout",
    "tokenizer._target_",
    "optim.name",
    "optim.max_lr",
    "optim.min_lr",
    "optim.warmup_steps",
    "trainer.max_steps",
    "trainer.batch_size",
    "trainer.accumulate_grad_batches",
    "trainer.precision",
    "seed",
)


class TensorBoard(TensorBoardLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_hparams: dict = {}

    def log_hyperparams(self, params, metrics=None) -> None:
        """Kept (the ones that tell runs apart) for log_results; hparams.yaml gets them all, as Lightning's."""
        params = dict(params)
        chosen = [key for key in overridden_keys() if key in params] + [k for k in DEFINING if k in params]
        self.run_hparams = {key: _scalar(params[key]) for key in dict.fromkeys(chosen)}
        self.hparams.update(params)

    def log_results(self, results: dict[str, float], step: int) -> None:
        """The HPARAMS row of this run: its settings and `results` (hparams/<name>), also as points at `step`."""
        metrics = {f"hparams/{name}": value for name, value in results.items() if value is not None}
        self.log_metrics(metrics, step)
        writer = self.experiment._get_file_writer()
        for summary in hparams(self.run_hparams, metrics):
            writer.add_summary(summary)
        self.experiment.flush()

    def finalize(self, status: str) -> None:
        """Flushed, not closed, so that evaluation before training and training share one event file."""
        if self._experiment is not None:
            self.experiment.flush()
        if status == "success":
            self.save()


def overridden_keys() -> list[str]:
    """The keys set on the command line (a sweep's varying ones among them), when Hydra runs the command."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]


def _scalar(value):
    return value if isinstance(value, (int, float, str, bool)) else str(value)
