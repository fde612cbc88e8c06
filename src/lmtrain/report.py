"""Report on runs from what they logged: `python -m lmtrain.report <multirun folder | run folder>`.

A multirun folder: report.md (settings, best val loss and bpc, the step of the best, loss spikes,
divergence, final train/val gap; one row per run) and report.png (train and val loss of every run).
A single run: the lesson's table of what to expect at steps 0, 500, 1000, 2500, 5000, re-measured, and
its checklist answered from the run's own logs. Both files are written into the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError, exit_on_user_error
from .fileio import atomic_write, atomic_write_bytes

Series = list[tuple[int, float]]
LESSON_STEPS = (0, 500, 1000, 2500, 5000)
LN2 = math.log(2)


@dataclass
class Run:
    path: Path
    overrides: list[str]
    scalars: dict[str, Series]
    samples: dict[int, str] = field(default_factory=dict)
    damaged: list[str] = field(default_factory=list)  # what could not be read, said in the report

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, tag: str) -> Series:
        return self.scalars.get(tag, [])


def read_scalars(run_dir: Path, damaged: list[str]) -> dict[str, Series]:
    """Every scalar TensorBoard holds for the run; a step logged twice (a resumed run) keeps its last value.
    TensorBoard's reader stops without a word at a truncated or corrupt record: such files go into `damaged`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    merged: dict[str, dict[int, float]] = {}
    event_files = [p for p in run_dir.rglob("events.out.tfevents.*") if p.is_file()]
    for event_file in sorted(event_files, key=lambda p: p.stat().st_mtime):
        try:
            readable = sum(16 + len(record) for record in RawEventFileLoader(str(event_file)).Load())  # framing
            size = event_file.stat().st_size
        except OSError as err:
            damaged.append(f"{event_file.relative_to(run_dir)} could not be read ({err.strerror}): left out")
            continue
        if readable < size:
            damaged.append(
                f"{event_file.relative_to(run_dir)} is damaged after byte {readable} of {size}: "
                "the points after it are missing"
            )
        reader = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            merged.setdefault(tag, {}).update((e.step, e.value) for e in reader.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def read_samples(run_dir: Path, damaged: list[str]) -> dict[int, str]:
    path = run_dir / "samples.txt"
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        damaged.append(f"samples.txt could not be read ({err.__class__.__name__}): its samples are left out")
        return {}
    blocks = re.split(r"^=== step (\d+) ===\n", text, flags=re.M)
    if blocks[0].strip():
        damaged.append("samples.txt has text before its first '=== step N ===' line: that text is left out")
    return {int(step): sample.strip("\n") for step, sample in zip(blocks[1::2], blocks[2::2])}


def read_overrides(run_dir: Path, damaged: list[str]) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        overrides = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        damaged.append(f".hydra/overrides.yaml could not be read ({err.__class__.__name__}): settings unknown")
        return []
    if overrides is None:
        return []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        damaged.append(".hydra/overrides.yaml is not a list of overrides: settings unknown")
        return []
    return overrides


def load_run(run_dir: Path) -> Run:
    damaged: list[str] = []
    overrides = read_overrides(run_dir, damaged)
    return Run(run_dir, overrides, read_scalars(run_dir, damaged), read_samples(run_dir, damaged), damaged)


def find_runs(folder: Path) -> list[Run]:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a run folder or a multirun folder under outputs/")
    run_dirs = sorted({run_folder(p) for p in folder.rglob("events.out.tfevents.*")}, key=_natural)
    runs = [load_run(d) for d in run_dirs]
    runs = [r for r in runs if r.series("val/loss") or r.series("train/loss")]
    if not runs:
        raise UserError(
            f"no runs with logged losses under {folder}; give the folder of a run or of a multirun "
            "(its jobs write TensorBoard files under <job>/tb)"
        )
    return runs


def run_folder(event_file: Path) -> Path:
    """The run that wrote `event_file`: <run>/tb/<name>/events.out.tfevents.* (before names: <run>/tb/...)."""
    for folder in event_file.parents[1], event_file.parent:
        if folder.name == "tb":
            return folder.parent
    return event_file.parent


def _natural(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


# --- measurements --------------------------------------------------------------------------------
def best(series: Series) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in series if math.isfinite(v)]
    return min(finite, key=lambda point: point[1]) if finite else None


def value_at(series: Series, step: int) -> tuple[int, float] | None:
    """The logged point nearest `step`."""
    return min(series, key=lambda point: abs(point[0] - step)) if series else None


def spikes(series: Series, window: int = 10, factor: float = 1.3) -> list[int]:
    """Steps where the loss jumps above `factor` times the median of the `window` values before it."""
    found = []
    for i in range(window, len(series)):
        median = statistics.median(v for _, v in series[i - window : i])
        if math.isfinite(median) and series[i][1] > factor * median:
            found.append(series[i][0])
    return found


def diverged(series: Series) -> bool:
    """Non-finite, or ending above where it started."""
    values = [v for _, v in series]
    return bool(values) and (not all(map(math.isfinite, values)) or values[-1] > values[0])


def gap_at(run: Run, step: int) -> float | None:
    val, train = value_at(run.series("val/loss"), step), value_at(run.series("train/eval_loss"), step)
    return val[1] - train[1] if val and train else None


def chars_per_token(run: Run, split: str = "val") -> float | None:
    loss_tag, bpc_tag = ("val/loss", "val/bpc") if split == "val" else ("train/eval_loss", "train/eval_bpc")
    loss, bpc = run.series(loss_tag), dict(run.series(bpc_tag))
    for step, value in loss:
        if step in bpc and bpc[step] > 0:
            return value / LN2 / bpc[step]
    return None


# --- multirun ------------------------------------------------------------------------------------
def varying_settings(runs: list[Run]) -> list[str]:
    """For each run, the overrides that differ between the runs (all of them for a single run)."""
    if len(runs) == 1:
        return [" ".join(runs[0].overrides)]
    common = set.intersection(*(set(r.overrides) for r in runs))
    return [" ".join(o for o in r.overrides if o not in common) or "(same)" for r in runs]


def multirun_table(runs: list[Run]) -> str:
    lines = [
        "| run | settings | best val loss | best val bpc | step of best | loss spikes | diverged | final val - train |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, settings in zip(runs, varying_settings(runs)):
        top = best(run.series("val/loss"))
        bpc = dict(run.series("val/bpc")).get(top[0]) if top else None
        train = run.series("train/loss")
        final_step = run.series("val/loss")[-1][0] if run.series("val/loss") else None
        gap = gap_at(run, final_step) if final_step is not None else None
        found = spikes(train)
        lines.append(
            f"| {run.name} | {settings} | {_num(top and top[1])} | {_num(bpc)} | {top[0] if top else '-'} | "
            f"{len(found)}{' (' + ', '.join(map(str, found[:5])) + ')' if found else ''} | "
            f"{'yes' if diverged(train) else 'no'} | {_num(gap)} |"
        )
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_runs(runs: list[Run], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    for i, (run, settings) in enumerate(zip(runs, varying_settings(runs))):
        color = f"C{i % 10}"
        for tag, style in (("train/loss", "-"), ("val/loss", "--")):
            points = [(s, v) for s, v in run.series(tag) if math.isfinite(v)]
            if points:
                steps, values = zip(*points)
                label = f"{run.name} {settings} {'train' if tag == 'train/loss' else 'val'}"
                ax.plot(steps, values, style, color=color, label=label, alpha=0.9 if style == "--" else 0.6)
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


# --- one run: the lesson's table and checklist ---------------------------------------------------
def lesson_table(run: Run) -> str:
    val_cpt, train_cpt = chars_per_token(run, "val"), chars_per_token(run, "train")
    last = max((s for s, _ in run.series("train/loss") + run.series("val/loss")), default=0)
    lines = [
        "| step | train loss | val loss | train bpc | val bpc | sample nearest the step |",
        "|---|---|---|---|---|---|",
    ]
    for step in (s for s in LESSON_STEPS if s <= last):
        # measured like the lesson's estimate_loss: no dropout, at the evaluation steps
        train = value_at(run.series("train/eval_loss") or run.series("train/loss"), step)
        val = value_at(run.series("val/loss"), step)
        sample_step = min(run.samples, key=lambda s: abs(s - step)) if run.samples else None
        sample = run.samples.get(sample_step, "").replace("\n", " / ")[:120].replace("|", "¦")
        lines.append(
            f"| {step} | {_at(train)} | {_at(val)} | {_bpc(train, train_cpt)} | {_bpc(val, val_cpt)} | "
            f"{'(step ' + str(sample_step) + ') ' + sample if sample_step is not None else '-'} |"
        )
    return "\n".join(lines) + "\n"


def _at(point) -> str:
    return "-" if point is None else f"{point[1]:.3f} (step {point[0]})"


def _bpc(point, cpt) -> str:
    return "-" if point is None or cpt is None else f"{point[1] / LN2 / cpt:.3f}"


def speaker_names(sample: str) -> set[str]:
    """Speaker lines ("NAME:") the model wrote itself: the prompt's first line is left out."""
    generated = sample.split("\n", 1)[1] if "\n" in sample else ""
    return set(re.findall(r"^([A-Z][A-Z' ]{2,}):$", generated, flags=re.M))


def checklist(run: Run, corpus: str | None) -> list[tuple[str, str, bool]]:
    """(check, measured, passed) for the lesson's checkpoint list, from the run's own logs."""
    items = []
    early = [(s, v) for s, v in run.series("train/loss") if s <= 2000]
    low = best(early)
    cpt = chars_per_token(run, "train")
    if low:
        items.append(
            (
                "train loss below 2.0 within 2000 steps (nats per token)",
                f"lowest {low[1]:.3f} at step {low[0]}",
                low[1] < 2.0,
            )
        )
        if cpt:
            items.append(
                (
                    "train loss below 2.0 within 2000 steps (nats per character)",
                    f"lowest {low[1] / cpt:.3f} at step {low[0]} ({cpt:.2f} chars/token)",
                    low[1] / cpt < 2.0,
                )
            )
    top = best(run.series("val/loss"))
    if top:
        gap = gap_at(run, top[0])
        if gap is not None:
            items.append(
                (
                    "val loss tracks train loss: gap < 0.5 at the best checkpoint",
                    f"val - train = {gap:.3f} nats at step {top[0]}",
                    gap < 0.5,
                )
            )
    names = set().union(*(speaker_names(text) for text in run.samples.values())) if run.samples else set()
    known = {n for n in names if corpus is None or f"\n{n}:\n" in corpus}
    items.append(("samples contain recognisable character names", ", ".join(sorted(known)[:8]) or "none", bool(known)))
    return items


def corpus_of(run: Run) -> str | None:
    """The run's training text, where the data cache or mirror still has it."""
    config_file = run.path / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return None
    from omegaconf import OmegaConf

    from .data.corpus import load_text

    try:
        data = OmegaConf.load(config_file).data
        mirror = data.get("mirror")
        return load_text(
            data.name,
            data.get("path"),
            Path(data.cache_dir).expanduser(),
            Path(mirror).expanduser() if mirror else None,
        )
    except (UserError, OSError, Exception):  # noqa: BLE001 - the names check then accepts any speaker line
        return None


def fine_tuned_line(run: Run) -> str:
    """A run fine-tuned from pretrained weights (model.init_from): its best val bpc, the figure that compares it
    with runs trained from scratch on any tokenizer ("" for those runs themselves)."""
    try:
        model = yaml.safe_load((run.path / ".hydra" / "config.yaml").read_text(encoding="utf-8"))["model"]
        init_from = model.get("init_from")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return ""
    top = best(run.series("val/loss"))
    bpc = dict(run.series("val/bpc")).get(top[0]) if top else None
    if not init_from or bpc is None:
        return ""
    return (
        f"Fine-tuned from `{init_from}` (model.init_from): best val bpc {bpc:.3f} at step {top[0]}, in bits per "
        "character as the runs trained from scratch state theirs (nats per token depend on the tokenizer).\n\n"
    )


def failed_jobs_section(folder: Path) -> str:
    """The sweep's failed jobs, as lmtrain.sweeps records them in failed_jobs.json (none: no section)."""
    path = folder / "failed_jobs.json"
    if not path.is_file():
        return ""
    try:
        jobs = json.loads(path.read_text(encoding="utf-8"))
        rows = [f"| {j['job']} | `{' '.join(j['overrides'])}` | {j['error']} |\n" for j in jobs]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        print(f"warning: {path} could not be read ({err.__class__.__name__}): failed jobs not listed", file=sys.stderr)
        return ""
    return f"\n## Failed jobs ({len(rows)})\n\n| job | overrides | error |\n|---|---|---|\n" + "".join(rows)


# --- the command ---------------------------------------------------------------------------------
def report(folder: Path) -> Path:
    runs = find_runs(folder)
    out_md, out_png = folder / "report.md", folder / "report.png"
    if len(runs) == 1 and runs[0].path == folder:
        run = runs[0]
        corpus = corpus_of(run)
        items = checklist(run, corpus)
        text = (
            f"# Run {folder}\n\n{' '.join(run.overrides) or '(no overrides)'}\n\n"
            + fine_tuned_line(run)
            + "## The lesson's table, re-measured\n\n"
            + lesson_table(run)
            + "\n## The lesson's checklist\n\n| check | measured | result |\n|---|---|---|\n"
            + "".join(f"| {what} | {measured} | {'pass' if ok else 'FAIL'} |\n" for what, measured, ok in items)
        )
    else:
        text = f"# Multirun {folder}\n\n{len(runs)} runs.\n\n" + multirun_table(runs) + failed_jobs_section(folder)
    damaged = [f"{run.name}: {what}" if run.path != folder else what for run in runs for what in run.damaged]
    if damaged:
        text += "\n## Files that could not be read whole\n\n" + "".join(f"- {what}\n" for what in damaged)
        for what in damaged:
            print(f"warning: {what}", file=sys.stderr)
    text += f"\n![train and val loss]({out_png.name})\n"
    atomic_write_bytes(out_md, text.encode())
    plot_runs(runs, out_png, title=str(folder))
    print(text)
    print(f"wrote {out_md} and {out_png}", file=sys.stderr)
    return out_md


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        report(args.folder)


if __name__ == "__main__":
    main()
