"""Where the paper's 2.65x comes from: its network experiment under one assumption at a time, on ns-3.

    python examples/paper_speedup.py                          # every row below but volume_full, p in {0, 1}, 3 seeds
    python examples/paper_speedup.py --rows baseline volume   # some of them
    python examples/paper_speedup.py --rows volume -- network.queue_packets=50   # and overrides for every run

Every row is ``experiment=paper_network`` (16 RPS workers = servers on a 1 Gb/s ns-3 star; a web service of
100 KB TCP messages between random host pairs, 10,000 a second) with the overrides that make one assumption
the paper's. Each row runs at p = 0 (every learning packet sent) and p = 1 (every one dropped by its sender,
``network.source_drop_rate``) for every seed and reports the web service's speed-up from letting the learning
traffic drop, completion time at p = 0 over that at p = 1 of the same seed (the paper: 2.65x, mean, read off
its figure), mean and 99th percentile, as the mean over seeds with its 95% interval (FCT columns: means over
seeds). The burst_* rows change only how long the learning traffic's bursts last, at the same share of the fabric:
the driver says at which burst length the speed-up reaches the paper's. Writes ``speedup.md`` (the table, each
row's overrides beside it, that length) and ``speedup.png`` to --out.
Arguments after ``--`` are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pl_lossy.experiment.compare import pyplot, save_figure
from pl_lossy.experiment.consensus import interval95
from pl_lossy.experiment.runs import RunResult, driver_arguments, run_sweep

HERE = Path(__file__).resolve().parent
PAPER = 2.65  # the web service's mean completion time at p = 0 over that at p = 1, 10,000 messages a second

# The learning traffic of ResNet-110 (1.7M parameters): an MLP 40-1300-1300-10 on MNIST-1D has 1,757,610, so a round
# moves the same bytes: each worker sends 15 blocks of 314 packets up and receives as many down, 108 ms at 1 Gb/s
# (its burst). At the paper's 2.4 of 16 Gb/s (15%) a round then lasts 108 ms / 0.15 = 718 ms: the web service's
# messages keep arriving over that window (7,180 a round), most of it with the learning traffic idle (its duty
# cycle). ns-3 takes minutes a round there, so the assumptions are tried at a tenth of it with the same share and
# duty cycle: an MLP 40-400-400-10 (180,810 parameters, 33 packets a block: 11.1 ms bursts every 75.5 ms, 755
# messages a round); `volume_full` checks the full size on two rounds, and the burst_* rows sweep the burst's
# length at the same share (MLPs 40-h-h-10; window = burst / 0.15).


@dataclass(frozen=True)
class Row:
    """One assumption: what it is, its overrides, the rounds it runs, and (rows that differ from the baseline only
    in how long the learning traffic's bursts last, at the same share) that burst: both phases at line rate."""

    what: str
    overrides: list[str]
    steps: int
    burst_ms: Optional[float] = None


def mlp_traffic(hidden: int, window: str) -> list[str]:
    return ["model=mlp", f"model.net.hidden=[{hidden},{hidden}]", f"network.background_window={window}"]


TENTH = mlp_traffic(400, "75.5ms")
ROWS: dict[str, Row] = {
    "baseline": Row("paper_network as it is: a 5k-parameter CNN, 15% of the fabric in 0.34 ms bursts", [], 300, 0.34),
    "burst_0.9ms": Row("an MLP of 15,210 parameters: 0.93 ms bursts every 6.2 ms", mlp_traffic(100, "6.2ms"), 16, 0.93),
    "burst_3ms": Row("an MLP of 50,410 parameters: 3.1 ms bursts every 20.7 ms", mlp_traffic(200, "20.7ms"), 8, 3.1),
    "volume": Row("ResNet-110's traffic pattern at a tenth of its size: 11.1 ms bursts every 75.5 ms", TENTH, 4, 11.1),
    "burst_32ms": Row("an MLP of 526,410 parameters: 32.3 ms bursts every 216 ms", mlp_traffic(700, "215.6ms"), 2, 32.3),
    "volume_linux_rto": Row("volume and Linux's 200 ms minimum RTO (instead of 1 ms)", [*TENTH, "network.tcp_min_rto=200ms"], 4),
    "volume_small_buffers": Row("volume and 20-packet switch buffers (instead of 100)", [*TENTH, "network.queue_packets=20"], 4),
    "volume_newreno": Row("volume and NewReno (instead of CUBIC)", [*TENTH, "network.tcp_variant=newreno"], 4),
    "volume_priority": Row("volume and learning packets in a low-priority queue at the switch (p = 0: sent, deprioritized)",
                           [*TENTH, "network.learning_class=true"], 4),
    "volume_full": Row("ResNet-110's traffic at full size: 108 ms bursts every 718 ms (minutes a round)",
                       mlp_traffic(1300, "718ms"), 2, 107.8),
}
DEFAULT_ROWS = [name for name in ROWS if name != "volume_full"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS,
                   help="the assumptions to run (default: all but volume_full)")
    p.add_argument("--rate", type=float, default=10000.0, help="web messages a second (the paper's figure: 10,000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds (messages, drops, the model): the speed-up is reported as a mean over them with its 95%% interval")
    p.add_argument("--out", type=Path, default=Path("outputs/paper_speedup"))
    args = p.parse_args(argv)
    if not args.rate > 0:
        p.error(f"--rate {args.rate:g} must be > 0")
    return args


def background(result: RunResult, key: str) -> float:
    value = (result.summary.get("background") or {}).get(key)
    return float("nan") if value is None else float(value)


def ratio_cell(values: list[float]) -> str:
    """``2.30x [2.11, 2.49]``: the mean over seeds and its 95% t-interval (one seed: the value alone)."""
    mean, lo, hi = interval95(values)
    return f"{mean:.2f}x" + (f" [{lo:.2f}, {hi:.2f}]" if len(values) > 1 else "")


def paper_crossing(curve: list[tuple[float, float]]) -> Optional[float]:
    """The burst length (ms) at which the mean speed-up first reaches :data:`PAPER`, interpolating linearly in
    log(burst) between neighbouring rows; None if no two neighbours straddle it."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 < PAPER <= y1:
            return math.exp(math.log(x0) + (PAPER - y0) / (y1 - y0) * (math.log(x1) - math.log(x0)))
    return None


def plot(speedups: dict[str, tuple[list[float], list[float]]], bursts: list[tuple[float, str]], seeds: int, path: Path,
         title: str) -> None:
    """(a) every row's speed-up, mean and p99 with their 95% intervals; (b) with two burst rows or more, the
    speed-up against the learning traffic's burst length at the same share."""
    plt = pyplot()
    names = list(speedups)
    panels = 2 if len(bursts) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(9 + 6 * (panels - 1), 0.8 + 0.55 * len(names)), squeeze=False)
    ax = axes[0][0]
    for offset, k, label in ((0.2, 0, "mean"), (-0.2, 1, "p99")):
        stats = [interval95(speedups[n][k]) for n in names]
        errors = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]] if seeds > 1 else None
        ax.barh([i + offset for i in range(len(names))], [m for m, _, _ in stats], height=0.4, xerr=errors, capsize=3,
                label=f"{label} (95% interval over {seeds} seeds)" if errors else label)
    ax.axvline(PAPER, color="k", linestyle="--", label=f"the paper: {PAPER}x (mean)")
    ax.axvline(1, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="web message completion time, p = 0 over p = 1", title="(a) one assumption a row")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        for k, label, marker in ((0, "mean", "o"), (1, "p99", "s")):
            stats = [interval95(speedups[n][k]) for _, n in bursts]
            errors = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]] if seeds > 1 else None
            ax.errorbar([ms for ms, _ in bursts], [m for m, _, _ in stats], yerr=errors, marker=marker, capsize=3, label=label)
        ax.axhline(PAPER, color="k", linestyle="--", label=f"the paper: {PAPER}x (mean)")
        ax.axhline(1, color="gray", linewidth=0.8)
        ax.set(xscale="log", xlabel="the learning traffic's burst, ms (both phases at line rate; 15% of the fabric)",
               ylabel="speed-up, p = 0 over p = 1", title="(b) the speed-up against the burst's length")
        ax.legend(fontsize=8)
    save_figure(fig, path, title)


