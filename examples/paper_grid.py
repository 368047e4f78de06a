"""The paper's drop-rate x workers grid (Yu, Tang et al., ICML 2019) on MNIST-1D, with one command.

    python examples/paper_grid.py                      # --preset quick: minutes on 2 cores
    python examples/paper_grid.py --preset full        # p in {0,.01,.05,.1,.2,.4,.5} x n in {2,4,8,16,32} x 3 seeds
    python examples/paper_grid.py --preset consensus   # the same grid, 5 seeds, 400 steps: the theorem's quantities
    python examples/paper_grid.py --network ns3        # on the ns-3 star, the same loss at every host link
    python examples/paper_grid.py --p 0 0.5 --n 2 8 --seeds 0 1 2 -- trainer.max_steps=1000
    python examples/paper_grid.py --rules rps gradient   # and the paper's ablation: gradients averaged instead of models

Runs the main job with ``experiment=paper_grid`` (RPS, n virtual workers = servers in one process,
plain SGD, per-worker batch 32, the MNIST-1D CNN) as one Hydra ``-m`` sweep over p x n x seeds (every
job is checked before the first trains), then reports with ``pl-lossy compare --over seed``: one table
(final training loss, validation accuracy, delivered fractions, simulated time: mean +- std over
seeds) and ``grid.png``: (a) training loss against steps for each p at the largest n (the paper's
figure); (b) the gap to p = 0 in final training loss and in accuracy against n, one line per p (does
the influence of p fade as n grows?); with ``--rules rps gradient``, (c) the paper's ablation: final
training loss against p at the largest n, models averaged (RPS) against gradients averaged
(``strategy.aggregation=gradient``); (a) and (b) are RPS's. Everything lands in --out. Arguments after
``--`` are Hydra overrides for every run.

``--preset consensus`` also records the replicas' divergence every 10 rounds and their mean model every 5
(``strategy.mean_model_every``) and reports what drops did to both beside what the noise model of one RPS
round predicts (:mod:`pl_lossy.experiment.consensus`): ``consensus.md`` (tables with 95% intervals, the
fitted exponents of p and n), ``consensus.json`` and ``consensus.png``. ``--report-only`` reports the
runs already in --out without training.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from pl_lossy.experiment import consensus
from pl_lossy.experiment.compare import compare, pyplot, save_figure
from pl_lossy.round.aggregation import AGGREGATIONS
from pl_lossy.experiment.runs import (RunResult, apply_preset, driver_arguments, launcher_overrides, mean_curve,
                                      print_compare_hint, run_sweep)

HERE = Path(__file__).resolve().parent
PRESETS = {
    "quick": dict(p=[0.0, 0.1, 0.5], n=[2, 16], seeds=[0, 1], steps=1000),
    "full": dict(p=[0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.5], n=[2, 4, 8, 16, 32], seeds=[0, 1, 2], steps=2000),
    # the theorem's quantities (docs/reproduction.md): the replicas' divergence every 10 rounds, their mean model every 5
    "consensus": dict(p=[0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.5], n=[2, 4, 8, 16, 32], seeds=[0, 1, 2, 3, 4], steps=400),
}
PRESET_OVERRIDES = {"consensus": ["strategy.divergence_every=10", "strategy.mean_model_every=5"]}
NETWORKS = ("bernoulli", "ns3")
DROP_KEY = "network.loss_rate"  # the drop probability, on either network
SHORT = {"network.loss_rate": "p", "strategy.workers_per_device": "n",
         "strategy.aggregation": "rule"}  # the progress lines' names for the swept keys


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--p", type=float, nargs="+", help="drop rates (default: the preset's)")
    p.add_argument("--n", type=int, nargs="+", help="worker counts (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--network", choices=NETWORKS, default="bernoulli",
                   help="bernoulli: the paper's i.i.d. model; ns3: the ns-3 star with that loss at every host link")
    p.add_argument("--rules", nargs="+", choices=AGGREGATIONS, default=["rps"],
                   help="aggregation rules (rps first: the grid's; others for the ablation panel)")
    p.add_argument("--out", type=Path, default=Path("outputs/paper_grid"))
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the runs already in --out/runs (a finished or interrupted grid)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs side by side on this machine (Hydra's joblib launcher: pip install -e '.[sweep]')")
    args = p.parse_args(argv)
    if args.rules[0] != "rps":
        args.rules = ["rps", *(r for r in args.rules if r != "rps")]
    apply_preset(args, PRESETS[args.preset])
    bad = [f"--p {x}" for x in args.p if not 0 <= x < 1] + [f"--n {x}" for x in args.n if x < 1]
    bad += [f"--steps {args.steps}"] if args.steps < 1 else []
    bad += [f"--jobs {args.jobs}"] if args.jobs < 1 else []
    if bad:
        p.error(f"{bad[0]} is out of range (drop rates in [0, 1), worker counts and steps >= 1)")
    return args


def sweep(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Every run of the grid as one -m sweep of the main job; returns the sweep's folder."""
    network = ["network=ns3_star"] if args.network == "ns3" else []
    return run_sweep(HERE / "train.py", args.out / "runs", [
        "experiment=paper_grid", *network,
        f"{DROP_KEY}={','.join(str(p) for p in args.p)}",
        f"strategy.workers_per_device={','.join(str(n) for n in args.n)}",
        f"seed={','.join(str(s) for s in args.seeds)}", f"strategy.aggregation={','.join(args.rules)}",
        f"trainer.max_steps={args.steps}", *PRESET_OVERRIDES.get(args.preset, []), *launcher_overrides(args.jobs), *overrides,
    ], len(args.p) * len(args.n) * len(args.seeds) * len(args.rules), names=SHORT)


