"""The paper's network experiment (Yu, Tang et al., ICML 2019, Sec. 6) on ns-3, with one command.

    python examples/paper_network.py                       # --preset quick: p in {0, 0.5, 1} at 10,000 msgs/s
    python examples/paper_network.py --preset full         # p in {0, 0.1, ..., 1} x {2,000, 5,000, 10,000} msgs/s
    python examples/paper_network.py --p 0 0.1 1 --rates 10000 --seeds 0 1 -- trainer.max_steps=1000

Runs the main job with ``experiment=paper_network`` as one Hydra ``-m`` sweep over p x message rates
x seeds: 16 RPS workers (= servers) on a 1 Gb/s ns-3 star train the MNIST-1D CNN while a web service
sends 100 KB messages between random host pairs over TCP. The learning traffic may drop a fraction p
of its packets, dropped by their senders (``network.source_drop_rate``) so that each dropped packet
frees the links it would have crossed. Reports the web service's mean message completion time
(flow-weighted over all messages) and its 99th percentile (mean over rounds of each round's p99)
against p, as the speed-up over p = 0 at the same message rate, beside the paper's figures and the
learning job's accuracy and training loss; writes ``network.png`` and ``compare.md`` to --out.
Arguments after ``--`` are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pl_lossy.experiment.compare import compare, pyplot, save_figure
from pl_lossy.experiment.runs import RunResult, apply_preset, driver_arguments, print_compare_hint, run_sweep

HERE = Path(__file__).resolve().parent
PRESETS = {
    "quick": dict(p=[0.0, 0.5, 1.0], rates=[10000.0], seeds=[0], steps=300),
    "full": dict(p=[round(0.1 * i, 1) for i in range(11)], rates=[2000.0, 5000.0, 10000.0], seeds=[0], steps=300),
}
#: The paper's Figure (10,000 messages/s), read off the plot: the web service's mean completion time at
#: p = 0 over that at p (its speed-up from letting the learning traffic drop).
PAPER_SPEEDUP = {0.1: 1.2, 1.0: 2.65}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--p", type=float, nargs="+", help="fractions of learning packets dropped (default: the preset's)")
    p.add_argument("--rates", type=float, nargs="+", help="web messages a second (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps (rounds) per run (default: the preset's)")
    p.add_argument("--out", type=Path, default=Path("outputs/paper_network"))
    args = p.parse_args(argv)
    apply_preset(args, PRESETS[args.preset])
    bad = [f"--p {x}" for x in args.p if not 0 <= x <= 1] + [f"--rates {x:g}" for x in args.rates if not x > 0]
    bad += [f"--steps {args.steps}"] if args.steps < 1 else []
    if bad:
        p.error(f"{bad[0]} is out of range (p in [0, 1], message rates > 0, steps >= 1)")
    if 0.0 not in args.p:
        p.error("--p must include 0: completion times are reported relative to p = 0")
    return args


def cell(results: list[RunResult], key: str) -> float:
    """Mean over seeds of a background figure (``fct_mean_s``, ``fct_p99_s``) or a summary value (nan where
    a run has none: no validation within its steps, no message completed)."""
    values = [(r.summary.get("background") or {}).get(key) if key.startswith("fct_") else r.summary.get(key) for r in results]
    return statistics.fmean(values) if values and None not in values else float("nan")


def main() -> None:
    args, overrides = driver_arguments(parse)
    started = time.time()
    runs = run_sweep(HERE / "train.py", args.out / "runs", [
        "experiment=paper_network",
        f"network.source_drop_rate={','.join(str(p) for p in args.p)}",
        f"network.background_flows_per_s={','.join(f'{r:g}' for r in args.rates)}",
        f"seed={','.join(str(s) for s in args.seeds)}", f"trainer.max_steps={args.steps}", *overrides,
    ], len(args.p) * len(args.rates) * len(args.seeds),
        names={"network.source_drop_rate": "p", "network.background_flows_per_s": "msgs/s"})
    table, _ = compare([runs], out=args.out, over=["seed"])
    print(table)
    grid: dict[tuple[float, float], list[RunResult]] = {}
    for summary in sorted(runs.glob("*/summary.json")):
        result = RunResult.load(summary.parent)
        s = result.settings
        grid.setdefault((float(s["network.source_drop_rate"]), float(s["network.background_flows_per_s"])), []).append(result)
    ps, rates = sorted({p for p, _ in grid}), sorted({r for _, r in grid})

    print(f"\nthe web service's message completion time, speed-up over p = 0 (mean / p99), and the learning job "
          f"(mean over {len(args.seeds)} seed{'s' * (len(args.seeds) > 1)}):")
    print("| p | " + " | ".join(f"{r:,.0f} msgs/s: mean FCT, speed-up | p99, speed-up" for r in rates)
          + " | paper (10,000 msgs/s) | val_acc | final training loss | learning packets delivered |")
    print("|---|" + "---|---|" * len(rates) + "---|---|---|---|")
    for p in ps:
        cells = []
        for r in rates:
            if (p, r) not in grid:
                cells += ["-", "-"]
                continue
            mean, p99 = cell(grid[(p, r)], "fct_mean_s"), cell(grid[(p, r)], "fct_p99_s")
            cells += [f"{mean * 1e3:.2f} ms, {cell(grid[(0.0, r)], 'fct_mean_s') / mean:.2f}x",
                      f"{p99 * 1e3:.2f} ms, {cell(grid[(0.0, r)], 'fct_p99_s') / p99:.2f}x"]
        runs_at_p = [x for r in rates for x in grid.get((p, r), [])]
        delivered = statistics.fmean(0.5 * (x.summary["delivered_up"] + x.summary["delivered_down"]) for x in runs_at_p)
        paper = f"{PAPER_SPEEDUP[p]:.2f}x" if p in PAPER_SPEEDUP else "-"
        print(f"| {p:g} | " + " | ".join(cells) + f" | {paper} | {cell(runs_at_p, 'val_acc'):.4f} "
              f"| {cell(runs_at_p, 'train_loss'):.4f} | {delivered:.3f} |")

    plt = pyplot()
    fig, (speed, learn) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rates:
        at = [p for p in ps if (p, r) in grid]
        base = grid[(0.0, r)]
        speed.plot(at, [cell(base, "fct_mean_s") / cell(grid[(p, r)], "fct_mean_s") for p in at], marker="o",
                   label=f"{r:,.0f} msgs/s, mean")
        speed.plot(at, [cell(base, "fct_p99_s") / cell(grid[(p, r)], "fct_p99_s") for p in at], marker=".",
                   linestyle="--", label=f"{r:,.0f} msgs/s, p99")
    speed.plot(list(PAPER_SPEEDUP), list(PAPER_SPEEDUP.values()), "k*", markersize=10, label="the paper, 10,000 msgs/s, mean")
    speed.axhline(1, color="gray", linewidth=0.8)
    speed.set(xlabel="learning packets dropped by their senders, p", ylabel="web message completion time: p = 0 / p",
              title="the web service's speed-up")
    speed.legend(fontsize=8)
    accuracy = [cell([x for r in rates for x in grid.get((p, r), [])], "val_acc") for p in ps]
    learn.plot(ps, accuracy, marker="o", color="C2")
    learn.set(xlabel="learning packets dropped by their senders, p", ylabel="val_acc (mean over rates and seeds)",
              title="the learning job")
    save_figure(fig, args.out / "network.png",
                f"16 RPS workers on a 1 Gb/s ns-3 star with a web service of 100 KB messages, {args.steps} steps")
    print(f"\n{len(list(runs.glob('*/summary.json')))} runs in {time.time() - started:.0f} s; "
          f"table: {args.out / 'compare.md'}, plots: {args.out / 'network.png'}, {args.out / 'compare.png'}")
    print_compare_hint(runs, options=("--over", "seed", "--out", str(args.out)))


if __name__ == "__main__":
    main()
