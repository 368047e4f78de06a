"""One RPS round against a plain all_reduce of the same flat model (gloo, N processes on this machine).

    python benchmarks/bench_exchange.py                 # 1M and 10M floats, 2 processes, drops 1% and 10%
    python benchmarks/bench_exchange.py --sizes 1e6 --drops 0.01 --iters 30

The RPS round is exactly what LossyPSStrategy runs after each optimizer step (RPSExchange.step with
the masks of a BernoulliNetwork round): weights from the masks, the sparse copy-aside of packets whose
downlink is lost, one dense in-place scaling, the all_reduce, the sparse keep-own restore. Both are timed side by side in
the same processes, alternating, and reported as medians. Memory: the exchange's own buffers per rank
beyond the parameters, as multiples of the model, and the peak resident memory of each rank.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pl_lossy.exchange import RPSExchange
from pl_lossy.network import BernoulliNetwork, RoundSpec


def _worker(rank, world, args, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = []
    for numel in args.sizes:
        params = [torch.randn(int(numel))]
        plain = torch.randn(int(numel))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ex = RPSExchange.for_params(params, rank, world, world, packet_bytes=args.packet_bytes)
        lay = ex.layout
        for drop in args.drops:
            net = BernoulliNetwork(drop_rate=drop, seed=0)
            masks = []
            for r in range(args.iters + args.warmup):
                o = net.outcome(RoundSpec(r, world, world, lay.packets_per_block, lay.packet_bytes))
                masks.append((torch.from_numpy(o.up), torch.from_numpy(o.down)))
            t_plain, t_rps = [], []
            for i, (up, down) in enumerate(masks):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(plain)
                t1 = time.perf_counter()
                dist.barrier()
                t2 = time.perf_counter()
                ex.step(up, down, lambda t: dist.all_reduce(t))
                t3 = time.perf_counter()
                if i >= args.warmup:
                    t_plain.append(t1 - t0)
                    t_rps.append(t3 - t2)
            extra_copies = ex.extra_bytes() / (int(numel) * 4)  # beyond the parameters' own storage
            out.append((int(numel), drop, statistics.median(t_plain), statistics.median(t_rps), extra_copies))
        del ex, params
        out_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out[-1] = out[-1] + ((out_rss - rss_before) / 1024,)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results[rank] = (out, peak)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    p.add_argument("--drops", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--packet-bytes", type=int, default=1400)
    args = p.parse_args()
    manager = mp.Manager()
    results = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(args.procs, args, port, results), nprocs=args.procs, join=True)
    rows, peak = results[0]
    print(f"{args.procs} gloo processes, {os.cpu_count()} cores, torch {torch.__version__}, packet {args.packet_bytes} B")
    print(f"{'floats':>10} {'drop':>5} {'all_reduce ms':>14} {'RPS round ms':>13} {'ratio':>6} {'extra copies':>13}")
    for row in rows:
        numel, drop, t_plain, t_rps, extra = row[:5]
        print(f"{numel:>10,} {drop:>5.2f} {t_plain * 1e3:>14.2f} {t_rps * 1e3:>13.2f} {t_rps / t_plain:>6.2f} {extra:>13.2f}")
    for rank in sorted(results.keys()):
        print(f"rank {rank}: peak RSS {results[rank][1]:.0f} MiB")


if __name__ == "__main__":
    main()
