"""tinv's Optuna sweeper: hydra-optuna-sweeper's search space and keys, with a study that several sweep processes
share and that resumes (Hydra loads sweepers from this namespace).

hydra-optuna-sweeper runs `n_trials` *more* trials each time it starts, counts only its own, and a trial whose
process was killed stays RUNNING forever. Here `n_trials` is the study's total, whoever runs the trials:
- every sweep process (another machine, a later restart) asks for a trial only while the study has fewer than
  `n_trials` trials finished or running, and the count and the ask happen under one lock (a PostgreSQL advisory
  lock, MySQL's GET_LOCK, a file lock beside a SQLite file), so two processes never both take the last place;
- a process that has nothing left to start waits for the trials still running elsewhere: if one fails, it runs
  it again, so the study ends with exactly `n_trials` finished trials;
- each running trial carries a heartbeat (Optuna's) and the host and pid of its sweep process. A trial whose sweep
  process is gone (killed on this host, or no heartbeat for `grace_period` seconds) is marked failed and run again;
- job folders are numbered by trial number, so processes that share a sweep folder never collide.
A trial that fails (a bad value, a killed SLURM job) is recorded FAIL and run again with new values; a process
gives up after `max_failure_rate` x `n_trials` failures of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from tinv.errors import ConfigError, first_line, refuse

log = logging.getLogger(__name__)

try:  # Hydra imports every hydra_plugins module at start-up; without the optuna extra there is nothing to define
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover
    OptunaSweeper = None

HEARTBEAT_S = 10  # how often a sweep process says its trials are alive
GRACE_S = 60  # silence after which another process takes them for dead
STORAGE_TIMEOUT_S = 30  # a database server that does not answer: give up connecting after this
POLL_S = 2.0  # how often a process with nothing to start looks at the study again
OWNER = "tinv_sweeper"  # system attribute: "<host>:<pid>" of the sweep process running the trial


def study_lock(storage):
    """One sweep process at a time may count the study's trials and add to them (a context manager)."""
    from sqlalchemy import text

    url = getattr(storage, "url", None) if storage is not None else None
    if url is None:  # in memory: this process alone
        return contextlib.nullcontext()
    name = f"tinv-optuna:{url}"
    if url.startswith("postgresql"):
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        return _held(storage.engine, text("select pg_advisory_lock(:k)"), text("select pg_advisory_unlock(:k)"),
                     {"k": key})
    if url.startswith("mysql"):
        return _held(storage.engine, text("select get_lock(:n, 3600)"), text("select release_lock(:n)"),
                     {"n": name[-64:]})
    if url.startswith("sqlite:///"):
        return _file_lock(Path(url[len("sqlite:///"):]).with_suffix(".lock"))
    log.warning("no lock for %s: sweep processes started side by side on this study may run a few trials more "
                "than n_trials", url.split("://")[0])
    return contextlib.nullcontext()


@contextlib.contextmanager
def _held(engine, take, give, params):
    with engine.connect() as connection:
        connection.execute(take, params)
        try:
            yield
        finally:
            connection.execute(give, params)


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Heartbeat:
    """A thread that records Optuna heartbeats for this process's running trials."""

    def __init__(self, storage, every_s: float = HEARTBEAT_S):
        self.storage, self.every_s, self.trial_ids = storage, every_s, set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="optuna-heartbeat", daemon=True)

    def __enter__(self):
        if self.storage is not None and self.storage.is_heartbeat_enabled():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()

    def add(self, trial_ids) -> None:
        trial_ids = set(trial_ids)
        self.trial_ids |= trial_ids
        self._record(trial_ids)  # at once: Optuna takes a trial with no heartbeat yet for alive

    def discard(self, trial_ids) -> None:
        self.trial_ids -= set(trial_ids)

    def _record(self, trial_ids) -> None:
        if self.storage is None or not self.storage.is_heartbeat_enabled():
            return
        for trial_id in list(trial_ids):
            try:
                self.storage.record_heartbeat(trial_id)
            except Exception as err:  # noqa: BLE001 - a database hiccup: the next beat tries again
                log.warning("heartbeat of trial %d not recorded: %s", trial_id, err)

    def _beat(self) -> None:
        while not self.stopped.wait(self.every_s):
            self._record(self.trial_ids)


