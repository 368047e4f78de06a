"""What packet loss costs a transformer, per aggregation rule: the field's question in one command.

    python examples/gpt_loss.py                          # --preset quick: 4 rules x p in {0, .01, .1}, Bernoulli (CPU)
    python examples/gpt_loss.py --network ns3            # the same on the ns-3 leaf-spine with 40% tenants' load
    python examples/gpt_loss.py --preset full --seeds 0 1 2 -- model.size=small trainer.accelerator=gpu

Runs the main job with ``experiment=gpt_loss`` (the byte-level GPT on the Python standard library, 16 virtual
workers in one process, AdamW, warm-up and cosine decay, gradients clipped per worker) as one Hydra ``-m``
sweep over the aggregation rules (rps: models averaged over the copies that arrived, the paper; gradient:
gradients, likewise; zero_fill: lost gradient packets count as zeros, MLT; hadamard: zero_fill in a
randomized Hadamard basis, OptiReduce) x the drop probability p x seeds. Runs with the same seed share the
data order and the initialization and, at the same p, the network's drop sequence (but hadamard's, whose
blocks are padded to powers of two: its packets are other packets): they are paired. Then
``pl-lossy compare --over seed`` tabulates the runs, and ``gpt_loss.png`` plots validation bits per byte
against steps per rule at each p, and the final bits per byte against p. The table of the cost of loss
(final bits per byte minus the same rule's at p = 0, mean over seeds) is printed and written to
``cost.md``. ``--network ns3``: the ns-3 leaf-spine (4 hosts a rack, 2 spines, 10 Gb/s) with 4 more hosts
of tenants' web-search flows at 40% of every host link (1/100 of the bytes), p the loss at every host link.
Everything lands in --out; arguments after ``--`` are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from pl_lossy.experiment.compare import compare, pyplot, save_figure
from pl_lossy.experiment.runs import (RunResult, apply_preset, driver_arguments, launcher_overrides, mean_curve,
                                      print_compare_hint, run_sweep)
from pl_lossy.round.aggregation import AGGREGATIONS

HERE = Path(__file__).resolve().parent
PRESETS = {
    "quick": dict(p=[0.0, 0.01, 0.1], seeds=[0], steps=150, batch=2),  # ~1 min a run on 2 CPU cores
    "full": dict(p=[0.0, 0.01, 0.1], seeds=[0, 1, 2], steps=300, batch=4),
}
NETWORKS = {
    "bernoulli": ["network=bernoulli"],
    "ns3": ["network=ns3_leaf_spine", "network.background_load=0.4", "network.background_size_scale=0.01",
            "network.background_hosts=4"],
}
SHORT = {"strategy.aggregation": "rule", "network.loss_rate": "p"}
VALIDATE_EVERY = 50  # experiment=gpt_loss's trainer.val_check_interval (a shorter run validates at its last step)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--rules", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS))
    p.add_argument("--p", type=float, nargs="+", help="drop probabilities (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the preset's)")
    p.add_argument("--batch", type=int, help="windows per worker a step (default: the preset's)")
    p.add_argument("--network", choices=sorted(NETWORKS), default="bernoulli")
    p.add_argument("--out", type=Path, default=Path("outputs/gpt_loss"))
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (Hydra's joblib launcher: pip install -e '.[sweep]')")
    args = p.parse_args(argv)
    apply_preset(args, PRESETS[args.preset])
    bad = [f"--p {x}" for x in args.p if not 0 <= x < 1] + [f"--{k} {v}" for k, v in
                                                           (("steps", args.steps), ("batch", args.batch), ("jobs", args.jobs)) if v < 1]
    if bad:
        p.error(f"{bad[0]} is out of range (drop probabilities in [0, 1), steps, batch and jobs >= 1)")
    if args.steps > VALIDATE_EVERY and args.steps % VALIDATE_EVERY:
        p.error(f"--steps {args.steps}: use a multiple of {VALIDATE_EVERY} (runs validate every {VALIDATE_EVERY} steps, and the "
                "final bits per byte must be the last step's)")
    return args


def by_rule(runs: Path) -> dict[tuple[str, float], list[RunResult]]:
    """(rule, p) -> the runs (one per seed)."""
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for summary in sorted(runs.glob("*/summary.json")):
        r = RunResult.load(summary.parent)
        groups.setdefault((r.settings["strategy.aggregation"], float(r.settings["network.loss_rate"])), []).append(r)
    return groups


def final(results: list[RunResult]) -> tuple[float, float]:
    """Mean and standard error over seeds of the final validation bits per byte (NaN if a run diverged)."""
    values = [r.summary["val_bpb"] if r.summary.get("val_bpb") is not None else math.nan for r in results]
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def cost_table(groups: dict[tuple[str, float], list[RunResult]], rules: list[str], ps: list[float]) -> str:
    """Final validation bits per byte per rule and p, and (in brackets) minus the same rule's at p = 0."""
    lines = ["| rule | " + " | ".join(f"p = {p:g}" for p in ps) + " |", "|---|" + "---|" * len(ps)]
    for rule in rules:
        cells = []
        for p in ps:
            if (rule, p) not in groups:
                cells.append("-")
                continue
            bpb = final(groups[rule, p])[0]
            base = groups.get((rule, 0.0))
            cells.append(f"{bpb:.4f}" + (f" ({bpb - final(base)[0]:+.4f})" if base and p > 0 else ""))
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(groups: dict[tuple[str, float], list[RunResult]], rules: list[str], ps: list[float], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ps) + 1, figsize=(5 * (len(ps) + 1), 4.2), squeeze=False)
    colors = {rule: f"C{i}" for i, rule in enumerate(AGGREGATIONS)}
    for ax, p in zip(axes[0], ps):
        for rule in rules:
            if (rule, p) in groups:
                ax.plot(*mean_curve(groups[rule, p], "val_bpb"), marker="o", markersize=3, color=colors[rule], label=rule)
        ax.set(xlabel="step", ylabel="validation bits per byte", title=f"p = {p:g}")
        ax.legend(fontsize=8)
    last = axes[0][-1]
    for rule in rules:
        at = [p for p in ps if (rule, p) in groups]
        stats = [final(groups[rule, p]) for p in at]
        last.errorbar(at, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, color=colors[rule], label=rule)
    last.set(xlabel="drop probability p", ylabel="final validation bits per byte", title="the cost of loss (± 1 s.e.)")
    last.legend(fontsize=8)
    save_figure(fig, path, title)


