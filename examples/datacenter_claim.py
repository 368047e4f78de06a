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

and prints, side by side (pl-lossy compare's table): final accuracy, the delivered fractions, simulated
time to --target accuracy, and the background flows' completion times (flow-weighted mean, and the mean
over rounds of each round's 99th percentile). Writes results.json, compare.md/.csv and compare.png
under --out. Arguments after ``--`` are Hydra overrides for all three runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pl_lossy.experiment.compare import compare
from pl_lossy.experiment.runs import Progress, RunResult, print_compare_hint, run_main_job, split_overrides

HERE = Path(__file__).resolve().parent
WAYS = {
    "lossy": ["network.transport=udp", "network.learning_class=true"],
    "reliable": ["network.transport=tcp", "network.learning_class=false"],
    "none": ["network.transport=none", "network.learning_class=false"],
}


def run(way: str, out: Path, overrides: list[str], progress: Progress) -> RunResult:
    extra = ["experiment=datacenter", "trainer.log_every_n_steps=1", *overrides, *WAYS[way]]
    return run_main_job(HERE / "train.py", out / way, extra, way, progress)


def background(result: RunResult) -> dict:
    """The tenants' flows over the run (summary.json's ``background``)."""
    return result.summary["background"]


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
    progress = Progress(len(WAYS), args.out)
    results = {way: run(way, args.out, common, progress) for way in WAYS}

    print(f"\n{results['lossy'].summary['network']}")
    table, _ = compare([args.out / way for way in WAYS], out=args.out, target=args.target)
    print(table)
    lossy, reliable, alone = (background(results[w])["fct_mean_s"] for w in ("lossy", "reliable", "none"))
    print(f"background mean FCT: {reliable / lossy:.2f}x faster with lossy training in the learning class than with "
          f"reliable training ({lossy / alone:.2f}x of the tenants alone)")
    summary = {way: {"background": background(r)} for way, r in results.items()}
    for way in ("lossy", "reliable"):  # the ways that train over the fabric
        r = results[way]
        summary[way].update(val_acc=r.summary["val_acc"], learning_drop=r.learning_drop, time_to_target_s=r.time_to(args.target))
    (args.out / "results.json").write_text(json.dumps({"target": args.target, "ways": summary}, indent=2))
    print(f"table and plot: {args.out / 'compare.md'}, {args.out / 'compare.png'}")
    print_compare_hint(*(args.out / way for way in WAYS), options=("--target", str(args.target), "--out", str(args.out)))

if __name__ == "__main__":
    main()