class ResumableOptunaSweeper(OptunaSweeper or object):
    def sweep(self, arguments):
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return self._sweep(arguments)
        except ConfigError as err:  # Hydra would print its frames: one line, as tinv-train's own errors
            raise SystemExit(refuse("tinv-train", err)) from None
        except (optuna.exceptions.StorageInternalError, SQLAlchemyError) as err:  # the study failed mid-sweep
            print(f"tinv-train: error: {self._lost_study(err)}", file=sys.stderr)
            raise SystemExit(1) from None

    def _lost_study(self, err: BaseException) -> str:
        """The study's storage failed during the sweep, in one line: what went, what is kept, how to go on."""
        url, sweep_dir = str(self.sweeper.storage), self.sweeper.config.hydra.sweep.dir
        cause = first_line(getattr(err.__cause__, "orig", None) or err.__cause__ or err)
        gone = not Path(url[len("sqlite:///"):]).is_file() or "no such table" in cause  # SQLite made a new one
        if url.startswith("sqlite:///") and gone:
            return (f"the study's database {url[len('sqlite:///'):]} was removed while the sweep ran (its folder "
                    f"deleted or moved?), so no trial can be recorded; the sweep stopped. Jobs that finished keep "
                    f"their folders if they still exist; the same command starts a new study in {sweep_dir}")
        return (f"the study's storage {_shown(url)} failed during the sweep ({cause}); the sweep stopped. The "
                f"finished trials are in the study: the same command with hydra.sweep.dir={sweep_dir} resumes it")

    def _sweep(self, arguments):
        import optuna
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
        from omegaconf import OmegaConf

        impl = self.sweeper
        sweep_dir = Path(impl.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(impl.config, sweep_dir / "multirun.yaml")  # the sweep's definition, beside its jobs
        if getattr(impl.sampler, "func", None) is optuna.samplers.GridSampler:  # a grid has its own count
            return super().sweep(arguments)

        impl._process_searchspace_config()
        params = impl._parse_sweeper_params_config() + list(arguments)
        space, fixed = create_params_from_overrides(params)
        space = {**(impl.search_space_distributions or {}), **space}
        for name in fixed:
            space.pop(name, None)
        optuna.logging.disable_default_handler()  # its records go through Hydra's log format, uncoloured
        optuna.logging.enable_propagation()
        storage = self._storage(impl.storage)
        study = optuna.create_study(study_name=impl.study_name, storage=storage, sampler=impl.sampler,
                                    directions=impl._get_directions(), load_if_exists=True)
        me, failures = f"{socket.gethostname()}:{os.getpid()}", []
        states = optuna.trial.TrialState
        with Heartbeat(storage) as heartbeat:
            first = True
            while True:
                with study_lock(storage):
                    self._fail_dead_trials(study, me)
                    trials = study.get_trials(deepcopy=False)
                    done = sum(t.state in (states.COMPLETE, states.PRUNED) for t in trials)
                    running = sum(t.state in (states.RUNNING, states.WAITING) for t in trials)
                    room = impl.n_trials - done - running
                    if first:
                        log.info("study %r in %s: %d trials finished, %d running elsewhere, %d to run (n_trials=%d "
                                 "in all)", impl.study_name, _shown(impl.storage), done, running, max(room, 0),
                                 impl.n_trials)
                    if done >= impl.n_trials:
                        break
                    if first and trials:  # others asked before (or an earlier run): draw other values
                        seed = OmegaConf.select(impl.config, "hydra.sweeper.sampler.seed")
                        reseed(study.sampler, None if seed is None else int(seed) + len(trials))
                    first = False
                    batch = [study.ask() for _ in range(min(room, impl.n_jobs))]
                    for trial in batch:
                        trial.set_system_attr(OWNER, me)
                    heartbeat.add(t._trial_id for t in batch)
                if not batch:  # the last trials run elsewhere: wait, and run any that fail again
                    time.sleep(POLL_S)
                    continue
                overrides = impl._configure_trials(batch, space, fixed)
                returns = impl.launcher.launch(overrides, initial_job_idx=batch[0].number)
                for trial, ret in zip(batch, returns):
                    try:
                        value = float(ret.return_value)
                        if not math.isfinite(value):
                            raise ValueError(f"its objective is {value}")
                    except Exception as err:  # noqa: BLE001 - the job failed or returned no number
                        log.warning("trial %d failed (a new trial runs in its place): %s", trial.number, err)
                        failures.append(err)
                        _tell(study, trial, None, states.FAIL)
                    else:
                        _tell(study, trial, value, states.COMPLETE)
                heartbeat.discard(t._trial_id for t in batch)
                if len(failures) > impl.max_failure_rate * impl.n_trials:
                    raise RuntimeError(f"{len(failures)} trials of this sweep process failed (more than "
                                       f"max_failure_rate={impl.max_failure_rate} x n_trials={impl.n_trials}); "
                                       f"the last: {failures[-1]}") from failures[-1]
        best = study.best_trial
        log.info("the study's best trial (of every process): %d, %s = %s", best.number, best.params, best.value)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "best_params": best.params, "best_value": best.value}),
                       sweep_dir / "optimization_results.yaml")

    @staticmethod
    def _storage(url):
        """The study's storage, with Optuna's heartbeats switched on for a database."""
        import optuna

        if not url:
            return None
        if not isinstance(url, str) or url.startswith("redis"):
            return url
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        timeout = int(os.environ.get("TINV_STORAGE_TIMEOUT_S", STORAGE_TIMEOUT_S))
        # a server that accepts and never answers: the driver gives up on the connection (libpq's and PyMySQL's
        # connect_timeout cover the whole handshake), and PyMySQL also on a query
        connect_args = {"postgresql": {"connect_timeout": timeout},
                        "mysql": {"connect_timeout": timeout, "read_timeout": timeout, "write_timeout": timeout}}
        engine = {"connect_args": next((a for k, a in connect_args.items() if url.startswith(k)), {})}
        if not url.startswith("sqlite"):
            log.info("connecting to the study's storage %s (giving up after %d s)", _shown(url), timeout)
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 2.x
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors run to dozens of frames: one line
            raise ConfigError(f"hydra.sweeper.storage={_shown(url)}: {_storage_problem(err)}") from None

    @staticmethod
    def _fail_dead_trials(study, me: str) -> None:
        """Mark failed the running trials whose sweep process is gone; they will run again."""
        import optuna

        from tinv.resources import pid_alive

        host = socket.gethostname()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # no heartbeat for GRACE_S: its machine or process is gone
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            owner = trial.system_attrs.get(OWNER, "")
            owner_host, _, pid = owner.rpartition(":")
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            dead = (owner_host == host and owner != me and pid.isdigit() and not pid_alive(int(pid))) or (
                not owner and time.time() - started > GRACE_S)  # an older sweeper's trial, never beating
            if dead:
                study._storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL)
                log.info("trial %d: its sweep process (%s) is gone; marked failed, it runs again", trial.number,
                         owner or "unknown")