def grid_of(runs: Path, drop_key: str) -> dict[str, dict[tuple[float, int], list[RunResult]]]:
    """rule -> (p, n) -> the runs (one per seed)."""
    grids: dict[str, dict[tuple[float, int], list[RunResult]]] = {}
    for summary in sorted(runs.glob("*/summary.json")):
        result = RunResult.load(summary.parent)
        settings = result.settings
        grid = grids.setdefault(settings.get("strategy.aggregation", "rps"), {})
        grid.setdefault((float(settings[drop_key]), int(settings["strategy.workers_per_device"])), []).append(result)
    return grids


def finals(results: list[RunResult], key: str) -> list[float]:
    """Each seed's final ``key``; the training loss is the whole training set's when the runs evaluated it."""
    if key == "train_loss" and all(r.summary.get("train_eval_loss") is not None for r in results):
        key = "train_eval_loss"
    return [r.summary[key] for r in results]


def final(results: list[RunResult], key: str) -> float:
    """Mean over seeds."""
    return statistics.fmean(finals(results, key))


def spread(results: list[RunResult], key: str) -> float:
    """Standard error over seeds of :func:`final` (0 with one seed)."""
    values = finals(results, key)
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def plot(grids: dict[str, dict[tuple[float, int], list[RunResult]]], path: Path, title: str) -> None:
    plt = pyplot()
    grid = grids["rps"]
    ps, ns = sorted({p for p, _ in grid}), sorted({n for _, n in grid})
    fig, axes = plt.subplots(1, 3 + (len(grids) > 1), figsize=(16 + 5 * (len(grids) > 1), 4.2))
    curves, loss_gap, acc_gap = axes[:3]
    n_max = ns[-1]
    for p in ps:
        if (p, n_max) in grid:
            curves.plot(*mean_curve(grid[(p, n_max)], "train_loss"), linewidth=1, label=f"p = {p:g}")
    curves.set(xlabel="step", ylabel="training loss (mean over seeds)", title=f"(a) training loss, n = {n_max}")
    curves.legend(fontsize=8)
    for p in ps[1:] if ps and ps[0] == 0 else ps:
        pairs = [n for n in ns if (p, n) in grid and (0.0, n) in grid]
        for ax, key in ((loss_gap, "train_loss"), (acc_gap, "val_acc")):
            gaps = [final(grid[(p, n)], key) - final(grid[(0.0, n)], key) for n in pairs]
            errors = [math.hypot(spread(grid[(p, n)], key), spread(grid[(0.0, n)], key)) for n in pairs]
            ax.errorbar(pairs, gaps, yerr=errors, marker="o", capsize=3, label=f"p = {p:g}")
    for ax, what in ((loss_gap, "final training loss"), (acc_gap, "final validation accuracy")):
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set(xlabel="workers n", ylabel=f"{what}: p minus p = 0", title=f"(b) the gap to p = 0: {what} (± 1 s.e.)")
        ax.legend(fontsize=8)
    if len(grids) > 1:
        ablation = axes[3]
        for rule, rule_grid in grids.items():
            at = [p for p in ps if (p, n_max) in rule_grid]
            ablation.errorbar(at, [final(rule_grid[(p, n_max)], "train_loss") for p in at],
                              yerr=[spread(rule_grid[(p, n_max)], "train_loss") for p in at], marker="o", capsize=3,
                              label="models averaged (RPS)" if rule == "rps" else f"{rule} (aggregation={rule})")
        ablation.set(xlabel="drop rate p", ylabel="final training loss", yscale="log",
                     title=f"(c) the ablation, n = {n_max} (± 1 s.e.)")
        ablation.legend(fontsize=8)
    save_figure(fig, path, title)


