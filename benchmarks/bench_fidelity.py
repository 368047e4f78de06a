"""What each fidelity costs and what it gets wrong: ns-3 seconds a round, and the error against `full` on the same rounds.

    python benchmarks/bench_fidelity.py                                  # resnet20 and gpt-tiny at 4 and 16 workers
    python benchmarks/bench_fidelity.py --models resnet20 gpt-tiny gpt-small --workers 4 16 32 --rounds 16
    python benchmarks/bench_fidelity.py --training                       # + the final loss, full vs reuse, paired by seed

**Network.** For each model (its parameters in 1400-byte packets, W co-located servers: 2 W (W - 1) P packets
a round) and each network (the 10 Gb/s star with 1% loss at every host link; the 10 Gb/s leaf-spine, 4 hosts
a rack, 2 spines, with 4 hosts of tenants' web-search flows at 40% of every host link, 1/100 of the bytes),
rounds 0 .. N-1 are simulated at `full` (one simulation process, no store), each timed. `reuse` of K rounds
serves round r >= K the outcome of round s(r) < K (bit for bit ns-3's, tests/test_fidelity.py), so its cost
for a run of R rounds is K rounds of ns-3 plus R lookups (timed here from memory): the speed-up is printed for
R = 1,000 and the default K = 64, and for K = R / 100. Its error is measured on rounds K .. N-1, where it
serves other rounds than `full` simulates: the relative difference of the mean and 1st percentile of the
per-flow delivered fraction, of the mean and 99th percentile of loss-burst lengths (consecutive lost packets
of a flow), of the 50th and 99th percentiles of the round's exchange time, and of the tenants' mean and
99th-percentile flow completion time. A cell estimated (from the rate measured so far) to need more than
--max-cell-s of ns-3 is skipped and says so.

**Training** (``--training``): experiment=paper_grid (MNIST-1D, the CNN, 16 virtual workers, plain SGD) on
the leaf-spine with tenants, --steps steps, at `full` and at `reuse` of --reuse-rounds rounds, seeds
--seeds: the final training loss of each pair (same seed: same data order, initialization and simulated
rounds 0 .. K-1), their difference beside the seed-to-seed spread at `full`. Rounds land in the outcome
store, so the reuse runs replay their K rounds from the full runs'.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench_workers import parameter_count  # this folder is on sys.path when a benchmark runs as a script
from pl_lossy.network import Ns3Network, RoundSpec
from pl_lossy.network.fidelity import Fidelity, ReusedRounds
from pl_lossy.round.rps import PacketLayout

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = {
    "star 1%": dict(topology="star", loss_rate=0.01),
    "leaf-spine, tenants 40%": dict(topology="leaf_spine", hosts_per_leaf=4, n_spines=2, loss_rate=0.0, background_load=0.4,
                                    background_size_scale=0.01, background_hosts=4),
}
HYDRA_NETWORK = ["network=ns3_leaf_spine", "network.background_load=0.4", "network.background_size_scale=0.01",
                 "network.background_hosts=4"]


def spec_of(model: str, workers: int, round_index: int) -> RoundSpec:
    layout = PacketLayout.for_model(parameter_count(model), workers, 1400)
    return RoundSpec(round_index, workers, workers, layout.packets_per_block, 1400)


def flow_statistics(outs, spec: RoundSpec) -> dict[str, np.ndarray]:
    """Per flow and round: delivered fractions; loss-burst lengths; per round: exchange time, tenants' FCTs."""
    remote = ~spec.local_pairs()
    delivered, bursts = [], []
    for o in outs:
        for mask in (o.up[remote], o.down.transpose(1, 0, 2)[remote]):  # [flows, P]
            delivered.extend(mask.mean(axis=1))
            lost = np.pad(~mask, ((0, 0), (1, 1))).astype(np.int8)
            edges = np.diff(lost, axis=1)
            starts, ends = np.nonzero(edges == 1), np.nonzero(edges == -1)
            bursts.extend(ends[1] - starts[1])  # row-major: each flow's runs in order, starts and ends paired
    return {
        "delivered": np.asarray(delivered),
        "bursts": np.asarray(bursts if bursts else [0]),
        "time": np.asarray([o.comm_time_s for o in outs]),
        "fct_mean": np.asarray([o.stats.get("background_fct_mean_s", np.nan) for o in outs]),
        "fct_p99": np.asarray([o.stats.get("background_fct_p99_s", np.nan) for o in outs]),
    }


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


