"""Runs of the main job, for the examples that compare several: start one as a subprocess, read it back.

Reading back: its summary.json and its per-round metrics.csv (CSVLogger): the accuracy curve against
simulated time and when it first reaches a target (``pl-lossy compare`` tabulates and plots them).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .sweeps import SweepWatcher, compare_command, progress_line, swept_keys


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """An example's own arguments, and the Hydra overrides after ``--`` (for every run it starts)."""
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def driver_arguments(parse: Callable[[list[str]], argparse.Namespace]) -> tuple[argparse.Namespace, list[str]]:
    """An example driver's own arguments (``parse`` reads them; they must hold ``out``, which is created) and
    the Hydra overrides after ``--`` (for every run it starts)."""
    argv, overrides = split_overrides(sys.argv[1:])
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, overrides


def apply_preset(args: argparse.Namespace, preset: dict[str, Any]) -> None:
    """Fill every argument left unset (None) from the chosen preset."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


class Progress:
    """A driver's runs made one after another: prints ``N runs into OUT`` when made, and with :meth:`done`
    a progress line per finished run (as :class:`pl_lossy.experiment.sweeps.SweepWatcher` does for a sweep)."""

    def __init__(self, total: int, out: Path) -> None:
        self.total, self.finished, self.started = total, 0, time.time()
        print(f"{total} runs into {out}", flush=True)

    def done(self, label: str, job_s: Optional[float]) -> None:
        self.finished += 1
        print(progress_line(self.finished, self.total, label, job_s, time.time() - self.started), flush=True)


def run_main_job(script: Path, run_dir: Path, overrides: list[str], name: str, progress: Optional[Progress] = None) -> "RunResult":
    """Run the main job (``script``, e.g. examples/train.py) into ``run_dir``; exit with its error if it fails.
    ``progress``: told when it is done (its line names the run ``name``)."""
    cmd = [sys.executable, str(script), f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false", *overrides]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        if lines and lines[-1].startswith("error: "):  # the app's own one-line error
            sys.exit(f"error: the {name} run failed: {lines[-1][len('error: '):]}")
        sys.exit(f"{proc.stderr[-2000:]}\nerror: the {name} run failed (exit code {proc.returncode}); its output is above")
    result = RunResult.load(run_dir)
    if progress is not None:
        progress.done(name, result.summary.get("wall_time_s"))
    return result


def run_sweep(script: Path, sweep_dir: Path, overrides: list[str], jobs: int, names: Optional[Mapping[str, str]] = None) -> Path:
    """Run the main job as one Hydra ``-m`` sweep of ``jobs`` runs into ``sweep_dir`` (every job is checked
    before the first trains); exit with the app's one-line error if it fails. Returns ``sweep_dir``.

    Prints the folder first, then a progress line per finished job (``[3/12] done p=0.1 n=16 seed=1 in
    9.8 s; elapsed 31 s, about 1 min 40 s left``: the swept overrides, ``names`` shortening their keys),
    seen from here as the jobs' summary files appear, whatever launcher runs them (see
    :mod:`pl_lossy.experiment.sweeps`)."""
    cmd = [sys.executable, str(script), "-m", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}", *overrides]
    print(f"{jobs} runs into {sweep_dir}\n$ {' '.join(cmd[1:])}", flush=True)
    watcher = SweepWatcher(sweep_dir, jobs, swept_keys(overrides), names)
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a long stderr cannot stall the sweep
        returncode = _wait_reporting(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True), watcher)
        err.seek(0)
        stderr = err.read()
    if returncode != 0:
        lines = [line for line in stderr.splitlines() if line.strip()]
        messages = [line for line in lines if line.startswith("error: ")]
        sys.exit(messages[-1] if messages else f"{stderr[-2000:]}\nerror: the sweep failed (exit code {returncode})")
    return sweep_dir


def _wait_reporting(proc: subprocess.Popen, watcher: SweepWatcher, every_s: float = 1.0) -> int:
    """Wait for ``proc``, printing the watcher's progress lines as jobs finish; its exit code."""
    while True:
        try:
            returncode: Optional[int] = proc.wait(timeout=every_s)
        except subprocess.TimeoutExpired:
            returncode = None
        for line in watcher.poll():
            print(line, flush=True)
        if returncode is not None:
            return returncode