def main() -> None:
    args, overrides = driver_arguments(parse)
    started = time.time()
    lines = ["| assumption | p = 0: mean FCT / p99 | p = 1: mean FCT / p99 | speed-up, mean [95%] | speed-up, p99 [95%] | "
             "minus volume's, paired by seed [95%] | learning packets delivered at p = 0 | messages, all runs | overrides |",
             "|---|---|---|---|---|---|---|---|---|"]
    speedups: dict[str, tuple[list[float], list[float]]] = {}  # name: each seed's speed-up, mean and p99
    for name in args.rows:
        what, row, steps = ROWS[name].what, ROWS[name].overrides, ROWS[name].steps
        runs = run_sweep(HERE / "train.py", args.out / name, [
            "experiment=paper_network", "network.source_drop_rate=0.0,1.0", f"network.background_flows_per_s={args.rate:g}",
            f"seed={','.join(map(str, args.seeds))}", f"trainer.max_steps={steps}", "trainer.val_check_interval=null",
            "trainer.limit_val_batches=0", *row, *overrides,
        ], 2 * len(args.seeds), names={"network.source_drop_rate": "p"})
        by = {(float(r.settings["network.source_drop_rate"]), int(r.settings["seed"])): r
              for r in (RunResult.load(s.parent) for s in sorted(runs.glob("*/summary.json")))}
        fct = {(p, key): statistics.fmean(background(by[(p, s)], key) for s in args.seeds)
               for p in (0.0, 1.0) for key in ("fct_mean_s", "fct_p99_s")}
        ratios = {key: [background(by[(0.0, s)], key) / background(by[(1.0, s)], key) for s in args.seeds]
                  for key in ("fct_mean_s", "fct_p99_s")}
        speedups[name] = (ratios["fct_mean_s"], ratios["fct_p99_s"])
        paired = "-"
        if name.startswith("volume_") and name != "volume_full" and "volume" in speedups:  # the same seeds: compare seed by seed
            mean, lo, hi = interval95([a - b for a, b in zip(ratios["fct_mean_s"], speedups["volume"][0])])
            paired = f"{mean:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if len(args.seeds) > 1 else "")
        flows = sum(background(r, "flows") for r in by.values())
        delivered = statistics.fmean(0.5 * (by[(0.0, s)].summary["delivered_up"] + by[(0.0, s)].summary["delivered_down"])
                                     for s in args.seeds)
        lines.append(f"| {name}: {what} | {fct[(0.0, 'fct_mean_s')] * 1e3:.2f} / {fct[(0.0, 'fct_p99_s')] * 1e3:.2f} ms "
                     f"| {fct[(1.0, 'fct_mean_s')] * 1e3:.2f} / {fct[(1.0, 'fct_p99_s')] * 1e3:.2f} ms "
                     f"| {ratio_cell(ratios['fct_mean_s'])} | {ratio_cell(ratios['fct_p99_s'])} | {paired} | {delivered:.3f} | {flows:,.0f} "
                     f"| `{' '.join(row) or '-'}` |")
        print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    bursts = sorted((ROWS[n].burst_ms, n) for n in speedups if ROWS[n].burst_ms is not None)
    crossing = paper_crossing([(ms, statistics.fmean(speedups[n][0])) for ms, n in bursts])
    if crossing is not None:
        table += (f"\nThe paper's {PAPER}x (mean) is reached at a burst of about {crossing:.0f} ms (log-linear "
                  f"interpolation between the burst rows' means).\n")
    (args.out / "speedup.md").write_text(table)
    plot(speedups, bursts, len(args.seeds), args.out / "speedup.png",
         f"the web service's speed-up from dropping all learning traffic, {args.rate:,.0f} messages/s")
    print(f"\n{table}\n{2 * len(args.seeds) * len(speedups)} runs in {time.time() - started:.0f} s; table: {args.out / 'speedup.md'}, "
          f"plot: {args.out / 'speedup.png'}")


if __name__ == "__main__":
    main()
