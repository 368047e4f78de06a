"""What does a round deadline buy, on this model, this network, with this straggler? One command.

    python examples/deadline_compare.py                        # digits MLP, 4 workers, experiment=datacenter, worker 3 at 2x
    python examples/deadline_compare.py --slow 3:4 --deadline 0.001 0.003 -- network.background_load=0.6

Runs the main job (examples/train.py experiment=datacenter: a 2:1 oversubscribed leaf-spine at 1 Gb/s
shared with other tenants' web-search TCP flows) with one named straggler (``strategy.slow_workers``:
its compute takes that many times the others') several ways, same seed, data, model, fabric and
background flows:

  tcp             training traffic as reliable TCP: every round waits for every byte
  rps             lossy UDP + RPS: every round waits for every packet to arrive or drop
  rps+deadline D  lossy UDP + RPS, each phase cut at D simulated seconds (``strategy.deadline_s``):
                  what has not arrived by then counts as lost
  rps+adaptive    lossy UDP + RPS, the deadline adapted every round to twice the median arrival time
                  of the last one, with a margin (``strategy.adaptive_deadline``, pl_lossy/round/deadlines.py),
                  starting at and capped by --adaptive-cap

and, with ``--failure W:A:B`` (worker W out for rounds A..B-1), two more:

  rps, worker W down    its process fails (``strategy.worker_failures``): it and its server send and
                        receive nothing, its replica is frozen, it rejoins at round B
  rps, host:W cut       its access link is cut (``network.link_failures``): every packet it sends or
                        should receive is lost, while it keeps training on its own

and prints one table: final accuracy, simulated time to --target accuracy, round time (p50 and p99 of
the simulated time each round took: compute, uplink, downlink), learning packets delivered, and the
packets lost to the deadline; writes compare.md/.csv, compare.png and rounds.png (round-time
distributions) under --out. Arguments after ``--`` are Hydra overrides for every run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pl_lossy.experiment.compare import compare, pyplot, save_figure
from pl_lossy.experiment.runs import Progress, RunResult, driver_arguments, print_compare_hint, run_main_job

HERE = Path(__file__).resolve().parent


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slow", default="3:2", help="the straggler, worker:factor on its compute time (default 3:2)")
    p.add_argument("--deadline", type=float, nargs="+", default=[0.004], help="deadlines to try, seconds per phase")
    p.add_argument("--adaptive-cap", type=float, default=0.01, help="the adaptive deadline's first value and cap, seconds (0: no adaptive run)")
    p.add_argument("--compute-time-s", type=float, default=0.002, help="simulated compute per round of a normal worker")
    p.add_argument("--failure", default=None, help="also run with worker W down, and with its link cut, for rounds A..B-1: W:A:B")
    p.add_argument("--target", type=float, default=0.9, help="validation accuracy to reach")
    p.add_argument("--out", type=Path, default=Path("outputs/deadline_compare"))
    args = p.parse_args(argv)
    try:
        worker, factor = args.slow.split(":")
        args.slow = (int(worker), float(factor))
    except ValueError:
        p.error(f"--slow must be worker:factor, e.g. 3:2, got {args.slow!r}")
    if not args.slow[1] > 0 or any(not d > 0 for d in args.deadline) or not args.compute_time_s > 0 or args.adaptive_cap < 0:
        p.error("the straggler's factor, every --deadline and --compute-time-s must be > 0 (--adaptive-cap >= 0)")
    if args.failure is not None:
        try:
            w, a, b = (int(x) for x in args.failure.split(":"))
        except ValueError:
            p.error(f"--failure must be worker:first:last rounds, e.g. 3:40:120, got {args.failure!r}")
        if not (w >= 0 and 0 <= a < b):
            p.error(f"--failure {args.failure}: the worker must be >= 0 and 0 <= first < last")
        args.failure = (w, a, b)
    if not 0 < args.target <= 1:
        p.error(f"--target must be an accuracy in (0, 1], got {args.target}")
    return args


def round_times(result: RunResult) -> np.ndarray:
    """Simulated seconds each round took (the clock's steps)."""
    clock = [t for _, t in sorted(result.column("net/sim_time_s"))]
    return np.diff([0.0, *clock])


def last_deadline(result: RunResult) -> str:
    """The deadline of the run's last round (``net/deadline_s``), or "-"."""
    deadlines = sorted(result.column("net/deadline_s"))
    return f"{deadlines[-1][1] * 1e3:.2f} ms" if deadlines else "-"


def main() -> None:
    args, overrides = driver_arguments(parse)
    worker, factor = args.slow
    common = ["experiment=datacenter", "trainer.log_every_n_steps=1", "network.learning_class=false",
              f"strategy.compute_time_s={args.compute_time_s}", f"strategy.slow_workers={{{worker}:{factor}}}", *overrides]
    ways = {"tcp": ["network.transport=tcp"], "rps": ["network.transport=udp"]}
    ways.update({f"rps+deadline {d * 1e3:g}ms": ["network.transport=udp", f"strategy.deadline_s={d}"] for d in args.deadline})
    if args.adaptive_cap:
        ways["rps+adaptive"] = ["network.transport=udp", f"strategy.deadline_s={args.adaptive_cap}", "strategy.adaptive_deadline=true"]
    if args.failure is not None:
        w, a, b = args.failure
        ways[f"rps, worker {w} down"] = ["network.transport=udp", f"strategy.worker_failures=[[{w},{a},{b}]]"]
        ways[f"rps, host:{w} cut"] = ["network.transport=udp", f'network.link_failures=[["host:{w}",{a},{b}]]']
    progress = Progress(len(ways), args.out)
    results = {name: run_main_job(HERE / "train.py", args.out / "".join(c if c.isalnum() else "_" for c in name), [*common, *extra], name,
                                  progress)
               for name, extra in ways.items()}
    table, _ = compare([r.run_dir for r in results.values()], out=args.out, target=args.target)
    print(table)
    failure = "" if args.failure is None else f"; worker {args.failure[0]} out for rounds {args.failure[1]}..{args.failure[2] - 1} where named"
    print(f"\nworker {worker} computes {factor:g}x as long as the others ({args.compute_time_s * 1e3:g} ms){failure}:")
    print("| way | val_acc | sim time to target | round p50 | round p99 | learning packets delivered | lost to the deadline a round "
          "| deadline (last round) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        times = round_times(r)
        late = [v for _, v in r.column("net/packets_late")]
        to_target = r.time_to(args.target)
        print(f"| {name} | {r.summary['val_acc']:.4f} | {'-' if to_target is None else f'{to_target:.3f} s'} "
              f"| {np.percentile(times, 50) * 1e3:.2f} ms | {np.percentile(times, 99) * 1e3:.2f} ms "
              f"| {1 - r.learning_drop:.3f} | {np.mean(late) if late else 0:.0f} | {last_deadline(r)} |")
    plt = pyplot()
    fig, (hist, curve) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results.items():
        times = np.sort(round_times(r)) * 1e3
        hist.plot(times, np.arange(1, len(times) + 1) / len(times), label=name)
        curve.plot(*zip(*r.accuracy_curve()), marker=".", label=name)
    hist.set(xlabel="simulated round time (ms)", ylabel="fraction of rounds", title="round times (CDF)")
    curve.set(xlabel="simulated time (s)", ylabel="val_acc", title="accuracy against simulated time")
    for ax in (hist, curve):
        ax.legend(fontsize=8)
    save_figure(fig, args.out / "rounds.png", f"a straggler (worker {worker} at {factor:g}x) on a shared leaf-spine")
    print(f"\ntable and plots: {args.out / 'compare.md'}, {args.out / 'compare.png'}, {args.out / 'rounds.png'}")
    print_compare_hint(*(r.run_dir for r in results.values()), options=("--target", str(args.target), "--out", str(args.out)))


if __name__ == "__main__":
    main()
