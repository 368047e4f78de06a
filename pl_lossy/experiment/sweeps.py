"""Sweeps that talk: the folder first, a line per finished job, the ``pl-lossy compare`` command last.

    sweep: 12 jobs into multirun/2026-12-03/14-02-11
    [3/12] done network.loss_rate=0.1 trainer.devices=4 in 9.8 s; elapsed 31 s, about 1 min 40 s left
    12 jobs done in 2 min 4 s; compare them: .venv/bin/pl-lossy compare multirun/2026-12-03/14-02-11

A job is finished when its ``summary.json`` is in the sweep's folder. Counting those files, rather than
keeping a count in one process, works with every launcher: Hydra's basic launcher runs the jobs in the
sweep's process, joblib in worker processes, submitit in other processes (their output in its log
files) or on other machines sharing the folder. A Hydra ``on_job_end`` callback alone would print from
wherever the job ran (a submitit log nobody reads) and could not count the jobs the others finished.
So: :class:`SweepWatcher` polls the folder from the process the user watches (a driver running the
sweep as a subprocess, or the sweep's own process for launchers other than the basic one), and
:class:`SweepReport`, the Hydra callback of ``examples/train.py -m`` (conf/config.yaml), prints the folder
first and the ``pl-lossy compare`` command last.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def duration(seconds: float) -> str:
    """``9.8 s``, ``31 s``, ``1 min 40 s``, ``2 h 5 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def jobs(n: int) -> str:
    """``1 job``, ``12 jobs``."""
    return f"{n} job" if n == 1 else f"{n} jobs"


def progress_line(done: int, total: Optional[int], label: str, job_s: Optional[float], elapsed_s: float,
                  status: str = "done") -> str:
    """``[3/12] done p=0.1 n=16 in 9.8 s; elapsed 31 s, about 1 min 40 s left`` (``total`` None: a sweeper
    that does not say how many jobs it runs; no estimate then). The time left assumes the jobs still to
    run take as long, on average, as those done (with jobs side by side too)."""
    head = f"[{done}/{total}]" if total else f"[{done}]"
    took = f" in {duration(job_s)}" if job_s is not None else ""
    tail = f"; elapsed {duration(elapsed_s)}"
    if total and 0 < done < total:
        tail += f", about {duration(elapsed_s / done * (total - done))} left"
    return f"{head} {status} {label}{took}{tail}"


def _parse(overrides: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(overrides))


def swept_keys(overrides: Iterable[str]) -> list[str]:
    """The keys (or groups) that a sweep's overrides give several values, in order; [] when they do not
    parse (the sweep itself reports that)."""
    try:
        return [o.key_or_group for o in _parse(overrides) if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - any parse error is Hydra's to report, not ours
        return []


def count_jobs(overrides: Iterable[str]) -> Optional[int]:
    """How many jobs Hydra's basic sweeper makes of these overrides (None: they do not parse)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    try:
        return sum(len(batch) for batch in BasicSweeper.split_arguments(_parse(overrides), None))
    except Exception:  # noqa: BLE001 - as in swept_keys
        return None


def job_label(job_overrides: Iterable[str], swept: Iterable[str], names: Optional[Mapping[str, str]] = None) -> str:
    """The job's values of the swept keys, ``p=0.1 n=16 seed=1`` (``names``: short names for keys)."""
    names, swept = names or {}, set(swept)
    cells = []
    for override in job_overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+~")
        if key in swept:
            cells.append(f"{names.get(key, key)}={value}")
    return " ".join(cells)


def finished_jobs(sweep_dir: Path, summary_file: str, since: float) -> list[Path]:
    """The summary files under ``sweep_dir/<job>/`` written at or after ``since`` (a time.time())."""
    found = []
    for path in Path(sweep_dir).glob(f"*/{summary_file}"):
        try:
            if path.stat().st_mtime >= since:
                found.append(path)
        except FileNotFoundError:  # removed while we looked
            continue
    return sorted(found)


def compare_command(*paths: Any, options: Iterable[str] = ()) -> str:
    """The shell command that tabulates these runs or sweeps: ``.venv/bin/pl-lossy compare DIR [options]``
    (the ``pl-lossy`` next to this Python, relative to the working directory where it lies below it)."""
    script = Path(sys.executable).with_name("pl-lossy")
    program = "pl-lossy"
    if script.is_file():
        relative = os.path.relpath(script)
        program = str(script) if relative.startswith("..") else relative
    return shlex.join([program, "compare", *map(str, paths), *options])


class SweepWatcher:
    """A driver's view of a sweep it runs as a subprocess: call :meth:`poll` every second or so; it returns
    a :func:`progress_line` for every job whose summary file appeared since the last call. Summaries
    already there when it was made (a folder used again) count only once written again."""

    def __init__(self, sweep_dir: Path, total: Optional[int], swept: Iterable[str], names: Optional[Mapping[str, str]] = None,
                 summary_file: str = "summary.json", started: Optional[float] = None) -> None:
        self.sweep_dir, self.total, self.swept, self.names = Path(sweep_dir), total, list(swept), names
        self.summary_file = summary_file
        self.started = time.time() if started is None else started
        self.seen: set[Path] = set()

    def poll(self) -> list[str]:
        lines = []
        for path in finished_jobs(self.sweep_dir, self.summary_file, self.started):
            if path in self.seen:
                continue
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):  # still being written: next time
                continue
            self.seen.add(path)
            lines.append(progress_line(len(self.seen), self.total, self._label(path.parent, summary),
                                       summary.get("wall_time_s"), time.time() - self.started))
        return lines

    def _label(self, job_dir: Path, summary: dict[str, Any]) -> str:
        overrides = job_dir / ".hydra" / "overrides.yaml"  # written by Hydra when the job starts
        if overrides.is_file():
            label = job_label(OmegaConf.load(overrides), self.swept, self.names)
        else:  # hydra.output_subdir=null: the values from the resolved config the summary holds
            from .runs import flat_config

            config = flat_config(summary.get("config"))
            label = " ".join(f"{(self.names or {}).get(k, k)}={config[k]}" for k in self.swept if k in config)
        return label or f"job {job_dir.name}"