def main() -> None:
    args, overrides = driver_arguments(parse)
    started = time.time()
    n = len(args.rules) * len(args.p) * len(args.seeds)
    runs = run_sweep(HERE / "train.py", args.out / "runs", [
        "experiment=gpt_loss", *NETWORKS[args.network], f"strategy.aggregation={','.join(args.rules)}",
        f"network.loss_rate={','.join(str(p) for p in args.p)}", f"seed={','.join(str(s) for s in args.seeds)}",
        f"trainer.max_steps={args.steps}", f"data.batch_size={args.batch}", *launcher_overrides(args.jobs), *overrides,
    ], n, names=SHORT)
    table, _ = compare([runs], out=args.out, over=["seed"])
    print(table)
    groups = by_rule(runs)
    title = (f"byte-level GPT, 16 workers x {args.batch} windows, {args.steps} steps, "
             f"{'i.i.d. drops' if args.network == 'bernoulli' else 'ns-3 leaf-spine, 40% tenants'}, {len(args.seeds)} seed(s)")
    plot(groups, args.rules, args.p, args.out / "gpt_loss.png", title)
    cost = cost_table(groups, args.rules, args.p)
    (args.out / "cost.md").write_text(cost)
    print(f"\nfinal validation bits per byte (minus the rule's at p = 0), mean over {len(args.seeds)} seed(s):\n{cost}", end="")
    print(f"\n{sum(map(len, groups.values()))} runs in {time.time() - started:.0f} s; "
          f"table: {args.out / 'compare.md'}, plots: {args.out / 'gpt_loss.png'}, {args.out / 'compare.png'}")
    print_compare_hint(runs, options=("--over", "seed", "--out", str(args.out)))


if __name__ == "__main__":
    main()
