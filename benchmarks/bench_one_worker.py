"""One lossy_ps worker against plain training on one device: where the difference goes.

    python benchmarks/bench_one_worker.py --device cuda --model resnet20 --batch 128
    python benchmarks/bench_one_worker.py                       # CPU: the digits MLP

With one worker there is nobody to exchange with: a round draws the network's outcome (for the
simulated clock and the metrics) and changes no parameter, so what lossy_ps costs over Lightning's
single-device training is per-step host work and whatever the parameters' layout (one flat storage)
changes on the device. Three measurements, each configuration in short fits interleaved ``--repeats``
times (shared machines drift between minutes):

1. step time: the median of synchronized steps (the device drained around each), and the free-running
   time a step over a window with one synchronization at each end (what a training loop sees);
2. host time a step by function (``cProfile``, self time), lossy_ps minus plain: what the round adds;
3. device time a step (``torch.profiler``, CUDA only): the kernels' total and the kernels that differ.

Configurations: ``plain`` (``strategy="auto"``), ``lossy`` (``LossyPSStrategy`` over a 1% Bernoulli
network, compute time fixed, no metrics) and ``lossy+metrics`` (the default, which logs the round's
metrics every step).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench_workers import make_model
from pl_lossy import BernoulliNetwork, LossyPSStrategy


class WindowTimer(pl.Callback):
    """Synchronized steps in [warmup, free_from), then one free-running window to the end."""

    def __init__(self, cuda: bool, warmup: int, free_from: int) -> None:
        self.cuda, self.warmup, self.free_from = cuda, warmup, free_from
        self.synced: list[float] = []
        self.window_start = self.window_steps = 0
        self.window_s = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx < self.free_from or batch_idx == self.free_from:
            self._sync()
            self._t0 = time.perf_counter()
            if batch_idx == self.free_from:
                self.window_start = self._t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx < self.free_from:
            self._sync()
            if batch_idx >= self.warmup:
                self.synced.append(time.perf_counter() - self._t0)
            return
        self.window_steps += 1
        if trainer.global_step >= trainer.max_steps:  # the last step
            self._sync()
            self.window_s = (time.perf_counter() - self.window_start) / self.window_steps


def strategy_for(name: str):
    if name == "plain":
        return "auto"
    return LossyPSStrategy(network=BernoulliNetwork(0.01, seed=0), compute_time_s=0.0, divergence_every=0, start_method="popen",
                           log_metrics=name == "lossy+metrics")


def fit(args, name: str, precision: str, steps: int, callbacks: list) -> None:
    pl.seed_everything(0, verbose=False)
    model, shape = make_model(args.model)
    n = args.batch * steps
    data = TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, strategy=strategy_for(name),
                         precision=precision, max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, DataLoader(data, batch_size=args.batch, drop_last=True))
    if torch.distributed.is_initialized():  # every fit starts from the same state
        torch.distributed.destroy_process_group()


def host_profile(args, name: str, precision: str) -> dict[str, tuple[float, int]]:
    """Self host time (s) and calls by function over one fit of ``args.steps`` steps."""
    profiler = cProfile.Profile()

    class On(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                profiler.enable()

        def on_train_end(self, trainer, pl_module) -> None:
            profiler.disable()

    fit(args, name, precision, args.steps, [On()])
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    return {f"{path.split('site-packages/')[-1]}:{line}({fn})": (v[2], v[1]) for (path, line, fn), v in stats.items()}


def device_profile(args, name: str, precision: str) -> dict[str, float]:
    """Device time (us) a step by kernel over ``--profiled`` steps."""
    from torch.profiler import ProfilerActivity, profile

    holder: dict = {}

    class On(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == args.steps - args.profiled:
                holder["p"] = profile(activities=[ProfilerActivity.CUDA])
                holder["p"].__enter__()

        def on_train_end(self, trainer, pl_module) -> None:
            torch.cuda.synchronize()
            holder["p"].__exit__(None, None, None)

    fit(args, name, precision, args.steps, [On()])
    out: dict[str, float] = {}
    for e in holder["p"].key_averages():
        t = getattr(e, "self_device_time_total", 0.0)
        if t > 0:
            out[e.key[:70]] = out.get(e.key[:70], 0.0) + t / args.profiled
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "resnet20"), default="mlp")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", nargs="+", default=["32-true"])
    parser.add_argument("--steps", type=int, default=80, help="steps a fit")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--synced", type=int, default=30, help="synchronized steps after warm-up; the rest run free")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profiled", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--configs", nargs="+", default=["plain", "lossy", "lossy+metrics"], choices=("plain", "lossy", "lossy+metrics"))
    args = parser.parse_args()
    if "plain" not in args.configs:
        parser.error("--configs must include plain: every ratio is against it")
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)
    rows = []
    for precision in args.precision:
        synced: dict[str, list[float]] = {c: [] for c in args.configs}
        free: dict[str, list[float]] = {c: [] for c in args.configs}
        for _ in range(args.repeats):
            for name in args.configs:
                timer = WindowTimer(cuda, args.warmup, args.warmup + args.synced)
                fit(args, name, precision, args.steps, [timer])
                synced[name] += timer.synced
                free[name].append(timer.window_s)
        base_s, base_f = statistics.median(synced["plain"]), statistics.median(free["plain"])
        for name in args.configs:
            s, f = statistics.median(synced[name]), statistics.median(free[name])
            rows.append(f"| {precision} | {name} | {s * 1e3:.2f} ms | {s / base_s:.3f}x | {f * 1e3:.2f} ms | {f / base_f:.3f}x | "
                        f"{', '.join(f'{t * 1e3:.2f}' for t in free[name])} |")

    precision = args.precision[0]
    plain, lossy = host_profile(args, "plain", precision), host_profile(args, "lossy+metrics", precision)
    n = args.steps - args.warmup
    total = (sum(v[0] for v in lossy.values()) - sum(v[0] for v in plain.values())) / n
    diff = sorted(set(plain) | set(lossy), key=lambda k: -(lossy.get(k, (0, 0))[0] - plain.get(k, (0, 0))[0]))
    print(f"\n### Host self time a step, lossy+metrics minus plain ({precision}; total {total * 1e3:+.3f} ms a step under cProfile)\n")
    print("| ms a step | calls a step (lossy / plain) | function |\n|---|---|---|")
    for key in diff[: args.rows]:
        a, b = plain.get(key, (0.0, 0)), lossy.get(key, (0.0, 0))
        print(f"| {(b[0] - a[0]) / n * 1e3:+.3f} | {b[1] / n:.1f} / {a[1] / n:.1f} | {key} |")

    if cuda:
        dp, dl = device_profile(args, "plain", precision), device_profile(args, "lossy", precision)
        print(f"\n### Device time a step ({precision}): plain {sum(dp.values()) / 1e3:.3f} ms, lossy {sum(dl.values()) / 1e3:.3f} ms\n")
        print("| us a step (lossy - plain) | plain | lossy | kernel |\n|---|---|---|---|")
        keys = sorted(set(dp) | set(dl), key=lambda k: -abs(dl.get(k, 0.0) - dp.get(k, 0.0)))
        for key in keys[: args.rows]:
            print(f"| {dl.get(key, 0.0) - dp.get(key, 0.0):+.1f} | {dp.get(key, 0.0):.1f} | {dl.get(key, 0.0):.1f} | {key} |")

    print(f"\n### Step time ({args.model}, batch {args.batch}, {args.device}, median of {args.repeats} interleaved fits)\n")
    print("| precision | run | synchronized step | / plain | free-running step | / plain | free-running by fit |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
