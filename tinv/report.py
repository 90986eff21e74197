"""`tinv-report <multirun dir>`: one table of a sweep's jobs and a few plots, from the jobs' own files.

Reads each job's summary.json and metrics.jsonl (no wandb needed) and writes, into the sweep folder:
report.md and report.csv (jobs sorted by objective, failed jobs last), loss_curves.png (every job's train/loss on
one chart) and objective_vs_<param>.png for each parameter the sweep varied.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_path, write_text_atomic

COLUMNS = ["rank", "job", "overrides", "objective", "objective_name", "objective_mode", "final_loss", "best_step",
           "steps", "wall_s", "embedding", "status"]
# summary numbers that are bookkeeping, not results; every other number a job reports (best_val_loss, a callback's
# scores such as concept_accuracy) gets a column after the objective's
BOOKKEEPING = {"ok", "objective", "final_loss", "best_step", "step", "wall_s", "started_at", "finished_at",
               "bad_steps", "job_num"}


@dataclass
class Job:
    folder: Path
    summary: dict
    losses: list[tuple[int, float]] = field(default_factory=list)

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
        pairs = (o.lstrip("+~").split("=", 1) for o in self.summary.get("overrides", []) if "=" in o)
        return {k: v for k, v in pairs}


def read_jobs(sweep_dir: Path) -> list[Job]:
    jobs = []
    for folder in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        summary_file = folder / "summary.json"
        if not summary_file.is_file() and not (folder / ".hydra").is_dir():
            continue
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else \
            {"ok": False, "error": "no summary.json: the job did not finish"}
        if "overrides" not in summary:
            overrides = folder / ".hydra" / "overrides.yaml"
            if overrides.is_file():
                import yaml

                summary["overrides"] = yaml.safe_load(overrides.read_text()) or []
        losses = []
        metrics = folder / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if isinstance(record.get("train/loss"), (int, float)):
                    losses.append((record["step"], record["train/loss"]))
        jobs.append(Job(folder, summary, losses))
    return jobs


def _swept(jobs: list[Job]) -> list[str]:
    keys = sorted({k for job in jobs for k in job.params})
    return [k for k in keys if len({job.params.get(k) for job in jobs}) > 1]


def _columns(jobs: list[Job]) -> list[str]:
    scores = sorted({k for j in jobs for k, v in j.summary.items() if isinstance(v, (int, float))
                     and not isinstance(v, bool) and k not in BOOKKEEPING})
    at = COLUMNS.index("final_loss")
    return COLUMNS[:at] + scores + COLUMNS[at:]


def _rows(jobs: list[Job], columns: list[str]) -> list[dict]:
    ordered = sorted(jobs, key=lambda j: (not j.ok, j.better_first if j.ok else 0.0, j.folder.name))
    rows = []
    for rank, job in enumerate(ordered, 1):
        s = job.summary
        row = {c: s.get(c) for c in columns}
        row.update({"rank": rank if job.ok else "", "job": job.folder.name,
                    "overrides": " ".join(s.get("overrides", [])), "objective": job.objective, "steps": s.get("step"),
                    "embedding": s.get("embedding", ""),
                    "status": "ok" if job.ok else f"failed: {s.get('error', 'no objective')}"})
        rows.append(row)
    return rows


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
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def write_report(sweep_dir: str | Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir).expanduser()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (with summary.json or .hydra/)")
    columns = _columns(jobs)
    rows = _rows(jobs, columns)
    out = {"markdown": sweep_dir / "report.md", "csv": sweep_dir / "report.csv"}

    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"{sum(j.ok for j in jobs)} of {len(jobs)} jobs finished; best objective first "
             f"({_objective_label(jobs)}).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in rows]
    write_text_atomic(out["markdown"], "\n".join(lines) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out["csv"], buffer.getvalue())
    out.update(_plots(sweep_dir, jobs))
    return out


def _plots(sweep_dir: Path, jobs: list[Job]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for job in jobs:
        if job.losses:
            steps, losses = zip(*job.losses)
            ax.plot(steps, losses, label=job.folder.name[:60], linewidth=1)
    ax.set(xlabel="step", ylabel="train/loss", title="training loss per job")
    if 0 < sum(bool(j.losses) for j in jobs) <= 12:
        ax.legend(fontsize=6)
    written["loss_curves"] = _save(fig, sweep_dir / "loss_curves.png")
    finished = [j for j in jobs if j.ok]
    for key in _swept(finished):
        fig, ax = plt.subplots(figsize=(6, 4))
        values = [j.params.get(key) for j in finished]
        try:
            xs = [float(v) for v in values]
            ax.scatter(xs, [j.objective for j in finished])
            if min(xs) > 0 and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
        except (TypeError, ValueError):  # categorical parameter
            labels = sorted(set(map(str, values)))
            ax.scatter([labels.index(str(v)) for v in values], [j.objective for j in finished])
            ax.set_xticks(range(len(labels)), labels)
        ax.set(xlabel=key, ylabel=_objective_label(finished), title=f"objective vs {key}")
        safe = key.replace("/", "_")
        written[f"objective_vs_{safe}"] = _save(fig, sweep_dir / f"objective_vs_{safe}.png")
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinv-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. outputs/multirun/2026-11-25/17-52-22-123456")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.sweep_dir)
    except FileNotFoundError as err:
        print(f"tinv-report: error: {err}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