class SweepReport(Callback):
    """Hydra callback (conf/config.yaml) for ``examples/train.py -m``: the sweep's folder and job count
    before the first job, a :func:`progress_line` after every job, and at the end the ``pl-lossy compare``
    command, all on the sweep's console. Single runs print nothing.

    With Hydra's basic launcher the jobs run in the sweep's process and ``on_job_end`` prints the line.
    Other launchers run them elsewhere (joblib's workers, submitit's processes whose output goes to log
    files): a thread of the sweep's process then watches the folder (:class:`SweepWatcher`); that process
    only waits for the jobs, it starts no training process that could inherit the thread."""

    def __init__(self) -> None:
        self.sweep_dir: Optional[str] = None
        self._watch: Optional[tuple[threading.Thread, threading.Event]] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_watch": None}  # Hydra pickles this object to other launchers' jobs; a thread stays here

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # kept on the instance: Hydra hands this same object (pickled) to the jobs of every launcher
        self.sweep_dir = str(config.hydra.sweep.dir)  # resolved once here: ${now:...} differs in another process
        self.pid = os.getpid()
        self.started = time.time()
        self.summary_file = str(config.get("summary_file", "summary.json"))
        params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
        overrides = [*params, *config.hydra.overrides.task]
        self.swept = swept_keys(overrides)
        basic = "BasicSweeper" in str(config.hydra.sweeper.get("_target_", ""))
        self.total = count_jobs(overrides) if basic else None
        print(f"sweep: {jobs(self.total) if self.total else 'jobs'} into {self.sweep_dir}", flush=True)
        if "BasicLauncher" not in str(config.hydra.launcher.get("_target_", "")):
            stop = threading.Event()
            thread = threading.Thread(target=self._watch_folder, args=(stop,), name="sweep-report", daemon=True)
            thread.start()
            self._watch = (thread, stop)

    def _watch_folder(self, stop: threading.Event) -> None:
        watcher = SweepWatcher(Path(self.sweep_dir), self.total, self.swept, summary_file=self.summary_file,
                               started=self.started)
        while True:
            stopping = stop.wait(1.0)
            for line in watcher.poll():
                print(line, flush=True)
            if stopping:
                return

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.job_started = time.time()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.sweep_dir is None or os.getpid() != self.pid:  # a single run; another launcher's job: watched from the sweep
            return
        from hydra.core.utils import JobStatus

        done = len(finished_jobs(Path(self.sweep_dir), self.summary_file, self.started))
        label = job_label(config.hydra.overrides.task, self.swept) or f"job {config.hydra.job.get('num', '')}"
        status = "done" if job_return.status == JobStatus.COMPLETED else "failed"
        now = time.time()
        print(progress_line(done, self.total, label, now - getattr(self, "job_started", now), now - self.started, status),
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._watch is not None:
            thread, stop = self._watch
            stop.set()
            thread.join(timeout=10)
        done = len(finished_jobs(Path(self.sweep_dir), self.summary_file, self.started))
        finished = f"{done} of {jobs(self.total)}" if self.total and done != self.total else jobs(done)
        print(f"{finished} done in {duration(time.time() - self.started)}; "
              f"compare them: {compare_command(self.sweep_dir)}", flush=True)