ERRORS = {  # name: (statistic, how it is read off flow_statistics)
    "delivered mean": lambda s: s["delivered"].mean(),
    "delivered p1": lambda s: np.percentile(s["delivered"], 1),
    "burst mean": lambda s: s["bursts"].mean(),
    "burst p99": lambda s: np.percentile(s["bursts"], 99),
    "time p50": lambda s: np.percentile(s["time"], 50),
    "time p99": lambda s: np.percentile(s["time"], 99),
    "tenants FCT mean": lambda s: np.nanmean(s["fct_mean"]) if not np.isnan(s["fct_mean"]).all() else math.nan,
    "tenants FCT p99": lambda s: np.nanmean(s["fct_p99"]) if not np.isnan(s["fct_p99"]).all() else math.nan,
}


def network_cell(model: str, workers: int, name: str, n_rounds: int, k: int) -> dict:
    specs = [spec_of(model, workers, r) for r in range(n_rounds)]
    network = Ns3Network(store="off", fidelity="full", sim_workers=1, timeout_s=3600, max_round_packets=10**9, seed=0,
                         **NETWORKS[name])
    try:
        network.outcome(specs[0])  # the bridge's start and ns-3's first build: not a round's cost
        outs, seconds = [], []
        for spec in specs:
            t0 = time.perf_counter()
            outs.append(network.outcome(spec))
            seconds.append(time.perf_counter() - t0)
    finally:
        network.close()
    reuse = Fidelity("reuse", k)
    kept = ReusedRounds()
    for r in range(k):
        kept.keep(r, None, outs[r])
    t0 = time.perf_counter()
    served = [kept.get(reuse.source_round(0, r), None) for r in range(k, n_rounds)]
    serve_s = (time.perf_counter() - t0) / max(1, n_rounds - k)
    full_stats, reuse_stats = flow_statistics(outs[k:], specs[0]), flow_statistics(served, specs[0])
    errors = {}
    for stat, read in ERRORS.items():
        f, r = read(full_stats), read(reuse_stats)
        errors[stat] = None if math.isnan(f) else relative(r, f)
    full_s = statistics.mean(seconds)
    return dict(model=model, workers=workers, network=name, packets=2 * int((~specs[0].local_pairs()).sum()) * specs[0].packets_per_block,
                full_s=full_s, serve_s=serve_s, errors=errors, rounds=n_rounds, k=k,
                delivered=float(full_stats["delivered"].mean()))


def speedup(full_s: float, serve_s: float, run_rounds: int, k: int) -> float:
    """A run of ``run_rounds`` rounds at full over the same at reuse of ``k`` (``k`` simulated, the rest looked up)."""
    k = min(k, run_rounds)
    return run_rounds * full_s / (k * full_s + (run_rounds - k) * serve_s)


