"""Small real fits (2-4 gloo processes, fork launcher) shared by the strategy tests."""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from pl_lossy import LossyPSStrategy
from pl_lossy.experiment.data import DigitsDataModule
from pl_lossy.experiment.models import MLP, Classifier


def digits_model(seed=0, hidden=(64,), lr=0.1, momentum=0.0, dm=None, weight_decay=0.0):
    pl.seed_everything(seed, verbose=False)
    dm = dm or DigitsDataModule(batch_size=32, seed=seed)
    model = Classifier(functools.partial(MLP, hidden=hidden), dm.input_shape, dm.num_classes, lr=lr, momentum=momentum,
                       weight_decay=weight_decay)
    return model, dm


def fit(strategy, model, dm, devices=2, max_epochs=1, callbacks=(), ckpt_path=None, **trainer_kw):
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    kw.update(trainer_kw)
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=devices, max_epochs=max_epochs, callbacks=list(callbacks), **kw
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


@contextlib.contextmanager
def in_process():
    """Lightning in this process (the popen launcher starts nothing for one device): on exit, no
    process group and none of Lightning's distributed environment variables are left behind (a later
    test's subprocesses would inherit them)."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


def fit_in_process(strategy, model, dm, accelerator="cpu", **trainer_kw):
    """A one-device fit in this process, so the strategy object seen here is the one that trained."""
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    kw.update(trainer_kw)
    trainer = pl.Trainer(strategy=strategy, accelerator=accelerator, devices=1, **kw)
    with in_process():
        trainer.fit(model, dm)
    return trainer


def steps_per_epoch(dm, devices=2):
    """Optimizer steps per epoch of a fit on ``devices`` ranks (DistributedSampler pads, loaders drop the last partial batch)."""
    dm.setup("fit")
    return -(-len(dm.train_set) // devices) // dm.batch_size


def flat_params(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class SaveReplicas(pl.Callback):
    """Each rank saves its final parameters and buffers to ``dir/rank{r}.pt``."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"params": flat_params(pl_module).clone(), "buffers": {k: v.clone() for k, v in pl_module.named_buffers()}},
            self.dir / f"rank{trainer.global_rank}.pt",
        )

    def load(self, n):
        return [torch.load(self.dir / f"rank{r}.pt") for r in range(n)]


class RecordingLossyPS(LossyPSStrategy):
    """Saves, per rank, the flat model before and after each round and that round's downlink mask."""

    def __init__(self, record_dir, **kw):
        super().__init__(start_method="fork", **kw)
        self.record_dir = Path(record_dir)
        self.rounds = []

    def exchange_round(self):
        exchange = self.session.exchange
        before = exchange.storage.clone()
        record = super().exchange_round()
        spec = self.round_spec(record.round)
        down = self.network.outcome(spec).down
        self.rounds.append((before, exchange.storage.clone(), down))
        return record

    def teardown(self):
        if self.rounds:
            exchange = self.session.exchange
            torch.save(
                {"rounds": self.rounds, "numel": exchange.layout.numel, "shape": exchange.layout.shape},
                self.record_dir / f"rounds{self.global_rank}.pt",
            )
        super().teardown()


def load_rounds(directory, n):
    return [torch.load(Path(directory) / f"rounds{r}.pt", weights_only=False) for r in range(n)]


def trace_masks(path):
    """A trace's rounds as arrays: ``rounds`` [R], packed ``up``/``down`` bits [R, bytes], ``up_time_s``/``down_time_s`` [R]."""
    from pl_lossy.network import TraceNetwork

    rounds, outs = zip(*TraceNetwork(path).recorded())
    return {
        "rounds": np.asarray(rounds),
        "up": np.stack([np.packbits(o.up.ravel()) for o in outs]),
        "down": np.stack([np.packbits(o.down.ravel()) for o in outs]),
        "up_time_s": np.asarray([o.up_time_s for o in outs]),
        "down_time_s": np.asarray([o.down_time_s for o in outs]),
    }


class SaveWorkers(pl.Callback):
    """Each process saves its workers' replicas (``WorkerReplicas.worker_state``) to ``dir/workers{rank}.pt``."""

    def __init__(self, directory):
        self.dir = Path(directory)

    def on_train_end(self, trainer, pl_module):
        torch.save(trainer.strategy.replicas.worker_state(pl_module), self.dir / f"workers{trainer.global_rank}.pt")

    def load(self, n_processes):
        """All workers' parameters ``[W, numel]`` and buffers ``{name: [W, ...]}``, in worker order."""
        states = [torch.load(self.dir / f"workers{r}.pt") for r in range(n_processes)]
        params = torch.cat([s["params"] for s in states])
        buffers = {name: torch.cat([s["buffers"][name] for s in states]) for name in states[0]["buffers"]}
        return params, buffers
