"""The objective: the one number a run reports for sweeps to optimise and `tinv-report` to rank by.

Chosen in config (`objective.metric`, `objective.mode`, `objective.reduce`): any metric the run logs, its best value
over the run or its value at the end. A run that never logged the metric (validation off) reports its final
training loss instead, and says so in `objective_name`.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


def read_objective(history: dict[str, list[tuple[int, object]]], final_loss: float, metric: str = "val/loss",
                   mode: str = "min", reduce: str = "best") -> dict:
    """Summary fields: objective (the value), objective_name ("best val/loss", "last train/loss", ...) and
    objective_mode (min or max: which way is better)."""
    values = [float(v) for _, v in history.get(metric, [])
              if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if not values:
        if metric != "val/loss":  # val/loss is absent whenever validation is off, the default
            log.warning("objective.metric=%s was never logged; the objective is the final train/loss", metric)
        return {"objective": final_loss, "objective_name": "last train/loss", "objective_mode": "min"}
    if reduce == "last":
        value = values[-1]
    else:
        value = min(values) if mode == "min" else max(values)
    return {"objective": value, "objective_name": f"{reduce} {metric}", "objective_mode": mode}


def sweep_value(summary: dict, mode: str) -> float:
    """The objective as a sweeper optimising in `mode` (objective.mode, Optuna's direction) must see it: a fallback
    objective that is better the other way (a loss, for a metric to maximise) is negated."""
    value = summary["objective"]
    return value if summary["objective_mode"] == mode else -value
