"""Sweeps that talk and scale: progress lines, the compare command, the joblib and submitit launchers."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pl_lossy.experiment.sweeps import (SweepWatcher, compare_command, count_jobs, duration, job_label, progress_line,
                                        swept_keys)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["network=bernoulli", "trainer.max_steps=2", "trainer.devices=1"]  # seconds a job


def sweep(tmp_path, *overrides, timeout=300, **environ):
    """``examples/train.py -m`` as a user runs it (stdout a pipe, as in a log file), into tmp_path/multi."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", "OPENBLAS_NUM_THREADS": "1", **environ}
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), "-m", f"hydra.sweep.dir={tmp_path / 'multi'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (9.84, 31.2, 100, 7500)] == ["9.8 s", "31 s", "1 min 40 s", "2 h 5 min"]


def test_a_progress_line_counts_the_jobs_and_estimates_the_rest():
    assert progress_line(3, 12, "p=0.1 n=16 seed=1", 9.8, 31) == "[3/12] done p=0.1 n=16 seed=1 in 9.8 s; elapsed 31 s, about 1 min 33 s left"
    assert progress_line(12, 12, "seed=1", 9.8, 124) == "[12/12] done seed=1 in 9.8 s; elapsed 2 min 4 s"
    assert progress_line(2, None, "seed=1", None, 20) == "[2] done seed=1; elapsed 20 s"  # a sweeper that does not say how many


def test_the_swept_keys_label_each_job():
    overrides = ["experiment=paper_grid", "network.drop_rate=0,0.5", "strategy.workers_per_device=2,16", "seed=0,1", "trainer.max_steps=9"]
    assert swept_keys(overrides) == ["network.drop_rate", "strategy.workers_per_device", "seed"]
    assert count_jobs(overrides) == 8 and count_jobs(["seed=range(3)", "model.lr=0.1,0.2"]) == 6
    job = ["experiment=paper_grid", "network.drop_rate=0.5", "strategy.workers_per_device=16", "seed=1", "trainer.max_steps=9"]
    assert job_label(job, swept_keys(overrides), {"network.drop_rate": "p", "strategy.workers_per_device": "n"}) == "p=0.5 n=16 seed=1"
    assert swept_keys(["seed=[oops"]) == [] and count_jobs(["seed=[oops"]) is None  # Hydra reports those itself


def test_the_watcher_reports_each_job_once_when_its_summary_appears(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"wall_time_s": 1.0}))  # an earlier sweep's, in a folder used again
    os.utime(tmp_path / "0" / "summary.json", (time.time() - 60,) * 2)
    watcher = SweepWatcher(tmp_path, 2, ["seed"], {"seed": "s"})
    assert watcher.poll() == []
    for job, seed in (("1", 1), ("0", 0)):
        (tmp_path / job / ".hydra").mkdir(parents=True, exist_ok=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- network=bernoulli\n- seed={seed}\n")
    (tmp_path / "1" / "summary.json").write_text('{"wall_time_s": 2')  # half written: not yet
    assert watcher.poll() == []
    (tmp_path / "1" / "summary.json").write_text(json.dumps({"wall_time_s": 2.0}))
    [line] = watcher.poll()
    assert line.startswith("[1/2] done s=1 in 2.0 s; elapsed ") and line.endswith(" left")
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"wall_time_s": 3.0}))
    [line] = watcher.poll()
    assert line.startswith("[2/2] done s=0 in 3.0 s; elapsed ") and "left" not in line
    assert watcher.poll() == []


def test_the_compare_command_names_the_pl_lossy_next_to_this_python():
    command = compare_command(Path("multirun/x y"), options=("--over", "seed"))
    assert re.fullmatch(r"\S*pl-lossy compare 'multirun/x y' --over seed", command)


def progress_of(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]


def test_a_sweep_prints_its_folder_first_a_line_per_job_and_the_compare_command_last(tmp_path):
    proc = sweep(tmp_path, *TINY, "seed=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"sweep: 2 jobs into {tmp_path / 'multi'}"
    done = progress_of(proc.stdout)
    assert [line.split(" in ")[0] for line in done] == ["[1/2] done seed=0", "[2/2] done seed=1"]
    assert "about" in done[0] and "left" not in done[1]
    assert re.fullmatch(rf"2 jobs done in [\d.]+ s; compare them: \S*pl-lossy compare {tmp_path / 'multi'}", lines[-1])


def test_a_joblib_sweep_runs_its_jobs_side_by_side_and_reports_each(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    # a MASTER_PORT in the shell (or left by an earlier run) must not be shared by jobs running side by side
    proc = sweep(tmp_path, *TINY, "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", MASTER_PORT="45479")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        summary = json.loads((tmp_path / "multi" / job / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["config"]["seed"] == int(job)
    assert sorted(line.split(" in ")[0][6:] for line in progress_of(proc.stdout)) == ["done seed=0", "done seed=1"]
    assert proc.stdout.strip().splitlines()[-1].startswith("2 jobs done in ")
    assert "LeafSpec" not in proc.stdout + proc.stderr  # the workers are quiet too


def test_a_joblib_sweep_of_spawned_training_fails_before_any_job_in_one_line(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = sweep(tmp_path, "network=bernoulli", "trainer.max_steps=2", "trainer.devices=2", "strategy.start_method=spawn",
                 "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: sweep job #0") and "use strategy.start_method=fork" in last
    assert "Traceback" not in proc.stderr and not list((tmp_path / "multi").glob("*/summary.json"))


def test_a_submitit_local_sweep_finishes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = sweep(tmp_path, *TINY, "seed=3", "hydra/launcher=submitit_local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "multi" / "0" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["config"]["seed"] == 3
    assert progress_of(proc.stdout)[0].startswith("[1/1] done job 0 in ")  # seen from the sweep's process; the job's output is submitit's log
    assert proc.stdout.strip().splitlines()[-1].startswith("1 job done in ")


def test_the_paper_grid_driver_runs_its_jobs_side_by_side_and_talks(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = tmp_path / "grid"
    cmd = [sys.executable, str(ROOT / "examples" / "paper_grid.py"), "--p", "0", "--n", "2", "--seeds", "0", "1", "--steps", "4",
           "--jobs", "2", "--out", str(out), "--", "trainer.val_check_interval=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"2 runs into {out / 'runs'}" and "hydra/launcher=joblib hydra.launcher.n_jobs=2" in lines[1]
    assert sorted(line.split(" in ")[0][6:] for line in progress_of(proc.stdout)) == ["done seed=0", "done seed=1"]
    assert re.fullmatch(rf"compare again: \S*pl-lossy compare {out / 'runs'} --over seed --out {out}", lines[-1])
    proc = subprocess.run([*cmd[:2], "--jobs", "0", "--out", str(tmp_path / "g")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--jobs 0 is out of range" in proc.stderr