def _tell(study, trial, value, state) -> None:
    """Record a trial's end, unless another process already did (it took this process for dead)."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as err:  # "Trial#N has already finished"
        log.warning("trial %d: %s; its result is not recorded", trial.number, err)


def reseed(sampler, seed: int | None) -> None:
    """Give `sampler` a stream of its own (None: from the OS). Every process sharing a study seeds its sampler from
    the same train.seed and would suggest the same values. Optuna 2.x keeps the stream in `_rng` (and TPE its
    start-up sampler's in `_random_sampler._rng`)."""
    import numpy as np

    for target in (sampler, getattr(sampler, "_random_sampler", None)):
        if target is not None and hasattr(target, "_rng"):
            target._rng = np.random.RandomState(seed)


def _storage_problem(err: BaseException) -> str:
    """What is wrong with a study's storage URL or server, in words, with the fix."""
    from sqlalchemy import exc

    if isinstance(err, (exc.NoSuchModuleError, exc.ArgumentError)):
        return (f"not a database URL ({first_line(err)}); write sqlite:///<file>, postgresql://<user>@<host>/<db> "
                "or mysql+pymysql://<user>@<host>/<db>")
    missing = next((e for e in (err, err.__cause__, err.__context__) if isinstance(e, ImportError)), None)
    if missing is not None or "Failed to import DB access module" in str(err):  # Optuna's words for it
        return (f"its database driver is not installed ({first_line(missing or err)}); pip install it (psycopg2 for "
                "postgresql, PyMySQL with mysql+pymysql://), or use sqlite:///<file>")
    cause = getattr(err, "orig", None) or err
    return (f"cannot connect ({first_line(cause)}); check that the server runs and the URL's host, port, user and "
            "database, or leave hydra.sweeper.storage out for a SQLite file in the sweep folder")


def _shown(storage) -> str:
    """A storage URL without its password."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", str(storage))
