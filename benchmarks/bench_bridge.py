"""ns-3 round simulation speed in-process and through the bridge, and the simulator's memory.

    python benchmarks/bench_bridge.py                       # 4 workers, 84,000 packets a round, 5 rounds each
    python benchmarks/bench_bridge.py --workers 8 --packets-per-block 1000 --rounds 3

Both sides simulate the same rounds (different round indices, so the bridge's cache never answers)
with the same settings, one after the other in this run: first a RoundSimulator in this process,
then a bridge server started as a subprocess (ZeroMQ request/reply, its own simulation child).
The ratio is bridge throughput / in-process throughput. Memory is the simulation process's peak
resident set (VmHWM) as the kernel reports it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from ns3_bridge.client import BridgeClient
from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--packets-per-block", type=int, default=3500)
    p.add_argument("--packet-bytes", type=int, default=1400)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loss-rate", type=float, default=0.01)
    args = p.parse_args()
    config = NetworkConfig(loss_rate=args.loss_rate)
    W = args.workers
    shapes = [RoundShape(r, W, W, args.packets_per_block, args.packet_bytes) for r in range(1, args.rounds + 1)]
    packets = 2 * W * (W - 1) * args.packets_per_block
    print(f"{W} workers, co-located servers, {packets:,} packets a round ({args.packet_bytes} B), {args.rounds} rounds; "
          f"{os.cpu_count()} cores")

    from ns3_bridge.sim.simulator import RoundSimulator

    t0 = time.perf_counter()
    sim = RoundSimulator(config)
    sim.simulate(RoundShape(0, W, W, args.packets_per_block, args.packet_bytes))  # JIT warm-up
    print(f"in-process: ns-3 loaded and first round in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    local = [sim.simulate(s) for s in shapes]
    t_local = time.perf_counter() - t0
    sent = sum(r.stats["packets_sent"] for r in local)
    assert sent == packets * args.rounds
    rate_local = sent / t_local
    print(f"in-process: {rate_local:,.0f} packets/s  ({t_local / args.rounds * 1e3:.0f} ms a round); "
          f"peak RSS {peak_rss_mib(os.getpid()):.0f} MiB (this process, ns-3 loaded)")

    endpoint = f"ipc://{tempfile.gettempdir()}/bench-bridge-{os.getpid()}.ipc"
    server = subprocess.Popen([sys.executable, "-m", "ns3_bridge.server", "--endpoint", endpoint,
                               "--parent-pid", str(os.getpid())])
    try:
        client = BridgeClient(endpoint, timeout_s=600, alive=lambda: server.poll() is None)
        client.ping(timeout_s=300)
        client.configure(config, timeout_s=300)
        client.outcomes([RoundShape(0, W, W, args.packets_per_block, args.packet_bytes)])  # warm-up
        t0 = time.perf_counter()
        remote = [client.outcomes([s])[0] for s in shapes]
        t_bridge = time.perf_counter() - t0
        rate_bridge = sent / t_bridge
        sim_pid = client.ping()["simulator_pid"]
        sim_rss = peak_rss_mib(sim_pid)
        server_rss = peak_rss_mib(server.pid)
        same = all((a.up == b.up).all() and (a.down == b.down).all() for a, b in zip(local, remote))
        print(f"bridge:     {rate_bridge:,.0f} packets/s  ({t_bridge / args.rounds * 1e3:.0f} ms a round); "
              f"simulation process peak RSS {sim_rss:.0f} MiB, server {server_rss:.0f} MiB")
        print(f"ratio bridge / in-process: {rate_bridge / rate_local:.3f}   (same masks both ways: {same})")
        client.shutdown()
        server.wait(20)
    finally:
        if server.poll() is None:
            server.kill()


if __name__ == "__main__":
    main()