class Table:
    """Lines printed as they come and kept, to be written to a file the docs include (docs/fidelity.md)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")
        print(f"written: {path}")


def network_table(args, table: Table) -> list[dict]:
    rows: list[dict] = []
    rates: dict[str, float] = {}  # packets per ns-3 second, per network, the slowest measured so far
    for name in args.networks:
        for model in args.models:
            for w in args.workers:
                packets = 2 * w * (w - 1) * spec_of(model, w, 0).packets_per_block
                rate = rates.get(name)
                if rate is not None and packets * (args.rounds + 1) / rate > args.max_cell_s:
                    table.add(f"| {model} | {w} | {name} | {packets:,} | skipped: over --max-cell-s of ns-3 at the rate "
                          "measured above |")
                    continue
                row = network_cell(model, w, name, args.rounds, args.k)
                rates[name] = min(rates.get(name, math.inf), row["packets"] / row["full_s"])
                rows.append(row)
                e = row["errors"]
                cells = " | ".join("-" if e[s] is None else f"{100 * e[s]:.1f}%" for s in ERRORS)
                table.add(f"| {model} | {w} | {name} | {row['packets']:,} | {row['delivered']:.3f} | {row['full_s']:.2f} | "
                      f"{1e3 * row['serve_s']:.2f} | {speedup(row['full_s'], row['serve_s'], 1000, 64):.0f}x | "
                      f"{speedup(row['full_s'], row['serve_s'], 1000, 10):.0f}x | {cells} |")
    return rows


def training_table(args) -> None:
    from pl_lossy.experiment.runs import run_sweep

    sweep = args.out / "training"
    overrides = ["experiment=paper_grid", *HYDRA_NETWORK, "strategy.workers_per_device=16", f"trainer.max_steps={args.steps}",
                 f"trainer.val_check_interval={args.steps}", "network.fidelity=full,reuse", f"network.fidelity_rounds={args.reuse_rounds}",
                 "seed=" + ",".join(map(str, args.seeds))]
    run_sweep(ROOT / "examples" / "train.py", sweep, overrides, 2 * len(args.seeds), names={"network.fidelity": "fidelity"})
    final: dict[tuple[str, int], float] = {}
    for summary in sorted(sweep.glob("*/summary.json")):
        data = json.loads(summary.read_text())
        cfg = data["config"]
        final[(cfg["network"]["fidelity"], cfg["seed"])] = data.get("train_eval_loss") or data["train_loss"]
    print(f"\nTraining: experiment=paper_grid, 16 workers, {args.steps} steps, leaf-spine with tenants, reuse of {args.reuse_rounds} rounds")
    table = Table()
    table.add("| seed | full | reuse | reuse - full |")
    table.add("| --- | --- | --- | --- |")
    for seed in args.seeds:
        f, r = final[("full", seed)], final[("reuse", seed)]
        table.add(f"| {seed} | {f:.4f} | {r:.4f} | {r - f:+.4f} |")
    fulls = [final[("full", s)] for s in args.seeds]
    diffs = [final[("reuse", s)] - final[("full", s)] for s in args.seeds]
    table.add("")
    table.add(f"Seed-to-seed spread at full (max - min): {max(fulls) - min(fulls):.4f}; mean |reuse - full|: "
              f"{statistics.mean(abs(d) for d in diffs):.4f}.")
    table.write(args.out / "training.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "gpt-tiny"], choices=["resnet20", "gpt-tiny", "gpt-small", "gpt2"])
    p.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--rounds", type=int, default=12, help="rounds simulated at full per cell (N)")
    p.add_argument("--k", type=int, default=4, help="reuse's simulated rounds for the error columns (rounds K..N-1 compared)")
    p.add_argument("--max-cell-s", type=float, default=600.0)
    p.add_argument("--training", action="store_true")
    p.add_argument("--no-network", action="store_true", help="only the training table")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reuse-rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=Path("outputs/bench_fidelity"))
    args = p.parse_args()
    if not 1 <= args.k < args.rounds:
        sys.exit(f"error: --k must be in [1, --rounds), got {args.k} with --rounds {args.rounds}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_network:
        print(f"ns-3 seconds a round at full (one process, mean of {args.rounds}); reuse: a lookup, and the speed-up of a "
              f"1,000-round run at K = 64 and K = 10; relative error of reuse (K = {args.k}) against full on rounds {args.k}..{args.rounds - 1}\n")
        table = Table()
        table.add("| model | W | network | packets a round | delivered | full s/round | reuse ms/round | speed-up K=64 | K=10 | "
                  + " | ".join(ERRORS) + " |")
        table.add("| --- " * (9 + len(ERRORS)) + "|")
        rows = network_table(args, table)
        table.write(args.out / "network.md")
        (args.out / "network.json").write_text(json.dumps(rows, indent=1))
    if args.training:
        training_table(args)


if __name__ == "__main__":
    main()
