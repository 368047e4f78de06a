"""Where a training step's time goes: plain single-device training, Lightning DDP (one process) and
lossy_ps (one worker, and k virtual workers), each profiled with torch.profiler over a few steps.

    python benchmarks/profile_step.py --device cuda --model resnet20 --batch 128
    python benchmarks/profile_step.py --model gpt-tiny --batch 32 --workers 16   # k workers of batch / 4 each
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

from bench_workers import GPT_SIZES, StepTimer, examples, make_model
from pl_lossy import BernoulliNetwork, LossyPSStrategy


class Profiled(pl.Callback):
    def __init__(self, start: int, cuda: bool) -> None:
        self.start, self.cuda, self.prof = start, cuda, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.start:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)


def run(args, name: str, strategy, k: int = 1) -> None:
    pl.seed_everything(0, verbose=False)
    model, shape = make_model(args.model)
    n = args.batch * k * args.steps
    data = TensorDataset(*examples(args.model, shape, n))
    cuda = args.device == "cuda"
    timer, prof = StepTimer(cuda), Profiled(args.steps - args.profiled, cuda)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[timer, prof])
    trainer.fit(model, DataLoader(data, batch_size=args.batch, drop_last=True))
    if torch.distributed.is_initialized():  # every run starts from the same state
        torch.distributed.destroy_process_group()
    steps = sorted(timer.times[2 : args.steps - args.profiled])  # before the profiler slows things down
    events = prof.prof.key_averages()
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
    cuda_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / args.profiled
    RESULTS.append((name, steps[len(steps) // 2] * 1e3, cuda_total / 1e3,
                    ", ".join(f"{e.key[:40]} {e.self_cpu_time_total / args.profiled / 1e3:.2f}" for e in top)))


RESULTS: list = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("mlp", "resnet20", *GPT_SIZES), default="resnet20")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profiled", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    net = lambda: BernoulliNetwork(0.01, seed=0)  # noqa: E731
    run(args, "plain", "auto")
    run(args, "DDP, one process", DDPStrategy(start_method="popen"))
    run(args, "lossy_ps, one worker", LossyPSStrategy(network=net(), compute_time_s=0.0, divergence_every=0, start_method="popen", log_metrics=False))
    args.batch //= 4
    run(args, f"lossy_ps, {args.workers} workers x {args.batch} (vmap)",
        LossyPSStrategy(network=net(), workers_per_device=args.workers, compute_time_s=0.0, divergence_every=0, start_method="popen",
                        log_metrics=False), k=args.workers)
    print("\n| run | median step (synchronized) | device time a step | most host time a step (self CPU ms, profiled) |\n|---|---|---|---|")
    for name, median, device, top in RESULTS:
        print(f"| {name} | {median:.2f} ms | {device:.2f} ms | {top} |")


if __name__ == "__main__":
    main()
