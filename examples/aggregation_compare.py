"""Loss-tolerant aggregation rules side by side: the same model, seed and ns-3 network for every rule.

    python examples/aggregation_compare.py                          # 4 rules x {i.i.d., bursty} 20% loss, minutes
    python examples/aggregation_compare.py --loss 0.05 --burst 20 --seeds 0 1 2
    python examples/aggregation_compare.py --rules rps hadamard -- model=cnn trainer.max_epochs=10

Runs the main job as one Hydra ``-m`` sweep over ``strategy.aggregation`` (rps: models averaged over
the copies that arrived, the paper; gradient: gradients, likewise, the paper's ablation; zero_fill:
lost gradient packets count as zeros, MLT; hadamard: zero_fill in a randomized Hadamard basis,
OptiReduce) x the ns-3 star's loss model: i.i.d. (``error_model=rate``) or bursty
(``error_model=gilbert_elliott``) with the same mean loss --loss in bursts of --burst packets on
average, x --seeds. Every run has the same data, model, initialization and workers (--workers
virtual workers in one process, one server each). Then ``pl-lossy compare --over seed`` prints one
table (final validation accuracy, training loss, delivered fractions, simulated time) and writes
``aggregation.png``: the training loss of every rule against steps under each loss model, and the
final training loss of each rule under both. Everything lands in --out; arguments after ``--`` are
Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from pl_lossy.round.aggregation import AGGREGATIONS
from pl_lossy.experiment.compare import compare, pyplot, save_figure
from pl_lossy.experiment.runs import RunResult, driver_arguments, mean_curve, print_compare_hint, run_sweep

HERE = Path(__file__).resolve().parent
LOSS_MODELS = {"rate": "i.i.d.", "gilbert_elliott": "bursty"}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS))
    p.add_argument("--loss", type=float, default=0.2, help="mean packet loss at every host link, both loss models")
    p.add_argument("--burst", type=float, default=10.0, help="mean burst length in packets (the bursty model)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path("outputs/aggregation_compare"))
    args = p.parse_args(argv)
    if not 0 < args.loss < 1:
        p.error(f"--loss {args.loss} is out of range: a mean loss in (0, 1)")
    if args.burst < 1:
        p.error(f"--burst {args.burst} is out of range: a mean burst of at least 1 packet")
    if args.workers < 2 or args.epochs < 1:
        p.error("--workers must be >= 2 (one worker has nobody to lose packets to) and --epochs >= 1")
    return args


def loss_overrides(loss: float, burst: float) -> list[str]:
    """Both loss models at mean loss ``loss``: Gilbert-Elliott with every packet lost in the Bad state,
    none in the Good one, leaving Bad with probability 1/burst: pi_bad = g2b / (g2b + b2g) = loss."""
    b2g = 1.0 / burst
    g2b = loss * b2g / (1.0 - loss)
    return [f"network.error_model={','.join(LOSS_MODELS)}", f"network.loss_rate={loss}", "network.ge_loss_good=0",
            "network.ge_loss_bad=1", f"network.ge_p_bad_to_good={b2g:.6g}", f"network.ge_p_good_to_bad={g2b:.6g}"]


def by_rule(runs: Path) -> dict[tuple[str, str], list[RunResult]]:
    """(loss model, rule) -> the runs (one per seed)."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for summary in sorted(runs.glob("*/summary.json")):
        result = RunResult.load(summary.parent)
        key = (result.settings["network.error_model"], result.settings["strategy.aggregation"])
        groups.setdefault(key, []).append(result)
    return groups


def final_loss(results: list[RunResult]) -> tuple[float, float]:
    """Mean and standard error over seeds of the final training loss (the last epoch's mean)."""
    values = [r.summary["train_loss"] for r in results]
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def plot(groups: dict[tuple[str, str], list[RunResult]], rules: list[str], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = {rule: f"C{i}" for i, rule in enumerate(AGGREGATIONS)}
    for ax, (model, name) in zip(axes, LOSS_MODELS.items()):
        for rule in rules:
            if (model, rule) in groups:
                ax.plot(*mean_curve(groups[model, rule], "train_loss_epoch"), color=colors[rule], label=rule)
        ax.set(xlabel="step", ylabel="training loss (epoch mean)", yscale="log", title=f"{name} loss")
        ax.legend(fontsize=8)
    bars = axes[2]
    width = 0.8 / len(LOSS_MODELS)
    for m, (model, name) in enumerate(LOSS_MODELS.items()):
        stats = [final_loss(groups[model, rule]) if (model, rule) in groups else (math.nan, 0.0) for rule in rules]
        xs = [i + (m - (len(LOSS_MODELS) - 1) / 2) * width for i in range(len(rules))]
        bars.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=3, label=name, alpha=0.8)
    bars.set_xticks(range(len(rules)), rules)
    bars.set(ylabel="final training loss", title="final training loss (± 1 s.e. over seeds)")
    bars.legend(fontsize=8)
    save_figure(fig, path, title)


def main() -> None:
    args, overrides = driver_arguments(parse)
    started = time.time()
    runs = run_sweep(HERE / "train.py", args.out / "runs", [
        "network=ns3_star", f"strategy.aggregation={','.join(args.rules)}", *loss_overrides(args.loss, args.burst),
        "trainer.devices=1", f"strategy.workers_per_device={args.workers}", f"trainer.max_epochs={args.epochs}",
        f"seed={','.join(str(s) for s in args.seeds)}", *overrides,
    ], len(args.rules) * len(LOSS_MODELS) * len(args.seeds), names={"strategy.aggregation": "rule", "network.error_model": "loss"})
    table, _ = compare([runs], out=args.out, over=["seed"])
    print(table)
    groups = by_rule(runs)
    title = (f"{args.workers} workers, ns-3 star, mean loss {args.loss:g} (bursty: mean burst {args.burst:g} packets), "
             f"{args.epochs} epochs, {len(args.seeds)} seed(s)")
    plot(groups, args.rules, args.out / "aggregation.png", title)
    print("\nfinal training loss (mean over seeds):")
    print("| rule | " + " | ".join(LOSS_MODELS.values()) + " |\n|---|" + "---|" * len(LOSS_MODELS))
    for rule in args.rules:
        cells = [f"{final_loss(groups[m, rule])[0]:.4f}" if (m, rule) in groups else "-" for m in LOSS_MODELS]
        print(f"| {rule} | " + " | ".join(cells) + " |")
    print(f"\n{sum(map(len, groups.values()))} runs in {time.time() - started:.0f} s; "
          f"table: {args.out / 'compare.md'}, plots: {args.out / 'aggregation.png'}, {args.out / 'compare.png'}")
    print_compare_hint(runs, options=("--over", "seed", "--out", str(args.out)))


if __name__ == "__main__":
    main()
