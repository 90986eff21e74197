"""Sweeps: which sweep a job belongs to and the dedup of jobs that would repeat another (jobs.py), what a finished
sweep says (best.py), and tinv-report's table and plots (report.py). The resumable Optuna sweeper and the SLURM
launcher are Hydra plugins (hydra_plugins/); the named sweeps are configs (sweeps/sweep/)."""