def print_compare_hint(*paths: Any, options: tuple[str, ...] = ()) -> None:
    """A driver's last line: the ``pl-lossy compare`` command that tabulates its runs again (e.g. with another ``--target``)."""
    print(f"compare again: {compare_command(*paths, options=options)}", flush=True)


def launcher_overrides(jobs: int) -> list[str]:
    """Hydra overrides that run a sweep's jobs ``jobs`` at a time on this machine (Hydra's joblib launcher,
    the ``sweep`` extra); [] for one at a time. Exits with one line if the launcher is not installed."""
    if jobs <= 1:
        return []
    import importlib.util

    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
        sys.exit("error: --jobs needs Hydra's joblib launcher: pip install -e '.[sweep]' (or hydra-joblib-launcher)")
    return ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]


def mean_curve(results: list["RunResult"], column: str) -> tuple[list[int], list[float]]:
    """Mean over runs (seeds) of ``column`` at the steps every run logged it."""
    curves = [dict(r.column(column)) for r in results]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def flat_config(config: Optional[dict], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = value
    return out


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, str]]  # metrics.csv, one dict per row (empty strings where not logged)

    @classmethod
    def load(cls, run_dir: Path) -> "RunResult":
        run_dir = Path(run_dir)
        versions = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
        if not versions:
            raise FileNotFoundError(f"no logs/version_*/metrics.csv under {run_dir}")
        metrics = versions[-1]  # a run dir used again gets a new version: the newest is this run's
        with open(metrics, newline="") as f:
            rows = list(csv.DictReader(f))
        return cls(run_dir, json.loads((run_dir / "summary.json").read_text()), rows)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """The run's resolved config, flat: ``{"network": {"loss_rate": 0.1}}`` -> ``{"network.loss_rate": 0.1}``."""
        return flat_config(self.summary.get("config"))

    def column(self, name: str) -> list[tuple[int, float]]:
        """(step, value) for every row that logged ``name``."""
        return [(int(r["step"]), float(r[name])) for r in self.rows if r.get(name)]

    @property
    def metric(self) -> str:
        """The run's validation metric: ``val_bpb`` for a language model (lower is better), else ``val_acc``."""
        language = str(self.settings.get("model._target_", "")).endswith(".LanguageModel")
        return "val_bpb" if language or self.summary.get("val_bpb") is not None or self.column("val_bpb") else "val_acc"

    def reached(self, value: float, target: float) -> bool:
        """Whether a value of :attr:`metric` is at ``target`` or better."""
        return value <= target if self.metric == "val_bpb" else value >= target

    def accuracy_curve(self) -> list[tuple[float, float]]:
        """(simulated time at the validation, the validation metric: :attr:`metric`) for every validation of the run."""
        sim_at_step = dict(self.column("net/sim_time_s"))
        curve = []
        for step, value in self.column(self.metric):
            earlier = [s for s in sim_at_step if s <= step]
            curve.append((sim_at_step[max(earlier)] if earlier else 0.0, value))
        return curve

    def time_to(self, target: float) -> Optional[float]:
        """Simulated time at which the validation metric first reached ``target`` (accuracy at or above it,
        bits per byte at or below it; None: never)."""
        return next((t for t, value in self.accuracy_curve() if self.reached(value, target)), None)

    @property
    def learning_drop(self) -> float:
        """Fraction of the training packets that crossed the network and were dropped."""
        return 1.0 - 0.5 * (self.summary["delivered_up"] + self.summary["delivered_down"])
