"""The paper's network claim on your model: letting learning traffic be dropped speeds up the other
tenants of a shared datacenter fabric, without hurting convergence.

    python examples/datacenter_claim.py                       # digits MLP, 4 workers, experiment=datacenter
    python examples/datacenter_claim.py --target 0.9 -- network.background_load=0.6 model=cnn

Runs the main job (examples/train.py experiment=datacenter: a 2:1 oversubscribed leaf-spine at
1 Gb/s shared with other tenants' web-search TCP flows) three ways, with the same seed, data, model,
fabric and background flows:

  lossy     training traffic as lossy UDP + RPS, in the learning class (lowest priority, a buffer of
            its own at every port): under contention its packets are the ones dropped
  reliable  training traffic as TCP in the tenants' class: nothing lost, everyone shares the queues
  none      no training traffic on the fabric: the tenants alone (the training itself is not reported)

and prints, side by side: final accuracy, the training packets dropped, simulated time to --target
accuracy, communication time per round, and the background flows' completion times (flow-weighted
mean, and the mean over rounds of each round's 99th percentile). Writes results.json and claim.png
under --out. Arguments after ``--`` are Hydra overrides for all three runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pl_lossy.runs import RunResult, run_main_job, split_overrides

HERE = Path(__file__).resolve().parent
WAYS = {
    "lossy": ["network.transport=udp", "network.learning_class=true"],
    "reliable": ["network.transport=tcp", "network.learning_class=false"],
    "none": ["network.transport=none", "network.learning_class=false"],
}
LABELS = {"lossy": "lossy UDP + RPS, learning class", "reliable": "reliable TCP", "none": "no training traffic"}


def run(way: str, out: Path, overrides: list[str]) -> RunResult:
    extra = ["experiment=datacenter", "trainer.log_every_n_steps=1", *overrides, *WAYS[way]]
    return run_main_job(HERE / "train.py", out / way, extra, way)


def table(results: dict[str, RunResult], target: float) -> list[str]:
    head = (f"{'':9} {'val_acc':>7} {'learning drop':>13} {'sim time to ' + str(target):>17} {'comm/round':>11} "
            f"{'bg flows':>8} {'bg FCT mean':>11} {'bg FCT p99':>10}")
    lines = [head]
    for way, r in results.items():
        bg, s = r.background(), r.summary
        if way == "none":
            learning = f"{'-':>7} {'-':>13} {'-':>17} {'-':>11}"
        else:
            ttt = r.time_to(target)
            ttt = f"{ttt:.3f} s" if ttt is not None else "not reached"
            per_round = s["comm_time_s"] / max(1, s["rounds"])
            learning = f"{s['val_acc']:>7.4f} {r.learning_drop:>13.2%} {ttt:>17} {per_round * 1e3:>8.2f} ms"
        lines.append(f"{way:9} {learning} {bg['flows']:>8.0f} {bg['fct_mean_s'] * 1e3:>8.3f} ms {bg['fct_p99_s'] * 1e3:>7.3f} ms")
    return lines


def plot(results: dict[str, RunResult], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, fct_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for way in ("lossy", "reliable"):
        curve = results[way].accuracy_curve()
        if curve:
            t, acc = zip(*curve)
            acc_ax.plot(t, acc, marker="o", markersize=3, label=LABELS[way])
    acc_ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    acc_ax.set_xlabel("simulated time (s)")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.set_title("training")
    acc_ax.legend()
    ways = list(results)
    x = range(len(ways))
    bg = [results[w].background() for w in ways]
    fct_ax.bar([i - 0.2 for i in x], [b["fct_mean_s"] * 1e3 for b in bg], width=0.4, label="mean")
    fct_ax.bar([i + 0.2 for i in x], [b["fct_p99_s"] * 1e3 for b in bg], width=0.4, label="p99 (mean over rounds)")
    fct_ax.set_xticks(list(x), [LABELS[w] for w in ways], fontsize=8)
    fct_ax.set_ylabel("background flow completion time (ms)")
    fct_ax.set_title("the other tenants")
    fct_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    argv, overrides = split_overrides(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.93, help="validation accuracy to reach")
    p.add_argument("--compute-time-s", type=float, default=0.002, help="simulated compute per round")
    p.add_argument("--out", type=Path, default=Path("outputs/datacenter_claim"))
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        sys.exit(f"error: --target must be an accuracy in (0, 1], got {args.target}")
    args.out.mkdir(parents=True, exist_ok=True)
    common = [f"strategy.compute_time_s={args.compute_time_s}", *overrides]
    results = {way: run(way, args.out, common) for way in WAYS}

    print(f"\n{results['lossy'].summary['network']}")
    print("\n".join(table(results, args.target)))
    lossy, reliable, alone = (results[w].background()["fct_mean_s"] for w in ("lossy", "reliable", "none"))
    print(f"background mean FCT: {reliable / lossy:.2f}x faster with lossy training in the learning class than with "
          f"reliable training ({lossy / alone:.2f}x of the tenants alone)")
    summary = {way: {"background": r.background()} for way, r in results.items()}
    for way in ("lossy", "reliable"):  # the ways that train over the fabric
        r = results[way]
        summary[way].update(val_acc=r.summary["val_acc"], learning_drop=r.learning_drop, time_to_target_s=r.time_to(args.target))
    (args.out / "results.json").write_text(json.dumps({"target": args.target, "ways": summary}, indent=2))
    plot(results, args.target, args.out / "claim.png")
    print(f"plot: {args.out / 'claim.png'}")


if __name__ == "__main__":
    main()
