"""tinv's Optuna sweeper: hydra-optuna-sweeper's, made resumable (Hydra loads sweepers from this namespace).

Re-running an existing study with hydra-optuna-sweeper runs `n_trials` *more* trials, and a trial killed mid-run
stays RUNNING forever. This one marks such stale trials failed and runs only what is left of `n_trials`.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

try:  # Hydra imports every hydra_plugins module at start-up; without the optuna extra there is nothing to define
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover
    OptunaSweeper = None


class ResumableOptunaSweeper(OptunaSweeper or object):
    def sweep(self, arguments):
        import optuna

        impl = self.sweeper
        if isinstance(impl.storage, str) and impl.storage.startswith("sqlite:///"):
            Path(impl.storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        if impl.storage:
            try:
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
            except KeyError:  # a new study
                study = None
            if study is not None:
                states = optuna.trial.TrialState
                for trial in study.get_trials(deepcopy=False):
                    if trial.state == states.RUNNING:  # its process died: it will never finish
                        study._storage.set_trial_state(trial._trial_id, states.FAIL)
                # finished trials count towards n_trials; failed and killed ones are run again
                done = sum(t.state in (states.COMPLETE, states.PRUNED) for t in study.get_trials(deepcopy=False))
                left = max(0, impl.n_trials - done)
                impl.job_idx = len(study.get_trials(deepcopy=False))  # new jobs get new numbers and folders
                log.info("resuming study %r in %s: %d trials recorded, %d to run", impl.study_name, impl.storage,
                         done, left)
                impl.n_trials = left
        from omegaconf import OmegaConf

        sweep_dir = Path(impl.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(impl.config, sweep_dir / "multirun.yaml")  # the sweep's definition, beside its jobs
        return super().sweep(arguments)
