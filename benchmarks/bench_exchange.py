"""One round of each aggregation rule against a plain all_reduce of the same flat model (gloo, N processes).

    python benchmarks/bench_exchange.py                 # 1M and 10M floats, 2 processes, drops 1% and 10%, every rule
    python benchmarks/bench_exchange.py --sizes 1e6 --drops 0.01 --iters 30 --rules rps hadamard

The RPS round is exactly what LossyPSStrategy runs after each optimizer step (RPSExchange.step with
the masks of a BernoulliNetwork round): weights from the masks, the sparse copy-aside of packets whose
downlink is lost, one dense in-place scaling, the all_reduce, the sparse keep-own restore. The gradient rules'
round is GradientExchange.step over the parameters' gradients: gather them into an fp32 buffer, weight, all_reduce,
take the aggregate, fix up missed packets, scatter back (hadamard: spread and unspread every block, on blocks
padded to powers of two, so its all_reduce is longer too). Each is timed side by side with the plain all_reduce
in the same processes, alternating, and reported as medians. Memory: the exchange's own buffers per rank
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

from pl_lossy.round.aggregation import AGGREGATIONS
from pl_lossy.round.exchange import RPSExchange
from pl_lossy.round.gradient_exchange import GradientExchange
from pl_lossy.round.rps import PacketLayout
from pl_lossy.network import BernoulliNetwork, RoundSpec


def _worker(rank, world, args, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = []
    for numel in args.sizes:
        plain = torch.randn(int(numel))
        for rule in args.rules:
            params = [torch.randn(int(numel), requires_grad=True)]
            if rule == "rps":
                ex = RPSExchange.for_params(params, rank, world, world, packet_bytes=args.packet_bytes)
                lay = ex.layout
                step = lambda up, down, r: ex.step(up, down, lambda t: dist.all_reduce(t))  # noqa: E731
            else:
                lay = PacketLayout.for_model(int(numel), world, args.packet_bytes, rule == "hadamard")
                params[0].grad = torch.randn(int(numel))
                ex = GradientExchange(rule, params, [0], lay, rank, world)
                step = lambda up, down, r: ex.step(up, down, lambda t: dist.all_reduce(t), r)  # noqa: E731
            for drop in args.drops:
                net = BernoulliNetwork(drop_rate=drop, seed=0)
                masks = []
                for r in range(args.iters + args.warmup):
                    o = net.outcome(RoundSpec(r, world, world, lay.packets_per_block, lay.packet_bytes))
                    masks.append((torch.from_numpy(o.up), torch.from_numpy(o.down)))
                t_plain, t_rule = [], []
                for i, (up, down) in enumerate(masks):
                    dist.barrier()
                    t0 = time.perf_counter()
                    dist.all_reduce(plain)
                    t1 = time.perf_counter()
                    dist.barrier()
                    t2 = time.perf_counter()
                    step(up, down, i)
                    t3 = time.perf_counter()
                    if i >= args.warmup:
                        t_plain.append(t1 - t0)
                        t_rule.append(t3 - t2)
                extra_copies = ex.extra_bytes() / (int(numel) * 4)  # beyond the parameters' (and gradients') own storage
                out.append((rule, int(numel), drop, statistics.median(t_plain), statistics.median(t_rule), extra_copies,
                            lay.padded_numel / int(numel)))
            del ex, params
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
    p.add_argument("--rules", nargs="+", choices=AGGREGATIONS, default=list(AGGREGATIONS))
    args = p.parse_args()
    manager = mp.Manager()
    results = manager.dict()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(args.procs, args, port, results), nprocs=args.procs, join=True)
    rows, peak = results[0]
    print(f"{args.procs} gloo processes, {os.cpu_count()} cores, torch {torch.__version__}, packet {args.packet_bytes} B")
    print(f"{'rule':>9} {'floats':>10} {'drop':>5} {'all_reduce ms':>14} {'round ms':>9} {'ratio':>6} {'extra copies':>13} {'wire/model':>11}")
    for rule, numel, drop, t_plain, t_rule, extra, wire in rows:
        print(f"{rule:>9} {numel:>10,} {drop:>5.2f} {t_plain * 1e3:>14.2f} {t_rule * 1e3:>9.2f} {t_rule / t_plain:>6.2f} "
              f"{extra:>13.2f} {wire:>11.2f}")
    for rank in sorted(results.keys()):
        print(f"rank {rank}: peak RSS {results[rank][1]:.0f} MiB")


if __name__ == "__main__":
    main()
