"""Time-to-accuracy of lossy UDP + RPS against reliable TCP on the same simulated network.

    python examples/lossy_vs_tcp.py                                   # digits MLP, 4 workers, 1 Gb/s, 2% loss
    python examples/lossy_vs_tcp.py --target 0.9 -- network.link_rate=100Mbps model=cnn

Runs the main job (examples/train.py) twice with the same seed, data, model and ns-3 network, once
with network.transport=udp (drops applied by RPS) and once with network.transport=tcp (everything
delivered, later), reads each run's metrics.csv, and reports the simulated time at which validation
accuracy first reaches --target, side by side (pl-lossy compare's table and compare.png). Arguments after
``--`` are Hydra overrides for both runs. Compute time per round is fixed (--compute-time-s) so that
the two runs differ only by their network, not by this machine's noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pl_lossy.experiment.compare import compare
from pl_lossy.experiment.runs import Progress, print_compare_hint, run_main_job, split_overrides

HERE = Path(__file__).resolve().parent


def main() -> None:
    argv, overrides = split_overrides(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.93, help="validation accuracy to reach")
    p.add_argument("--loss-rate", type=float, default=0.02)
    p.add_argument("--link-rate", default="1Gbps")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--compute-time-s", type=float, default=0.002, help="simulated compute per round")
    p.add_argument("--out", type=Path, default=Path("outputs/lossy_vs_tcp"))
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        sys.exit(f"error: --target must be an accuracy in (0, 1], got {args.target}")
    common = [
        f"network.loss_rate={args.loss_rate}", f"network.link_rate={args.link_rate}", f"trainer.devices={args.workers}",
        f"trainer.max_epochs={args.epochs}", f"strategy.compute_time_s={args.compute_time_s}",
        "trainer.log_every_n_steps=1", *overrides,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    results, progress = {}, Progress(2, args.out)
    for transport in ("udp", "tcp"):
        result = run_main_job(HERE / "train.py", args.out / transport, [*common, f"network.transport={transport}"], transport, progress)
        results[transport] = dict(curve=result.accuracy_curve(), time_to_target=result.time_to(args.target), summary=result.summary)

    print(f"\ntarget val_acc {args.target}; {args.workers} workers, {args.link_rate}, loss {args.loss_rate}")
    table, _ = compare([args.out / "udp", args.out / "tcp"], out=args.out, target=args.target)
    print(table)
    udp, tcp = results["udp"]["time_to_target"], results["tcp"]["time_to_target"]
    if udp is not None and tcp is not None:
        print(f"speed-up of lossy UDP + RPS over TCP to {args.target}: {tcp / udp:.2f}x")
    else:
        print(f"the target {args.target} was not reached by {'udp' if udp is None else 'tcp'}: raise --epochs or lower --target")
    (args.out / "results.json").write_text(json.dumps({k: {**v, "summary": None} for k, v in results.items()}, indent=2))
    print(f"table and plot: {args.out / 'compare.md'}, {args.out / 'compare.png'}")
    print_compare_hint(args.out / "udp", args.out / "tcp", options=("--target", str(args.target), "--out", str(args.out)))


if __name__ == "__main__":
    main()
