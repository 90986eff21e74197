"""tinv-report's content (the command is tinv.commands.report): one table of a sweep's jobs and a few plots, from the
jobs' own files.

Reads each job's summary.json and metrics.jsonl (no wandb needed) and writes, into the sweep folder:
report.md and report.csv (best objective first, failed jobs last; columns nobody filled left out), loss_curves.png
(each job's train/loss in a panel of its own, best first), objective_curves.png (the objective's metric over the
steps where it was measured, when it was measured more than once) and objective_vs_<param>.png for each parameter
the sweep varied. report.md links the plots.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from ..atomic import atomic_path, write_text_atomic
from ..commandline import override_key, override_value
from ..console import number
from ..tracking import read_metrics, summary_or_why

COLUMNS = ["rank", "job", "overrides", "objective", "objective_name", "objective_mode", "final_loss", "best_step",
           "steps", "wall_s", "embedding", "status"]
# summary numbers that are bookkeeping, not results; every other number a job reports (best_val_loss, a callback's
# scores such as concept_accuracy) gets a column after the objective's
BOOKKEEPING = {"ok", "objective", "final_loss", "best_step", "step", "wall_s", "started_at", "finished_at",
               "bad_steps", "job_num", "resumed_at_step", "kept_step", "wandb_stopped_at_step"}


@dataclass
class Job:
    folder: Path
    summary: dict
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]

    @property
    def metric(self) -> str | None:
        """The metric behind the objective ("best val/loss" -> val/loss)."""
        name = self.summary.get("objective_name") or ""
        return name.split(" ", 1)[1] if " " in name else None

    @property
    def ok(self) -> bool:
        return bool(self.summary.get("ok")) and self.objective is not None

    @property
    def objective(self) -> float | None:
        value = self.summary.get("objective", self.summary.get("final_loss"))
        return value if isinstance(value, (int, float)) and math.isfinite(value) else None

    @property
    def better_first(self) -> float:
        """Sort key: best job first, whichever way its objective is better (objective_mode)."""
        return -self.objective if self.summary.get("objective_mode") == "max" else self.objective

    @property
    def params(self) -> dict[str, str]:
        pairs = ((override_key(o), override_value(o)) for o in self.summary.get("overrides", []) if "=" in o)
        return {k: v for k, v in pairs if k != "resume" and not k.startswith("hydra.")}  # how it ran, not what


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The folders under `sweep_dir` that hold a job (its summary.json or Hydra's .hydra/). Jobs sit right inside it;
    a sweep made before job folders were always flat may have nested some (a value with `/` in its name)."""
    found, todo = [], [sweep_dir]
    while todo:
        for folder in sorted(p for p in todo.pop().iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (folder / "summary.json").is_file() or (folder / ".hydra").is_dir():
                found.append(folder)
            else:
                todo.append(folder)
    return sorted(found)


def read_jobs(sweep_dir: Path) -> list[Job]:
    jobs = []
    for folder in job_dirs(sweep_dir):
        summary, why = summary_or_why(folder)
        if summary is None and not (folder / "summary.json").is_file():
            summary = {"ok": False, "error": "no summary.json: the job did not finish"}
        elif summary is None:  # cut short by a kill or a full disk, or damaged: the job still counts
            summary = {"ok": False, "error": f"{folder / 'summary.json'} cannot be read ({why}); its curves come "
                                             "from metrics.jsonl"}
            print(f"tinv-report: warning: {summary['error']}", file=sys.stderr)
        if "overrides" not in summary:
            overrides = folder / ".hydra" / "overrides.yaml"
            if overrides.is_file():
                import yaml

                summary["overrides"] = yaml.safe_load(overrides.read_text()) or []
        curves: dict[str, list[tuple[int, float]]] = {}
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            for record in read_metrics(metrics)[0]:  # a line cut short by a kill is left out
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        curves.setdefault(key, []).append((record["step"], value))
        jobs.append(Job(folder, summary, curves))
    return jobs


def ranked(jobs: list[Job]) -> list[Job]:
    """Best objective first (each in its own direction), failed jobs last."""
    return sorted(jobs, key=lambda j: (not j.ok, j.better_first if j.ok else 0.0, j.folder.name))


def _swept(jobs: list[Job]) -> list[str]:
    keys = sorted({k for job in jobs for k in job.params})
    return [k for k in keys if len({job.params.get(k) for job in jobs}) > 1]


def _columns(jobs: list[Job]) -> list[str]:
    """COLUMNS, with a column for each parameter the sweep varied (after the overrides) and each score."""
    scores = sorted({k for j in jobs for k, v in j.summary.items() if isinstance(v, (int, float))
                     and not isinstance(v, bool) and k not in BOOKKEEPING})
    params, at = COLUMNS.index("overrides") + 1, COLUMNS.index("final_loss")
    return COLUMNS[:params] + _swept(jobs) + COLUMNS[params:at] + scores + COLUMNS[at:]


def _rows(jobs: list[Job], columns: list[str]) -> list[dict]:
    rows = []
    for rank, job in enumerate(ranked(jobs), 1):
        s = job.summary
        row = {c: s.get(c) for c in columns}
        row.update({"rank": rank if job.ok else "", "job": job.folder.name,
                    "overrides": " ".join(s.get("overrides", [])), "objective": job.objective, "steps": s.get("step"),
                    "embedding": s.get("embedding", ""),
                    "status": "ok" if job.ok else f"failed: {s.get('error', 'no objective')}"})
        row.update(job.params)
        rows.append(row)
    return rows


def _link(path: str | None, sweep_dir: Path, text: str) -> str:
    """A markdown link relative to the report (spaces, quotes and brackets escaped), or nothing."""
    if not path:
        return ""
    target, sweep_dir = Path(path).resolve(), sweep_dir.resolve()
    relative = target.relative_to(sweep_dir) if target.is_relative_to(sweep_dir) else target
    return f"[{text}]({quote(str(relative), safe='/=,+~@:')})"


def _markdown_table(jobs: list[Job], rows: list[dict], columns: list[str], sweep_dir: Path) -> list[str]:
    """The readable table: what the sweep varied, the objective and the scores that differ from it, and links;
    the full record is report.csv."""
    same_as_objective = {c for c in columns if rows and all(row.get(c) == row["objective"] for row in rows)}
    swept = _swept(jobs)
    shown = ["rank", *swept, "objective"] + [c for c in columns if c not in COLUMNS and c not in swept and c not in
                                             same_as_objective] + \
        ["final_loss", "best_step", "steps", "wall_s", "samples", "embedding", "status"]
    by_job = {job.folder.name: job for job in jobs}
    lines = []
    for row in rows:
        summary = by_job[row["job"]].summary
        row = {**row, "samples": _link(summary.get("concept_samples") or summary.get("fidelity_samples"), sweep_dir,
                                       "grid"),
               "embedding": _link(summary.get("embedding"), sweep_dir, Path(summary.get("embedding", "x")).name),
               "wall_s": f"{row['wall_s']:.1f}" if isinstance(row.get("wall_s"), float) else row.get("wall_s")}
        lines.append(row)
    shown = [c for c in shown if any(row.get(c) not in (None, "") for row in lines)]
    return ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)] + \
        ["| " + " | ".join(_fmt(row.get(c)) for c in shown) + " |" for row in lines]


