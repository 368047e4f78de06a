"""Step time with ns-3 in the loop, cold and warm: simulating every round, with a pool, and replaying the store.

    python benchmarks/bench_store.py                                  # digits MLP, 4 and 8 virtual workers
    python benchmarks/bench_store.py --model resnet20 --workers 4 8 16 32 --steps 10 --pool 8   # a GPU host's 16 cores

For each worker count W (virtual workers in one process, W co-located servers: 2 W (W - 1) P packets a
round), the same short fit runs over: Bernoulli drops at 1% (analytic: the floor), then the ns-3 star
(10 Gb/s, 1% loss) **cold** (one simulation process, simulating every round on request, writing a fresh
outcome store), **cold with a pool** (``--pool`` simulation processes and run-ahead of as many rounds;
no store) and **warm** (the same network again: every round replayed from the store, no bridge).
Wall time per optimizer step on the training side (start-up excluded) and its ratio to the floor,
side by side in one run. A pool can only hide simulation behind training on spare cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from bench_training import model_and_data  # this folder is on sys.path when a benchmark runs as a script
from pl_lossy import BernoulliNetwork, LossyPSStrategy, Ns3Network


class StepTimer(pl.Callback):
    def __init__(self, skip: int = 2) -> None:
        self.skip, self.times = skip, []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times.append(time.perf_counter())

    @property
    def per_step_s(self) -> float:
        t = self.times[self.skip :]
        return (t[-1] - t[0]) / (len(t) - 1)


def time_fit(name: str, network, workers: int, steps: int) -> tuple[float, LossyPSStrategy]:
    model, dm = model_and_data(name, n_samples=8192)  # enough batches that 32 workers rarely cross an epoch
    timer = StepTimer()
    strategy = LossyPSStrategy(network=network, workers_per_device=workers, compute_time_s=0.0)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    environ = dict(os.environ)
    try:
        trainer.fit(model, dm)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    return timer.per_step_s, strategy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mlp", "resnet20"], default="mlp")
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pool", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="simulation processes when cold with a pool")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{args.model}, 1 training process, {os.cpu_count()} cores, {args.steps} steps, ns-3 star 10 Gb/s 1% loss, "
          f"pool of {args.pool}")
    print(f"{'W':>3} {'packets/round':>13} {'floor ms':>9} {'cold ms':>8} {'(x)':>6} {'pool ms':>8} {'(x)':>6} {'warm ms':>8} {'(x)':>6} "
          f"{'stored rounds':>13}")
    time_fit(args.model, BernoulliNetwork(0.01, seed=0), args.workers[0], 4)  # warm-up, discarded: the first fit pays one-off costs
    for workers in args.workers:
        store = Path(tempfile.mkdtemp()) / "outcomes.sqlite"
        settings = dict(loss_rate=0.01, link_rate="10Gbps", seed=0)
        floor, strategy = time_fit(args.model, BernoulliNetwork(0.01, seed=0), workers, args.steps)
        spec = strategy.round_spec(0)
        packets = 2 * spec.n_workers * (spec.n_servers - 1) * spec.packets_per_block
        cold, _ = time_fit(args.model, Ns3Network(**settings, store=str(store)), workers, args.steps)
        pool, _ = time_fit(args.model, Ns3Network(**settings, store="off", sim_workers=args.pool, run_ahead=args.pool),
                           workers, args.steps)
        warm_net = Ns3Network(**settings, store=str(store))
        warm, _ = time_fit(args.model, warm_net, workers, args.steps)
        report = warm_net.store_summary()
        assert report["misses"] == 0, f"the warm run simulated {report['misses']} rounds"
        print(f"{workers:>3} {packets:>13,} {floor * 1e3:>9.1f} {cold * 1e3:>8.1f} {cold / floor:>5.2f}x {pool * 1e3:>8.1f} "
              f"{pool / floor:>5.2f}x {warm * 1e3:>8.1f} {warm / floor:>5.2f}x {report['rounds']:>13,} "
              f"({report['bytes'] / max(report['rounds'], 1) / 1e3:.1f} kB each)")


if __name__ == "__main__":
    main()
