"""What a round costs to simulate as the fabric grows (leaf-spine, 4 hosts per leaf, 2 spines),
without and with other tenants' background flows.

    python benchmarks/bench_fabric.py                     # 8, 16, 32 workers, 100 packets a block
    python benchmarks/bench_fabric.py --workers 8 64 --packets-per-block 50 --background-load 0.6

In-process RoundSimulator, co-located servers (all-to-all traffic: 2 W (W-1) P packets a round);
prints wall time per round, simulated packets per wall second, and the queue drops that contention
caused, after one warm-up round per size; then the same rounds with background flows (web-search
sizes x --background-size-scale at --background-load of every host link, over each round's ideal
exchange time) and the ratio of the two wall times, measured side by side.
"""

from __future__ import annotations

import argparse
import os
import time

from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape
from ns3_bridge.sim.simulator import RoundSimulator


def measure(cfg: NetworkConfig, W: int, P: int, rounds: int) -> tuple[float, list]:
    """Wall seconds per round (after a warm-up round that builds this size) and the rounds' outcomes."""
    sim = RoundSimulator(cfg)
    sim.simulate(RoundShape(0, W, W, P, 1400))
    t0 = time.perf_counter()
    outs = [sim.simulate(RoundShape(r, W, W, P, 1400)) for r in range(1, rounds + 1)]
    wall = (time.perf_counter() - t0) / rounds
    sim.close()  # one ns-3 per process: the next configuration builds its own
    return wall, outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--packets-per-block", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--background-load", type=float, default=0.4)
    p.add_argument("--background-size-scale", type=float, default=0.01)
    args = p.parse_args()
    cfg = NetworkConfig(topology="leaf_spine", hosts_per_leaf=4, n_spines=2)
    with_bg = NetworkConfig(**{**cfg.to_dict(), "background_load": args.background_load,
                               "background_size_scale": args.background_size_scale})
    print(f"leaf_spine, 4 hosts/leaf, 2 spines ({cfg.oversubscription:g}:1), 10 Gb/s, "
          f"{args.packets_per_block} packets a block; {os.cpu_count()} cores")
    for W in args.workers:
        wall, outs = measure(cfg, W, args.packets_per_block, args.rounds)
        sent = outs[0].stats["packets_sent"]
        drops = sum(o.stats["drops_queue"] for o in outs) / args.rounds
        print(f"{W:4} workers: {sent:>9,.0f} packets a round, {wall:7.2f} s a round, {sent / wall:>8,.0f} packets/s, "
              f"{drops:>8,.0f} queue drops, simulated {outs[0].up_time_s * 1e3:.2f} + {outs[0].down_time_s * 1e3:.2f} ms")
        bg_wall, bg_outs = measure(with_bg, W, args.packets_per_block, args.rounds)
        flows = sum(o.stats["background_flows"] for o in bg_outs) / args.rounds
        fct = sum(o.stats["background_fct_mean_s"] for o in bg_outs) / args.rounds
        print(f"      + background {args.background_load:g} load: {flows:>6,.0f} flows a round (mean FCT {fct * 1e3:.3f} ms), "
              f"{bg_wall:7.2f} s a round, {bg_wall / wall:.2f}x the round without them")


if __name__ == "__main__":
    main()
