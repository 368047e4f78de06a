"""What a round costs to simulate as the fabric grows (leaf-spine, 4 hosts per leaf, 2 spines).

    python benchmarks/bench_fabric.py                     # 8, 16, 32 workers, 100 packets a block
    python benchmarks/bench_fabric.py --workers 8 64 --packets-per-block 50

In-process RoundSimulator, co-located servers (all-to-all traffic: 2 W (W-1) P packets a round);
prints wall time per round, simulated packets per wall second, and the queue drops that contention
caused, after one warm-up round per size.
"""

from __future__ import annotations

import argparse
import os
import time

from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape
from ns3_bridge.sim.simulator import RoundSimulator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--packets-per-block", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    cfg = NetworkConfig(topology="leaf_spine", hosts_per_leaf=4, n_spines=2)
    print(f"leaf_spine, 4 hosts/leaf, 2 spines ({cfg.oversubscription:g}:1), 10 Gb/s, "
          f"{args.packets_per_block} packets a block; {os.cpu_count()} cores")
    sim = RoundSimulator(cfg)
    for W in args.workers:
        sim.simulate(RoundShape(0, W, W, args.packets_per_block, 1400))  # warm-up, builds this size
        t0 = time.perf_counter()
        outs = [sim.simulate(RoundShape(r, W, W, args.packets_per_block, 1400)) for r in range(1, args.rounds + 1)]
        wall = (time.perf_counter() - t0) / args.rounds
        sent = outs[0].stats["packets_sent"]
        drops = sum(o.stats["drops_queue"] for o in outs) / args.rounds
        print(f"{W:4} workers: {sent:>9,.0f} packets a round, {wall:7.2f} s a round, {sent / wall:>8,.0f} packets/s, "
              f"{drops:>8,.0f} queue drops, simulated {outs[0].up_time_s * 1e3:.2f} + {outs[0].down_time_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
