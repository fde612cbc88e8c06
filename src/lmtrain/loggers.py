"""TensorBoard as a person reads it: runs named by what sets them apart, one event file per run, and HPARAMS
written once the run has results.

TensorBoard names a run by the folder of its event files, relative to the folder it was pointed at: here
`<run>/tb/<name>`, the name being the command line's overrides with the experiment as its name (`smoke`,
`smoke,trainer.max_steps=500`, a sweep's job `optim.warmup_steps=0,optim.max_lr=3e-4`), where it was `<run>/tb`
for every run. A resumed run continues the TensorBoard run in its folder.

Lightning's TensorBoardLogger closes its writer after the evaluation before training (`trainer.validate`), so
the run's curves are split over two event files, and it writes the HPARAMS row when training starts, with a
NaN point for each metric registered (a run that fails before its first step is a row of NaN). Here the
hyperparameters are kept until RunSummary gives the results: the settings the command line chose first, then
the few that define a run, with the best val loss and bits per character, their step, the final train loss
and tokens/s as metrics.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

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


NAMED_BY_THE_RUN = ("experiment", "name")  # overrides given as the run's name
MAX_NAME_BYTES = 200  # a file name has 255 at most


class TensorBoard(TensorBoardLogger):
    """Lightning's TensorBoardLogger; without a `version`, the event files go to `<save_dir>/<name>/<run's name>`,
    or to the folder a run in `save_dir` already wrote them to (it is being resumed)."""

    def __init__(self, save_dir: str, run_name: str, name: str = "tb", version: str | None = None, **kwargs):
        continued = continued_version(Path(save_dir) / name) if version is None else version
        version = continued if continued is not None else run_folder_name(run_name, command_overrides())
        super().__init__(save_dir, name=name, version=version, **kwargs)
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


def command_overrides() -> list[str]:
    """The command line's overrides (a sweep's job: with its own values), when Hydra runs the command."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def overridden_keys() -> list[str]:
    """The keys set on the command line (a sweep's varying ones among them)."""
    return [_key(o) for o in command_overrides() if "=" in o]


def run_folder_name(run_name: str, overrides: list[str]) -> str:
    """The overrides joined by commas, `experiment=`/`name=` as `run_name`, the name alone without overrides; a
    character a file name may not hold is "_", and a name too long is cut, with a hash of the whole after it."""
    parts = [run_name if _key(o) in NAMED_BY_THE_RUN else o for o in overrides] or [run_name]
    name = re.sub(r"^\.", "_", re.sub(r"[^\w.,=+\-@%~\[\](){}]", "_", ",".join(dict.fromkeys(parts))))
    if len(name.encode()) > MAX_NAME_BYTES:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_NAME_BYTES - 11].decode(errors="ignore") + "-" + digest
    return name


def continued_version(root: Path) -> str | None:
    """The folder under `root` (relative; "" for root itself) of the newest event file there, if any."""
    events = [p for p in root.glob("**/events.out.tfevents.*") if p.is_file()]
    if not events:
        return None
    folder = max(events, key=lambda p: p.stat().st_mtime).parent.relative_to(root)
    return "" if folder == Path(".") else folder.as_posix()


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _scalar(value):
    return value if isinstance(value, (int, float, str, bool)) else str(value)
