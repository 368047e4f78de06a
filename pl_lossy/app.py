"""The Hydra app behind ``examples/train.py``: build every object from the config, fail early on bad
input with one line, fit, and write ``summary.json``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.multiprocessing import ProcessRaisedException

from .callbacks import RunSummary
from .strategy import LossyPSStrategy


class ConfigError(ValueError):
    """A configuration that cannot run; its message is one line for the user."""


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _instantiate(node: DictConfig, where: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except (InstantiationException, OmegaConfBaseException, ValueError, TypeError, FileNotFoundError) as exc:
        cause = _root_cause(exc)
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        key = re.search(r"full_key: (\S+)", str(exc))
        if key and not isinstance(cause, OmegaConfBaseException):  # the innermost node that failed; `strategy.network` is set by the user as `network`
            where = key.group(1).removeprefix("strategy.")
        raise ConfigError(f"invalid `{where}` config: {message}") from exc


def build(cfg: DictConfig, output_dir: str | Path) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule, RunSummary]:
    """Everything the run needs, built and checked in this process before any worker is started."""
    torch.set_num_threads(int(cfg.torch_threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = _instantiate(cfg.data, "data")
    model = _instantiate(
        cfg.model, "model", input_shape=list(datamodule.input_shape), num_classes=int(datamodule.num_classes)
    )
    strategy = _instantiate(cfg.strategy, "strategy")
    summary = RunSummary(Path(output_dir) / cfg.summary_file, config=OmegaConf.to_container(cfg, resolve=True))
    trainer = _instantiate(cfg.trainer, "trainer", strategy=strategy, callbacks=[summary])
    if isinstance(strategy, LossyPSStrategy):
        try:
            strategy.check_world_size(trainer.world_size)
        except ValueError as exc:
            raise ConfigError(f"invalid `strategy` config: {exc}") from exc
        try:
            strategy.network.check_round(strategy.round_spec_for(model, trainer.world_size))
        except ValueError as exc:
            raise ConfigError(f"invalid `network` config: {exc}") from exc
    return trainer, model, datamodule, summary


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """Fit and return the summary (None in processes other than the launching one)."""
    OmegaConf.resolve(cfg)  # ${hydra:...} and ${seed} must not be resolved again in worker processes
    trainer, model, datamodule, summary = build(cfg, output_dir)
    trainer.fit(model, datamodule)
    if not trainer.is_global_zero:
        return None
    if not summary.path.is_file():  # fork/spawn: rank 0 ran in a child and wrote it there
        return None
    return json.loads(summary.path.read_text())


def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir
    try:
        result = train(cfg, output_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ProcessRaisedException as exc:  # a training process failed; its traceback was printed above
        last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
        print(f"error: training failed: {last}", file=sys.stderr)
        sys.exit(1)
    if result is not None:
        keys = ("val_acc", "steps", "delivered_up", "delivered_down", "sim_time_s", "comm_time_s", "wall_time_s")
        line = ", ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}" for k in keys)
        print(f"summary: {line}\nwritten: {Path(output_dir) / cfg.summary_file}")
