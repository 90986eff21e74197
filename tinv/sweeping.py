"""Which sweep a job belongs to (the resumable Optuna sweeper lives in hydra_plugins/tinv_sweeper)."""

from __future__ import annotations

from pathlib import Path



def sweep_identity() -> dict:
    """Inside a multirun job: the sweep's name (the sweep= choice, or "multirun"), its folder, and this job's
    number and overrides. Empty outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {}
    sweep_dir = Path(hc.sweep.dir)
    name = hc.runtime.choices.get("sweep") or "multirun"
    return {"sweep": name, "group": f"{name}-{sweep_dir.parent.name}-{sweep_dir.name}", "sweep_dir": str(sweep_dir),
            "job_num": hc.job.num, "job_name": hc.job.override_dirname or f"job{hc.job.num}",
            "overrides": list(hc.overrides.task)}