def _objective_label(jobs: list[Job]) -> str:
    """e.g. "best val/loss, lower is better", from the jobs' summaries."""
    names = {(j.summary.get("objective_name"), j.summary.get("objective_mode", "min")) for j in jobs if j.ok}
    if len(names) != 1:
        return "objective"
    name, mode = names.pop()
    return f"{name or 'objective'}, {'higher' if mode == 'max' else 'lower'} is better"


def _fmt(value) -> str:
    if value is None:
        return ""
    return number(value).replace("|", "\\|")


def write_report(sweep_dir: str | Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir).expanduser()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (with summary.json or .hydra/)")
    columns = _columns(jobs)
    rows = _rows(jobs, columns)
    columns = [c for c in columns if any(row[c] not in (None, "") for row in rows)]  # nobody reported it
    out = {"markdown": sweep_dir / "report.md", "csv": sweep_dir / "report.csv"}
    plots = _plots(sweep_dir, jobs)

    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"{sum(j.ok for j in jobs)} of {len(jobs)} jobs finished; best objective first "
             f"({_objective_label(jobs)}); every column is in report.csv.", ""]
    lines += _markdown_table(jobs, rows, columns, sweep_dir)
    lines += ["", "## Plots", ""] + [f"![{name.replace('_', ' ')}]({path.name})" for name, path in plots.items()]
    write_text_atomic(out["markdown"], "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({c: row.get(c) for c in columns} for row in rows)
    write_text_atomic(out["csv"], buffer.getvalue())
    out.update(plots)
    return out


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average over about `span` values (per-step losses are too noisy to compare raw)."""
    alpha, out, level = 2 / (span + 1), [], None
    for value in values:
        level = value if level is None else level + alpha * (value - level)
        out.append(level)
    return out


def _log_scaled(key: str, xs: list[float]) -> bool:
    """Learning rates (and anything spanning 20x or more) read better on a log axis."""
    return min(xs) > 0 and ("lr" in key.split(".")[-1] or max(xs) / min(xs) >= 20)


def _plots(sweep_dir: Path, jobs: list[Job]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    label = _objective_label(jobs)
    swept = _swept(jobs)

    def name(job: Job) -> str:  # a job in a legend: the values the sweep varied
        return ", ".join(f"{k}={job.params.get(k)}" for k in swept) or job.folder.name[:60]

    if any(job.curves.get("train/loss") for job in jobs):
        written["loss_curves"] = _save(_loss_panels(ranked(jobs), name), sweep_dir / "loss_curves.png")
    measured = [(job, job.curves[job.metric]) for job in jobs  # (the loss itself has its panels above)
                if job.metric and job.metric != "train/loss" and len(job.curves.get(job.metric, [])) > 1]
    if measured:
        fig, ax = plt.subplots(figsize=(8, 5))
        for job, points in measured:
            ax.plot(*zip(*points), marker="o", label=name(job), linewidth=1)
        ax.set(xlabel="step", ylabel=measured[0][0].metric, title=f"{measured[0][0].metric} per job ({label})")
        if len(measured) <= 12:
            ax.legend(fontsize=6)
        written["objective_curves"] = _save(fig, sweep_dir / "objective_curves.png")
    finished = [j for j in jobs if j.ok]
    for key in _swept(finished):
        fig, ax = plt.subplots(figsize=(6, 4))
        values = [j.params.get(key) for j in finished]
        try:
            xs = [float(v) for v in values]
            ax.scatter(xs, [j.objective for j in finished])
            if _log_scaled(key, xs):
                ax.set_xscale("log")
            if len(set(xs)) <= 8:  # a tick at every value tried
                ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
                ax.minorticks_off()
        except (TypeError, ValueError):  # categorical parameter
            labels = sorted(set(map(str, values)))
            ax.scatter([labels.index(str(v)) for v in values], [j.objective for j in finished])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=label, title=f"objective vs {key}")
        safe = key.replace("/", "_")
        written[f"objective_vs_{safe}"] = _save(fig, sweep_dir / f"objective_vs_{safe}.png")
    return written


LOSS_PANELS = 16  # the loss plot shows the best jobs' curves, one panel each


def _loss_panels(jobs: list[Job], name):
    """train/loss of each job in a panel of its own, best job first, on shared axes (a diffusion loss is mostly
    timestep noise: overlaid, the jobs' curves cannot be told apart). Each step's loss in grey, smoothed in blue;
    the y range leaves out the noisiest 1% so one spike does not flatten the rest."""
    import matplotlib.pyplot as plt
    import numpy as np

    curves = [(rank, job, job.curves["train/loss"]) for rank, job in enumerate(jobs, 1) if job.curves.get("train/loss")]
    shown = curves[:LOSS_PANELS]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.6), sharex=True, sharey=True,
                             squeeze=False)
    values = np.array([value for _, _, points in shown for _, value in points], dtype=float)
    values = values[np.isfinite(values)]
    for ax, (rank, job, points) in zip(axes.flat, shown):
        steps, losses = zip(*points)
        ax.plot(steps, losses, color="0.8", linewidth=0.5)
        ax.plot(steps, smooth(list(losses), max(5, len(losses) // 20)), color="C0", linewidth=1.2)
        title = f"#{rank} {name(job)}" if job.ok else f"(failed) {name(job)}"
        ax.set_title(title if len(title) <= 48 else title[:47] + "…", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    if len(values):
        low, high = np.percentile(values, [0.5, 99.5])
        pad = (high - low) * 0.05 or abs(high) * 0.05 or 0.01
        axes.flat[0].set_ylim(low - pad, high + pad)
    more = f"; the best {len(shown)} of {len(curves)} jobs" if len(curves) > len(shown) else ""
    fig.suptitle(f"train/loss per job, best first (grey: each step; blue: smoothed{more})", fontsize=9)
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
