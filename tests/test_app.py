"""The Hydra app as a user runs it: examples/train.py in a subprocess."""

import csv
import json
import os
import pickle
import subprocess
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pl_lossy.experiment.runs import RunResult

ROOT = Path(__file__).resolve().parents[1]


def run_app(tmp_path, *overrides, multirun=False, timeout=300, run_dir="run", env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), *(["-m"] if multirun else []), f"hydra.run.dir={tmp_path / run_dir}",
           f"hydra.sweep.dir={tmp_path / 'multi'}", "trainer.enable_progress_bar=false", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_main_job_writes_summary(tmp_path):
    proc = run_app(tmp_path, "trainer.max_epochs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("val_acc", "val_loss", "steps", "delivered_up", "delivered_down", "sim_time_s", "comm_time_s", "wall_time_s", "config"):
        assert summary[key] is not None, key
    assert summary["steps"] > 0 and 0.9 < summary["delivered_up"] <= 1.0
    assert summary["sim_time_s"] > summary["comm_time_s"] > 0
    assert summary["config"]["network"]["_target_"] == "pl_lossy.network.Ns3Network"  # ns-3 is the default
    assert summary["network"].startswith("ns-3 UDP over star")
    assert summary["val_acc"] > 0.6
    assert "summary: val_acc=" in proc.stdout
    metrics = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "net/sim_time_s" in metrics and "net/delivered_up" in metrics and "net/drops_link_error" in metrics


def test_the_main_job_run_twice_replays_every_round_from_the_store_and_an_lr_sweep_simulates_once(tmp_path):
    env = {"PL_LOSSY_STORE": str(tmp_path / "outcomes.sqlite")}
    runs = []
    for name in ("first", "second"):
        proc = run_app(tmp_path, "trainer.max_epochs=1", run_dir=name, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    first, second = runs
    rounds = first["rounds"]
    assert (first["outcome_store"]["misses"], first["outcome_store"]["written"]) == (rounds, rounds)
    assert (second["outcome_store"]["hits"], second["outcome_store"]["misses"]) == (rounds, 0)
    assert f"outcome store {tmp_path / 'outcomes.sqlite'}: {rounds} rounds replayed, 0 simulated" in proc.stdout + proc.stderr
    for key in ("val_acc", "val_loss", "delivered_up", "delivered_down", "sim_time_s"):
        assert second[key] == first[key], key
    proc = run_app(tmp_path, "trainer.max_epochs=1", "model.lr=0.05,0.2", multirun=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        store = json.loads((tmp_path / "multi" / job / "summary.json").read_text())["outcome_store"]
        assert (store["hits"], store["misses"]) == (rounds, 0)


def test_sixteen_virtual_workers_in_one_process_over_ns3(tmp_path):
    proc = run_app(tmp_path, "trainer.devices=1", "strategy.workers_per_device=16", "trainer.max_epochs=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["n_workers"], summary["workers_per_device"], summary["world_size"]) == (16, 16, 1)
    assert summary["batching"] == "vmap"
    assert summary["steps"] == 4 * (-(-1437 // 16) // 32) and 0.95 < summary["delivered_up"] < 1.0  # per worker: its 90 samples, batches of 32
    assert summary["val_acc"] > 0.5
    assert "lossy_ps: 16 workers (1 processes x 16)" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("network.loss_rate=1.5", "invalid `network` config: loss_rate must be a probability in [0, 1], got 1.5"),
        ("network.link_rate=fast", "invalid `network` config: link_rate must be a number of bits/s or like '10Gbps'"),
        ("experiment=datacenter network.background_load=1.2", "invalid `network` config: background_load must be in [0, 1)"),
        ("network.transport=quic", "invalid `network` config: transport must be 'udp' (lossy, RPS), 'tcp'"),
        ("network=bernoulli network.drop_rate=-1", "invalid `network` config: drop_rate must be a probability in [0, 1], got -1.0"),
        ("data=cifar10", "invalid `data` config: Missing mandatory value: data.data_dir"),
        ("strategy.num_servers=3", "num_servers=3 co-located servers need at least as many workers; there are 2"),
        ("trainer.devices=0", "invalid `trainer` config"),
        ("strategy.workers_per_device=0", "invalid `strategy` config: workers_per_device must be an integer >= 1, got 0"),
        ("network.max_round_packets=10", "invalid `network` config: a round of 2 workers x 2 servers x 14 packets a block is 56 packets, over max_round_packets=10"),
        ("trainer.max_epochs=five", "invalid config: `trainer.max_epochs` must be an integer or null, got 'five' (a string)"),
        ("model.lr=fast", "invalid config: `model.lr` must be a number, got 'fast' (a string)"),
        ("data.batch_size=big", "invalid config: `data.batch_size` must be an integer, got 'big' (a string)"),
        ("model.net.hidden=[64,wide]", "invalid config: `model.net.hidden` must be a list of integers, got [64, 'wide']"),
        ("strategy.aggregation=average", "invalid config: `strategy.aggregation` must be one of 'rps', 'gradient', 'zero_fill', 'hadamard', got 'average'"),
        ("strategy.compute_time_s=soon", "invalid `strategy` config: compute_time_s must be one of ('flops', 'measured') or a number"),
        ("strategy.deadline_s=-1", "invalid `strategy` config: deadline_s must be a number of seconds > 0"),
        ("network.transport=tcp strategy.deadline_s=0.001", "invalid `strategy` config: a round deadline applies to lossy UDP rounds; transport='tcp' delivers every block"),
        ("strategy.compute_time_s=0.001 strategy.slow_workers={5:3.0}", "invalid `strategy` config: slow worker 5 with factor 3.0: workers are 0..1"),
    ],
)
def test_bad_override_fails_in_one_line_before_any_process_starts(tmp_path, override, message):
    proc = run_app(tmp_path, *override.split())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in proc.stderr
    assert "Initializing distributed" not in proc.stdout + proc.stderr  # nothing was launched


def test_multirun_sweep_compared_in_one_command_and_repeated_to_the_same_simulated_time(tmp_path):
    proc = run_app(tmp_path, "network.loss_rate=0,0.2", "trainer.max_epochs=1", multirun=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "multi").glob("*/summary.json"))
    assert len(summaries) == 2
    rates = sorted(json.loads(p.read_text())["config"]["network"]["loss_rate"] for p in summaries)
    delivered = {json.loads(p.read_text())["config"]["network"]["loss_rate"]: json.loads(p.read_text())["delivered_up"] for p in summaries}
    assert rates == [0.0, 0.2]
    assert delivered[0.0] == 1.0 and delivered[0.2] < 0.95
    for job in ("0", "1"):  # every job: its own plot, and its story in train.log (Lightning's lines too)
        assert (tmp_path / "multi" / job / "run.png").stat().st_size > 10_000
        story = (tmp_path / "multi" / job / "train.log").read_text()
        assert "summary: val_acc=" in story and "lossy_ps: 2 workers" in story and "`Trainer.fit` stopped" in story

    compare = subprocess.run([str(Path(sys.executable).parent / "pl-lossy"), "compare", str(tmp_path / "multi"), "--target", "0.5"],
                             capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0, compare.stderr[-3000:]
    table = [line for line in compare.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| network.loss_rate | val_acc |") and "time_to_0.5_s" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["0", "0.2"]
    assert (tmp_path / "multi" / "compare.md").read_text().strip() == "\n".join(table)
    with open(tmp_path / "multi" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["delivered_up"]) for r in rows] == [delivered[0.0], delivered[0.2]]
    assert (tmp_path / "multi" / "compare.png").stat().st_size > 20_000

    (tmp_path / "again").mkdir()
    again = run_app(tmp_path / "again", "network.loss_rate=0.2", "trainer.max_epochs=1", multirun=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = (json.loads((root / "multi" / job / "summary.json").read_text()) for root, job in ((tmp_path, "1"), (tmp_path / "again", "0")))
    assert first["compute"]["model"] == "flops" and first["compute"]["step_flops"] > 0
    assert first["sim_time_s"] == second["sim_time_s"] > 0 and first["wall_time_s"] != second["wall_time_s"]


def test_a_bad_value_in_a_later_sweep_job_fails_before_the_first_job_trains(tmp_path):
    proc = run_app(tmp_path, "network.loss_rate=0,0.1", "trainer.max_epochs=1,many", multirun=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep job #1 (") and "network.loss_rate=0 trainer.max_epochs=many)" in last
    assert "`trainer.max_epochs` must be an integer or null, got 'many'" in last and "no job was started" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "multi").exists()


def write_tiny_cifar(root: Path, n_per_batch=8):
    """Six batches in the CIFAR-10 python format (pickled dicts of uint8 rows and labels)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=n_per_batch).tolist(), b"batch_label": name.encode()}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_from_a_user_folder(tmp_path):
    from pl_lossy.experiment.data import Cifar10DataModule

    write_tiny_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    dm = Cifar10DataModule(data_dir=str(tmp_path / "cifar"), batch_size=4)
    dm.setup("fit")
    x, y = dm.train_set[0]
    assert tuple(x.shape) == (3, 32, 32) and len(dm.train_set) == 40 and len(dm.val_set) == 8
    proc = run_app(tmp_path, "data=cifar10", f"data.data_dir={tmp_path / 'cifar'}", "data.batch_size=4",
                   "model=resnet20", "model.net.width=4", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 5  # 40 images / 2 workers / batch 4


def test_lossy_vs_tcp_example_reports_time_to_accuracy_for_both(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "lossy_vs_tcp.py"), "--out", str(tmp_path), "--epochs", "2",
           "--workers", "2", "--target", "0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| network.transport |") and [r.split("|")[1].strip() for r in rows[1:]] == ["udp", "tcp"]
    assert "speed-up of lossy UDP + RPS over TCP" in proc.stdout
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    udp = json.loads((tmp_path / "udp" / "summary.json").read_text())
    tcp = json.loads((tmp_path / "tcp" / "summary.json").read_text())
    assert tcp["delivered_up"] == 1.0 and udp["delivered_up"] < 1.0
    assert tcp["comm_time_s"] > udp["comm_time_s"]  # same network, same rounds: reliable costs time


def test_datacenter_claim_example_reports_the_three_ways_side_by_side(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "datacenter_claim.py"), "--out", str(tmp_path), "--target", "0.5",
           "--", "trainer.max_epochs=1", "trainer.devices=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert "bg_fct_mean_s" in rows[0] and len(rows) == 4  # head and the three ways
    assert "faster with lossy training in the learning class than with reliable training" in proc.stdout
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    ways = json.loads((tmp_path / "results.json").read_text())["ways"]
    flows = {way: r["background"]["flows"] for way, r in ways.items()}
    assert len(set(flows.values())) == 1 and flows["none"] > 0  # the same tenants' flows every way
    assert ways["reliable"]["learning_drop"] == 0 and ways["lossy"]["learning_drop"] > 0
    assert ways["lossy"]["background"]["fct_mean_s"] < ways["reliable"]["background"]["fct_mean_s"]


def test_paper_grid_driver_runs_a_tiny_grid_and_reports_it(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "paper_grid.py"), "--p", "0", "0.5", "--n", "2", "4", "--seeds", "0", "1",
           "--steps", "30", "--out", str(tmp_path / "grid"), "--", "trainer.val_check_interval=15"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "grid" / "runs").glob("*/summary.json"))) == 8
    table = [line for line in (tmp_path / "grid" / "compare.md").read_text().splitlines()[2:]]
    assert len(table) == 4 and all(line.rstrip(" |").endswith("| 2") for line in table)  # (p, n) rows, 2 seeds each
    with open(tmp_path / "grid" / "compare.csv") as f:
        rows = {(float(r["network.loss_rate"]), int(r["strategy.workers_per_device"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(0.0, 2), (0.0, 4), (0.5, 2), (0.5, 4)}
    assert float(rows[(0.0, 4)]["delivered_up"]) == 1.0 and 0.4 < float(rows[(0.5, 4)]["delivered_up"]) < 0.6
    assert float(rows[(0.5, 2)]["train_loss_std"]) > 0  # two seeds, two different runs
    gaps = [line for line in proc.stdout.splitlines() if line.startswith("| 0.5 |") and " / " in line]
    assert len(gaps) == 1 and gaps[0].count("/") == 2  # the gap to p = 0 at n = 2 and n = 4
    assert gaps[0] in (tmp_path / "grid" / "gaps.md").read_text().splitlines()  # the same table, in a file the docs include
    assert (tmp_path / "grid" / "grid.png").stat().st_size > 20_000


def test_paper_grid_driver_adds_the_gradient_averaging_ablation(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "paper_grid.py"), "--p", "0", "0.5", "--n", "4", "--seeds", "0",
           "--steps", "30", "--rules", "gradient", "rps", "--out", str(tmp_path / "grid")]  # shorter than the 250-step validation
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "grid" / "compare.csv") as f:
        rows = {(float(r["network.loss_rate"]), r["strategy.aggregation"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(p, rule) for p in (0.0, 0.5) for rule in ("rps", "gradient")}
    # no drops: the same update for plain SGD; at p = 0.5 the rules part ways
    assert float(rows[0.0, "rps"]["train_loss"]) == pytest.approx(float(rows[0.0, "gradient"]["train_loss"]), rel=1e-3)
    assert float(rows[0.5, "rps"]["train_loss"]) != float(rows[0.5, "gradient"]["train_loss"])
    assert all(0 <= float(row["val_acc"]) <= 1 for row in rows.values())  # validated once, at the last step
    ablation = proc.stdout[proc.stdout.index("the ablation"):].splitlines()
    assert ablation[1] == "| p | n | rps | gradient |" and ablation[4].startswith("| 0.5 | 4 | ")
    assert (tmp_path / "grid" / "grid.png").stat().st_size > 20_000


def test_paper_grid_driver_refuses_bad_grid_values_before_launch(tmp_path):
    for bad, message in ((["--p", "1.5"], "--p 1.5 is out of range"), (["--n", "0"], "--n 0 is out of range")):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "paper_grid.py"), *bad, "--out", str(tmp_path / "g")],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "g" / "runs").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "paper_grid.py"), "--out", str(tmp_path / "g"), "--",
                           "model.lr=fast"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1 and "`model.lr` must be a number" in proc.stderr and "no job was started" in proc.stderr
    assert not list((tmp_path / "g").glob("runs/*/summary.json"))


def test_paper_network_driver_sweeps_learning_drops_and_reports_the_web_service(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "paper_network.py"), "--p", "0", "1", "--steps", "20",
           "--out", str(tmp_path / "net"), "--", "trainer.val_check_interval=10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "net" / "compare.csv") as f:
        rows = {float(r["network.source_drop_rate"]): r for r in csv.DictReader(f)}
    assert set(rows) == {0.0, 1.0}
    assert float(rows[0.0]["delivered_up"]) > 0.9 and float(rows[1.0]["delivered_up"]) == 0.0  # every learning packet dropped
    assert float(rows[1.0]["bg_fct_mean_s"]) < float(rows[0.0]["bg_fct_mean_s"])  # the web service is faster without it
    table = [line for line in proc.stdout.splitlines() if line.startswith(("| 0 |", "| 1 |")) and " ms, " in line]
    assert len(table) == 2 and "1.00x" in table[0] and "2.65x" in table[1]  # speed-ups over p = 0, the paper's beside
    assert (tmp_path / "net" / "network.png").stat().st_size > 20_000
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "paper_network.py"), "--p", "0.5", "--out", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "--p must include 0" in proc.stderr and not (tmp_path / "bad" / "runs").exists()


def test_deadline_compare_bounds_the_rounds_a_straggler_would_stretch(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "deadline_compare.py"), "--deadline", "0.003", "--adaptive-cap", "0", "--out", str(tmp_path / "dl"),
           "--failure", "3:1:3", "--", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in proc.stdout.splitlines()
             if line.startswith(("| tcp |", "| rps |", "| rps+deadline 3ms |", "| rps, worker 3 down |", "| rps, host:3 cut |"))]
    rows = {row[0]: row for row in cells}
    assert set(rows) == {"tcp", "rps", "rps+deadline 3ms", "rps, worker 3 down", "rps, host:3 cut"}
    # worker 3 out for rounds 1 and 2 of 4: its flows are not sent (down) or lost on its cut link
    assert float(rows["rps, worker 3 down"][5]) < float(rows["rps"][5]) and float(rows["rps, host:3 cut"][5]) < float(rows["rps"][5])
    rows = {way: rows[way] for way in ("tcp", "rps", "rps+deadline 3ms")}
    p99 = {way: float(row[4].split()[0]) for way, row in rows.items()}
    # compute 2 ms, then each phase cut at 3 ms: no round longer than 8 ms; without the deadline the straggler stretches them
    assert p99["rps+deadline 3ms"] <= 8.0 + 1e-6 < p99["rps"] < p99["tcp"]
    assert float(rows["tcp"][5]) == 1.0 and float(rows["rps+deadline 3ms"][6]) > 0
    assert (tmp_path / "dl" / "rounds.png").stat().st_size > 20_000


def test_aggregation_compare_runs_every_rule_on_both_loss_models_over_ns3(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "aggregation_compare.py"), "--rules", "rps", "hadamard", "--epochs", "1",
           "--workers", "2", "--out", str(tmp_path / "agg"), "--", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "agg" / "compare.csv") as f:
        rows = {(r["network.error_model"], r["strategy.aggregation"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(m, a) for m in ("rate", "gilbert_elliott") for a in ("rps", "hadamard")}
    for row in rows.values():
        assert float(row["steps"]) == 4 and float(row["delivered_up"]) < 1.0  # both loss models dropped training packets
    # hadamard's blocks are padded to powers of two: more bytes on the same network, a longer round
    assert float(rows["rate", "hadamard"]["comm_time_s"]) > float(rows["rate", "rps"]["comm_time_s"])
    assert [line for line in proc.stdout.splitlines() if line.startswith("| hadamard |")]  # the final-loss table
    assert (tmp_path / "agg" / "aggregation.png").stat().st_size > 20_000


def test_aggregation_compare_refuses_bad_values_before_launch(tmp_path):
    for bad, message in ((["--loss", "1.5"], "--loss 1.5 is out of range"), (["--rules", "average"], "invalid choice: 'average'")):
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "aggregation_compare.py"), *bad, "--out", str(tmp_path / "a")],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "a" / "runs").exists()


# ---------------------------------------------------------------------- one name for the drop probability; drops by cause


def test_bernoulli_takes_loss_rate_like_every_network_and_the_summary_says_where_drops_went(tmp_path):
    proc = run_app(tmp_path, "network=bernoulli", "network.loss_rate=0.1", "trainer.max_steps=3", "strategy.workers_per_device=2",
                   "strategy.deadline_s=5.5e-5", "strategy.worker_failures=[[1,0,1]]", "plot=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["network"].startswith("Bernoulli(up drop 0.1, down drop 0.1")
    drops = summary["drops"]
    assert drops["lost"] > 0 and drops["late"] > 0 and drops["other"] > 0 and drops["workers_down"] == 1
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "summary: val_acc=" in line)
    assert f"; drops: {drops['lost']:,} of {drops['packets']:,} packets: " in line and f"late {drops['late']:,}" in line
    assert "alias" not in proc.stdout + proc.stderr


def test_drop_rate_is_an_alias_of_loss_rate_that_says_so_once_and_both_differing_is_one_error(tmp_path):
    proc = run_app(tmp_path, "network=bernoulli", "network.drop_rate=0.3", "trainer.max_steps=2", "plot=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("network.drop_rate is an alias of network.loss_rate; use loss_rate") == 1, out[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["network"].startswith("Bernoulli(up drop 0.3, down drop 0.3")
    proc = run_app(tmp_path, "network=bernoulli", "network.loss_rate=0.1", "network.drop_rate=0.3", "trainer.max_steps=2",
                   run_dir="both")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "error" in line.lower()]
    assert errors == ["error: invalid `network` config: loss_rate=0.1 and its alias drop_rate=0.3 differ: give only loss_rate"], errors


def test_a_run_logged_to_a_file_is_quiet_and_prints_a_line_per_epoch(tmp_path):
    import re

    # as a user with `> log.txt`: stdout is not a terminal, and the progress bar is left at its default (on)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), f"hydra.run.dir={tmp_path / 'run'}", "network=bernoulli",
           "trainer.devices=2", "trainer.max_epochs=2", "trainer.limit_train_batches=2"]  # 2 batches < log_every_n_steps=10
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    for noise in ("LeafSpec", "Tip:", "litlogger", "litmodels", "smaller than the logging interval"):
        assert noise not in output, noise
    assert "\r" not in output and "it/s" not in output  # no progress bar
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and re.fullmatch(r"epoch 1: step=4, train_loss=\S+, val_acc=\S+, net/sim_time_s=\S+, wall \S+ s", epochs[1])
    assert "epoch 1: step=4" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("override, group", [
    ("network=ns3_starr", "network"), ("model=big", "model"), ("data=imagenet", "data"), ("strategy=horovod", "strategy"),
    ("trainer=tpu", "trainer"), ("experiment=nope", "experiment"), ("+experiment=nope", "experiment"),
])
def test_an_unknown_group_option_fails_in_one_line_naming_the_options(tmp_path, override, group):
    proc = run_app(tmp_path, override)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    options = ", ".join(sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")))
    choice = override.split("=")[1]
    assert proc.stderr.strip() == f"error: {group}={choice}: no such option; the {group} group has {options}"


def test_an_unknown_group_option_in_a_sweep_fails_before_any_job(tmp_path):
    proc = run_app(tmp_path, "network=bernoulli,ns3_starr", multirun=True)
    assert proc.returncode == 2 and not (tmp_path / "multi").exists()
    assert proc.stderr.strip() == ("error: network=ns3_starr: no such option; the network group has bernoulli, gilbert_elliott, "
                                   "ns3_leaf_spine, ns3_star, reliable, trace")


def test_paper_grid_consensus_preset_measures_the_theorems_quantities_and_reports_them_again(tmp_path):
    out = tmp_path / "consensus"
    cmd = [sys.executable, str(ROOT / "examples" / "paper_grid.py"), "--preset", "consensus", "--p", "0", "0.2", "0.5",
           "--n", "2", "4", "--seeds", "0", "1", "--steps", "40", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((out / "runs").glob("*/mean_model.pt"))
    assert len(runs) == 12 and torch.load(runs[0], weights_only=True)["mean"].shape[0] == 8  # every 5 of 40 rounds
    found = json.loads((out / "consensus.json").read_text())
    assert set(found["fits"]) == {"divergence", "distance_window", "distance_end", "loss_gap_window", "loss_gap_end"}
    assert found["window_end"] in range(5, 41, 5)
    divergence = found["values"]["divergence"]
    assert all(statistics.fmean(divergence[f"0.5,{n}"]) > statistics.fmean(divergence[f"0.2,{n}"]) > 0 for n in (2, 4))
    assert all(max(divergence[f"0,{n}"]) < 1e-6 for n in (2, 4))  # without drops the replicas agree
    fits = (out / "consensus_fits.md").read_text()
    assert fits.startswith("| quantity |") and fits in proc.stdout
    assert (out / "consensus.png").stat().st_size > 30_000
    again = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "consensus_fits.md").read_text() == fits  # the same runs, the same report: nothing trained again
    assert len(list((out / "runs").glob("*/logs/version_1"))) == 0


def test_paper_speedup_driver_tabulates_the_web_services_speedup_per_assumption(tmp_path):
    out = tmp_path / "speedup"
    cmd = [sys.executable, str(ROOT / "examples" / "paper_speedup.py"), "--rows", "volume", "volume_newreno", "--seeds", "0", "1",
           "--out", str(out), "--", "trainer.max_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in (out / "speedup.md").read_text().splitlines() if line.startswith("| volume:")]
    assert len(rows) == 1 and rows[0] in proc.stdout and "`model=mlp model.net.hidden=[400,400]" in rows[0]
    runs = {(float(r.settings["network.source_drop_rate"]), r.settings["seed"]): r
            for r in (RunResult.load(s.parent) for s in (out / "volume").glob("*/summary.json"))}
    assert set(runs) == {(0.0, 0), (1.0, 0), (0.0, 1), (1.0, 1)}
    assert runs[1.0, 0].summary["delivered_up"] == 0.0  # p = 1: every learning packet dropped
    fct = {key: r.summary["background"]["fct_mean_s"] for key, r in runs.items()}
    assert runs[0.0, 1].summary["background"]["flows"] == runs[1.0, 1].summary["background"]["flows"] > 500  # the same messages
    speedup, interval = rows[0].split("|")[4].strip().split("x ")
    assert float(speedup) == pytest.approx((fct[0.0, 0] / fct[1.0, 0] + fct[0.0, 1] / fct[1.0, 1]) / 2, abs=0.006)
    assert float(speedup) > 1 and interval.startswith("[")  # faster without the learning bursts; a 95% interval over the seeds
    newreno = [line for line in (out / "speedup.md").read_text().splitlines() if line.startswith("| volume_newreno:")]
    assert len(newreno) == 1 and newreno[0].split("|")[6].strip().startswith(("+", "-"))  # minus volume's, paired by seed
    assert (out / "speedup.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "paper_speedup.py"), "--rate", "0", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "--rate 0 must be > 0" in bad.stderr and not (tmp_path / "b" / "volume").exists()