def gap_table(grid: dict) -> str:
    """The gap to p = 0 at each n, final training loss / validation accuracy (means over seeds), as markdown."""
    ns = sorted({n for _, n in grid})
    lines = ["| p | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for p in sorted({p for p, _ in grid}):
        if p == 0:
            continue
        cells = [
            f"{final(grid[(p, n)], 'train_loss') - final(grid[(0.0, n)], 'train_loss'):+.4f} / "
            f"{final(grid[(p, n)], 'val_acc') - final(grid[(0.0, n)], 'val_acc'):+.4f}"
            if (p, n) in grid and (0.0, n) in grid else "-" for n in ns
        ]
        lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, overrides = driver_arguments(parse)
    started = time.time()
    runs = args.out / "runs" if args.report_only else sweep(args, overrides)
    if not list(runs.glob("*/summary.json")):
        raise SystemExit(f"error: no runs in {runs}: run the grid first (without --report-only)")
    table, _ = compare([runs], out=args.out, over=["seed"])
    print(table)
    drop_key = DROP_KEY
    grids = grid_of(runs, drop_key)
    grid = grids["rps"]
    results = [r for cell in grid.values() for r in cell]
    steps, seeds = max(r.summary["steps"] for r in results), len({r.settings["seed"] for r in results})  # the runs', not the preset's
    ns3 = any(str(r.settings.get("network._target_", "")).endswith("Ns3Network") for r in results)
    title = (f"RPS on MNIST-1D (CNN), plain SGD, batch 32 per worker, {steps} steps, "
             f"{'ns-3 star' if ns3 else 'i.i.d. drops'}, {seeds} seeds")
    plot(grids, args.out / "grid.png", title)
    gaps = gap_table(grid)
    (args.out / "gaps.md").write_text(gaps)
    print(f"\nthe gap to p = 0 (final training loss / accuracy, mean over {seeds} seeds):\n{gaps}", end="")
    if len(grids) > 1:
        print(f"\nthe ablation: final training loss by aggregation rule (mean over {seeds} seeds):")
        print("| p | n | " + " | ".join(grids) + " |\n|---|---|" + "---|" * len(grids))
        for p, n in sorted(grid):
            cells = [f"{final(g[(p, n)], 'train_loss'):.4f}" if (p, n) in g else "-" for g in grids.values()]
            print(f"| {p:g} | {n} | " + " | ".join(cells) + " |")
    if all((r.run_dir / "mean_model.pt").is_file() for r in results):  # runs of --preset consensus (or mean_model_every)
        try:
            found = consensus.report(consensus.measure(grid), args.out, title=f"{title}: the theorem's quantities")
        except ValueError as exc:
            raise SystemExit(f"error: the consensus report: {exc}") from None
        print(f"\n{found.markdown}")
    print(f"\n{len(list(runs.glob('*/summary.json')))} runs in {time.time() - started:.0f} s; "
          f"table: {args.out / 'compare.md'}, plots: {args.out / 'grid.png'}, {args.out / 'compare.png'}")
    print_compare_hint(runs, options=("--over", "seed", "--out", str(args.out)))


if __name__ == "__main__":
    main()
