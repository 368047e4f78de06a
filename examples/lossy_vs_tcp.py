"""Time-to-accuracy of lossy UDP + RPS against reliable TCP on the same simulated network.

    python examples/lossy_vs_tcp.py                                   # digits MLP, 4 workers, 1 Gb/s, 2% loss
    python examples/lossy_vs_tcp.py --target 0.9 -- network.link_rate=100Mbps model=cnn

Runs the main job (examples/train.py) twice with the same seed, data, model and ns-3 network, once
with network.transport=udp (drops applied by RPS) and once with network.transport=tcp (everything
delivered, later), reads each run's metrics.csv, and reports the simulated time at which validation
accuracy first reaches --target, side by side, with a plot (time_to_accuracy.png). Arguments after
``--`` are Hydra overrides for both runs. Compute time per round is fixed (--compute-time-s) so that
the two runs differ only by their network, not by this machine's noise.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(transport: str, out: Path, overrides: list[str]) -> Path:
    run_dir = out / transport
    cmd = [sys.executable, str(HERE / "train.py"), f"hydra.run.dir={run_dir}", f"network.transport={transport}",
           "trainer.enable_progress_bar=false", *overrides]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {transport} run failed:\n{proc.stderr[-2000:]}")
    return run_dir


def accuracy_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(simulated time at the validation, val_acc) for every validation of the run."""
    rows = list(csv.DictReader(open(next(run_dir.glob("logs/version_*/metrics.csv")))))
    sim_at_step: dict[int, float] = {}
    for r in rows:
        if r.get("net/sim_time_s"):
            sim_at_step[int(r["step"])] = float(r["net/sim_time_s"])
    curve = []
    for r in rows:
        if r.get("val_acc"):
            step = int(r["step"])
            earlier = [s for s in sim_at_step if s <= step]
            curve.append((sim_at_step[max(earlier)] if earlier else 0.0, float(r["val_acc"])))
    return curve


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
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
    results = {}
    for transport in ("udp", "tcp"):
        run_dir = run(transport, args.out, common)
        summary = json.loads((run_dir / "summary.json").read_text())
        curve = accuracy_curve(run_dir)
        results[transport] = dict(curve=curve, time_to_target=time_to(curve, args.target), summary=summary)

    print(f"\ntarget val_acc {args.target}; {args.workers} workers, {args.link_rate}, loss {args.loss_rate}")
    print(f"{'':5} {'final val_acc':>13} {'sim time to target':>19} {'comm time / round':>18} {'sim time total':>15}")
    for transport, r in results.items():
        s = r["summary"]
        ttt = f"{r['time_to_target']:.3f} s" if r["time_to_target"] is not None else "not reached"
        per_round = s["comm_time_s"] / max(1, s["rounds"])
        print(f"{transport:5} {s['val_acc']:>13.4f} {ttt:>19} {per_round * 1e3:>15.3f} ms {s['sim_time_s']:>13.3f} s")
    udp, tcp = results["udp"]["time_to_target"], results["tcp"]["time_to_target"]
    if udp is not None and tcp is not None:
        print(f"speed-up of lossy UDP + RPS over TCP to {args.target}: {tcp / udp:.2f}x")
    (args.out / "results.json").write_text(json.dumps({k: {**v, "summary": None} for k, v in results.items()}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for transport, r in results.items():
        t, acc = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(t, acc, marker="o", label=f"{transport.upper()}" + (" + RPS" if transport == "udp" else " (reliable)"))
    ax.axhline(args.target, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{args.workers} workers, {args.link_rate}, {args.loss_rate:.0%} loss (ns-3)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "time_to_accuracy.png", dpi=120)
    print(f"plot: {args.out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
