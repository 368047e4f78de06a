"""ns-3 round simulation speed in-process and through the bridge, and the simulator's memory.

    python benchmarks/bench_bridge.py                  # 4 training workers, 84,000 packets a round, 6 rounds
    python benchmarks/bench_bridge.py --workers 8 --packets-per-block 1000 --rounds 8 --sim-workers 2

Three ways, one after the other in this run, on the same rounds (round indices the bridge has not
cached) with the same settings: a RoundSimulator in this process; a bridge server subprocess with one
simulation worker, one round per request; the same with a pool of --sim-workers simulation processes,
all rounds in one request. Ratios: bridge / in-process (what ZeroMQ and the process hop cost) and
pool / one worker (how the pool scales). Memory is each simulation process's peak resident set
(VmHWM) as the kernel reports it.
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
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--loss-rate", type=float, default=0.01)
    p.add_argument("--sim-workers", type=int, default=os.cpu_count(), help="simulation processes of the pool (default: cores)")
    args = p.parse_args()
    config = Bridge.config = NetworkConfig(loss_rate=args.loss_rate)
    W = args.workers
    shapes = [RoundShape(r, W, W, args.packets_per_block, args.packet_bytes) for r in range(1, args.rounds + 1)]
    packets = 2 * W * (W - 1) * args.packets_per_block
    print(f"{W} training workers, co-located servers, {packets:,} packets a round ({args.packet_bytes} B), {args.rounds} rounds; "
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

    with Bridge(1) as client:
        client.outcomes([RoundShape(0, W, W, args.packets_per_block, args.packet_bytes)])  # warm-up
        t0 = time.perf_counter()
        remote = [client.outcomes([s])[0] for s in shapes]
        t_bridge = time.perf_counter() - t0
        rate_bridge = sent / t_bridge
        sim_rss = peak_rss_mib(client.ping()["simulator_pids"][0])
        same = all((a.up == b.up).all() and (a.down == b.down).all() for a, b in zip(local, remote))
        print(f"bridge, 1 simulation worker: {rate_bridge:,.0f} packets/s  ({t_bridge / args.rounds * 1e3:.0f} ms a round); "
              f"simulation process peak RSS {sim_rss:.0f} MiB")
    print(f"ratio bridge / in-process: {rate_bridge / rate_local:.3f}   (same masks both ways: {same})")

    K = args.sim_workers
    with Bridge(K) as client:
        client.outcomes([RoundShape(0, W, W, args.packets_per_block, args.packet_bytes)])  # warm-up
        t0 = time.perf_counter()
        pooled = client.outcomes(shapes)  # one request: the pool simulates K rounds at a time
        t_pool = time.perf_counter() - t0
        rate_pool = sent / t_pool
        rss = [peak_rss_mib(pid) for pid in client.ping()["simulator_pids"]]
        same_pool = all((a.up == b.up).all() and (a.down == b.down).all() for a, b in zip(local, pooled))
        print(f"bridge, {K} simulation workers: {rate_pool:,.0f} packets/s; peak RSS per simulation process "
              f"{', '.join(f'{r:.0f}' for r in rss)} MiB")
    print(f"ratio {K} workers / 1 worker: {rate_pool / rate_bridge:.2f}  (target >= {0.8 * K:.1f}; "
          f"same masks as in-process: {same_pool})")


class Bridge:
    """A bridge server subprocess with K simulation workers, configured, for a with-block."""

    def __init__(self, workers: int, config: NetworkConfig | None = None) -> None:
        self.workers = workers
        self.config = config or Bridge.config

    def __enter__(self) -> BridgeClient:
        endpoint = f"ipc://{tempfile.gettempdir()}/bench-bridge-{os.getpid()}-{self.workers}.ipc"
        self.server = subprocess.Popen([sys.executable, "-m", "ns3_bridge.server", "--endpoint", endpoint,
                                        "--workers", str(self.workers), "--parent-pid", str(os.getpid())],
                                       stdout=subprocess.DEVNULL)
        self.client = BridgeClient(endpoint, timeout_s=600, alive=lambda: self.server.poll() is None)
        self.client.ping(timeout_s=300)
        self.client.configure(self.config, timeout_s=300)
        return self.client

    def __exit__(self, *exc) -> None:
        try:
            self.client.shutdown()
            self.server.wait(20)
        finally:
            if self.server.poll() is None:
                self.server.kill()

if __name__ == "__main__":
    main()
