"""Training step time with ns-3 in the loop against the same training over the analytic reliable network.

    python benchmarks/bench_training.py                    # MLP on digits and ResNet-20 on synthetic 3x32x32
    python benchmarks/bench_training.py --steps 40 --models mlp

For each model, the same short fit (2 gloo workers, fork launcher) runs over: ReliableNetwork
(analytic, no simulation: the floor), Ns3Network simulating each round on request, and Ns3Network
with run-ahead (rounds simulated while training computes). Wall time per optimizer step is measured
on rank 0 between the first and last step (start-up excluded) and printed with its ratio to the floor.
Run-ahead can only hide simulation behind compute on spare cores: this machine's core count is printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from pl_lossy import LossyPSStrategy, Ns3Network, ReliableNetwork
from pl_lossy.experiment.data import DigitsDataModule, SyntheticDataModule
from pl_lossy.experiment.models import MLP, Classifier, ResNet20


class StepTimer(pl.Callback):
    def __init__(self, path: Path, skip: int = 3) -> None:
        self.path, self.skip, self.times = path, skip, []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times.append(time.perf_counter())

    def on_train_end(self, trainer, *args) -> None:
        if trainer.is_global_zero:
            t = self.times[self.skip :]
            self.path.write_text(json.dumps({"per_step_s": (t[-1] - t[0]) / (len(t) - 1), "steps": len(t) - 1}))


def model_and_data(name: str, n_samples: int = 4000):
    """The digits MLP (``mlp``) or ResNet-20 on synthetic 3x32x32 images of ``n_samples``, seeded."""
    pl.seed_everything(0, verbose=False)
    if name == "mlp":
        dm = DigitsDataModule(batch_size=32)
        return Classifier(functools.partial(MLP, hidden=(128,)), dm.input_shape, dm.num_classes), dm
    dm = SyntheticDataModule(n_samples=n_samples, input_shape=(3, 32, 32), batch_size=32)
    return Classifier(ResNet20, dm.input_shape, dm.num_classes, momentum=0.9), dm


def time_fit(name: str, network, steps: int) -> float:
    model, dm = model_and_data(name)
    out = Path(tempfile.mkdtemp()) / "timing.json"
    trainer = pl.Trainer(
        strategy=LossyPSStrategy(network=network, start_method="fork"), accelerator="cpu", devices=2,
        max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer(out)],
    )
    trainer.fit(model, dm)
    return json.loads(out.read_text())["per_step_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "resnet20"], choices=["mlp", "resnet20"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--run-ahead", type=int, default=4)
    p.add_argument("--link-rate", default="10Gbps")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"2 training workers, {os.cpu_count()} cores, {args.steps} steps, ns-3 star at {args.link_rate}, 1% loss")
    for name in args.models:
        floor = time_fit(name, ReliableNetwork(), args.steps)
        on_request = time_fit(name, Ns3Network(loss_rate=0.01, link_rate=args.link_rate), args.steps)
        ahead = time_fit(name, Ns3Network(loss_rate=0.01, link_rate=args.link_rate, run_ahead=args.run_ahead), args.steps)
        print(f"{name:9} reliable analytic {floor * 1e3:7.1f} ms/step | ns-3 on request {on_request * 1e3:7.1f} ms "
              f"({on_request / floor:.2f}x) | ns-3 run-ahead {args.run_ahead} {ahead * 1e3:7.1f} ms ({ahead / floor:.2f}x)")


if __name__ == "__main__":
    main()
