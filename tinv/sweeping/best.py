"""What a finished sweep says: its best job (objective, overrides, embedding) and the report command."""

from __future__ import annotations

import shlex
from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback

from .report import ranked, read_jobs


class AnnounceBestJob(HydraCallback):
    """At the end of a multirun: which job won (its objective, overrides and embedding) and the report command."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = ranked(read_jobs(sweep_dir)) if sweep_dir.is_dir() else []
        finished = [job for job in jobs if job.ok]
        print(f"tinv-train: sweep done, {len(finished)} of {len(jobs)} jobs finished ({sweep_dir})")
        if finished:
            best, s = finished[0], finished[0].summary
            print(f"  best       {s.get('objective_name', 'objective')} = {best.objective:.4g} "
                  f"({'higher' if s.get('objective_mode') == 'max' else 'lower'} is better)")
            print(f"  overrides  {' '.join(map(shlex.quote, s.get('overrides', []))) or '(none)'}")
            print(f"  embedding  {s.get('embedding', '(none)')}")
        print(f"  report     tinv-report {shlex.quote(str(sweep_dir))}")
