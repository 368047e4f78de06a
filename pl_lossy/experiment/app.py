"""The Hydra app behind ``examples/train.py``: build every object from the config, fail early on bad
input with one line, fit, and write ``summary.json``."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch.multiprocessing import ProcessRaisedException

from ..callbacks import RunSummary, drops_line
from .config_types import type_errors
from .console import ConsoleLines, quiet, wants_progress_bar
from ..strategy import LossyPSStrategy


log = logging.getLogger("pl_lossy.experiment.app")


class BelowWarning(logging.Filter):
    """Console stdout gets INFO and below; warnings and errors go to stderr (conf/hydra/job_logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


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


GROUPS = ("data", "model", "network", "strategy", "trainer")  # the objects a run builds, in order


def check_types(cfg: DictConfig) -> None:
    """Every group's values against the annotations of what it builds (see :mod:`pl_lossy.experiment.config_types`)."""
    for group in GROUPS:
        if group in cfg:
            error = type_errors(cfg[group], group)
            if error:
                raise ConfigError(f"invalid config: {error}")


def build(cfg: DictConfig, output_dir: str | Path) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule, RunSummary]:
    """Everything the run needs, built and checked in this process before any worker is started."""
    check_types(cfg)
    torch.set_num_threads(int(cfg.torch_threads))
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = _instantiate(cfg.data, "data")
    _check_task(cfg, datamodule)
    model = _instantiate(
        cfg.model, "model", input_shape=list(datamodule.input_shape), num_classes=int(datamodule.num_classes)
    )
    strategy = _instantiate(cfg.strategy, "strategy")
    summary = RunSummary(Path(output_dir) / cfg.summary_file, config=OmegaConf.to_container(cfg, resolve=True))
    bar = wants_progress_bar(cfg.trainer.get("enable_progress_bar", True))  # a log file gets epoch lines instead
    trainer = _instantiate(cfg.trainer, "trainer", strategy=strategy, callbacks=[summary, ConsoleLines(epoch_lines=not bar)],
                           enable_progress_bar=bar, **_validated_at_least_once(cfg.trainer))
    if getattr(model, "task", None) == "language":
        _fit_text_to(datamodule, model, trainer, trainer.world_size * getattr(strategy, "workers_per_device", 1))
    if isinstance(strategy, LossyPSStrategy):
        try:
            strategy.check_world_size(trainer.world_size)
            spec = strategy.round_spec_for(model, trainer.world_size)  # the rounds' settings: deadline, stragglers
        except ValueError as exc:
            raise ConfigError(f"invalid `strategy` config: {exc}") from exc
        try:
            strategy.network.check_round(spec)
        except ValueError as exc:
            raise ConfigError(f"invalid `network` config: {exc}") from exc
    return trainer, model, datamodule, summary


def _check_task(cfg: DictConfig, datamodule: pl.LightningDataModule) -> None:
    """A language model needs text and a classifier needs labelled examples: one line, before the model is built."""
    from hydra.utils import get_class

    try:
        model_task = getattr(get_class(cfg.model._target_), "task", "classification")
    except Exception:  # noqa: BLE001 - an unknown target is reported when the model is instantiated
        return
    data_task = getattr(datamodule, "task", "classification")
    if model_task != data_task:
        wanted = "data=text" if model_task == "language" else "model=gpt (or a dataset of labelled examples: digits, mnist1d, ...)"
        raise ConfigError(f"invalid `model` config: the model is for {model_task} and the data for {data_task}: use {wanted}")


def _fit_text_to(datamodule: pl.LightningDataModule, model: pl.LightningModule, trainer: pl.Trainer, n_workers: int) -> None:
    """A language model's run: windows of the model's context, an epoch that holds a batch for every worker
    (else Lightning trains no step, silently), and an end (the learning-rate schedule needs the run's length)."""
    try:
        datamodule.use_context(model.context)
        datamodule.check_workers(n_workers)
    except ValueError as exc:
        raise ConfigError(f"invalid `data` config: {exc}") from exc
    if trainer.max_steps in (-1, None) and trainer.max_epochs == -1:
        raise ConfigError("invalid `trainer` config: max_epochs=-1 and max_steps=-1 never end, and the learning-rate schedule "
                          "needs the run's length: set trainer.max_steps or trainer.max_epochs")


def _validated_at_least_once(trainer: DictConfig) -> dict[str, Any]:
    """A run shorter than its validation interval (``trainer.max_steps=100`` with ``val_check_interval: 250``)
    validates once, at its last step, so that its summary has a validation metric rather than none."""
    every, steps = trainer.get("val_check_interval"), trainer.get("max_steps", -1)
    if isinstance(every, int) and not isinstance(every, bool) and isinstance(steps, int) and 0 < steps < every:
        return {"val_check_interval": steps}
    return {}


def _own_master_port(trainer: pl.Trainer) -> None:
    """A sweep's jobs may run side by side (``hydra/launcher=joblib``) and each opens a process group: every
    single-node job of a multirun takes a free port of its own, instead of one it inherited (two jobs on one
    ``MASTER_PORT`` fail with EADDRINUSE). A single run, or a run over several nodes, keeps what it was given."""
    from hydra.types import RunMode
    from lightning_fabric.plugins.environments.lightning import find_free_network_port

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and trainer.num_nodes == 1:
        os.environ["MASTER_PORT"] = str(find_free_network_port())


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """Fit and return the summary (None in processes other than the launching one)."""
    OmegaConf.resolve(cfg)  # ${hydra:...} and ${seed} must not be resolved again in worker processes
    trainer, model, datamodule, summary = build(cfg, output_dir)
    if hasattr(datamodule, "describe"):  # which bytes a language model reads: comparable across machines
        log.info(f"data: {datamodule.describe()}")
    _own_master_port(trainer)
    trainer.fit(model, datamodule)
    if not trainer.is_global_zero:
        return None
    if not summary.path.is_file():  # fork/spawn: rank 0 ran in a child and wrote it there
        return None
    return json.loads(summary.path.read_text())


class CheckSweep(Callback):
    """Hydra callback: before the first job of a ``-m`` sweep trains, build every job's objects (as
    :func:`build` does, launching nothing) and stop with one line naming the job and the key of the
    first bad value. Sweepers other than Hydra's basic one are left to check their jobs as they run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return
        loader = GlobalHydra.instance().config_loader()
        params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create(config_loader=loader).parse_overrides([*params, *config.hydra.overrides.task])
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        lightning = logging.getLogger("pytorch_lightning")
        level, hydra_cfg = lightning.level, HydraConfig.instance().cfg
        lightning.setLevel(logging.WARNING)  # Trainer() announces the devices it found: once per job is noise
        try:
            with tempfile.TemporaryDirectory() as scratch:
                for index, job in enumerate(jobs):
                    try:
                        job_cfg = loader.load_sweep_config(config, list(job))
                        with open_dict(job_cfg):
                            job_cfg.hydra.runtime.output_dir = scratch
                        HydraConfig.instance().set_config(job_cfg)
                        with open_dict(job_cfg):
                            del job_cfg["hydra"]
                        OmegaConf.resolve(job_cfg)
                        trainer = build(job_cfg, scratch)[0]
                        _check_launcher(config.hydra.launcher, job_cfg, trainer.world_size)
                    except (ConfigError, OmegaConfBaseException) as exc:
                        message = str(exc).strip().splitlines()[0]
                        print(f"error: sweep job #{index} ({' '.join(job)}): {message}; no job was started", file=sys.stderr)
                        sys.exit(2)
        finally:
            lightning.setLevel(level)
            HydraConfig.instance().cfg = hydra_cfg


def _check_launcher(launcher: DictConfig, cfg: DictConfig, world_size: int) -> None:
    """Joblib runs jobs in loky's worker processes, whose multiprocessing context a spawned training process
    cannot recreate ("cannot find context for 'loky'"): such a job would fail after the sweep started."""
    spawn = str(cfg.strategy.get("start_method", "")) == "spawn" or str(cfg.strategy.get("_target_", "")).endswith("_spawn")
    if "joblib" in str(launcher.get("_target_", "")) and spawn and world_size > 1:
        raise ConfigError("hydra/launcher=joblib cannot start spawned training processes (strategy.start_method=spawn with "
                          f"{world_size} processes): use strategy.start_method=fork on CPUs, or hydra/launcher=submitit_local "
                          "or the basic launcher (GPUs)")


def check_group_choices(argv: list[str], conf_dir: str | Path) -> None:
    """Raise :class:`ConfigError` naming the valid options when a command-line override picks an option that
    a config group under ``conf_dir`` does not have (``network=ns3_starr``, also inside a ``-m`` choice
    list); Hydra itself would print 15 lines and exit 1. Hydra's own groups (``hydra/...``), overrides
    that do not parse, and a command line adding a config dir (``--config-dir``) are left to Hydra."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    args, _ = get_args_parser().parse_known_args(argv)
    if args.config_dir:  # options may live there
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 - a malformed override is Hydra's to report
        return
    for override in overrides:
        group, value = override.key_or_group, override.value()
        folder = Path(conf_dir) / group
        if override.is_delete() or group.split("/")[0] == "hydra" or not folder.is_dir() or value is None:
            continue
        choices = value.list if isinstance(value, ChoiceSweep) else [] if override.is_sweep_override() else [value]
        for choice in map(str, choices):
            if not (folder / f"{choice}.yaml").is_file():
                options = ", ".join(sorted(path.stem for path in folder.glob("*.yaml")))
                raise ConfigError(f"{group}={choice}: no such option; the {group} group has {options}")


def check_command_line(argv: list[str], conf_dir: str | Path) -> None:
    """The app's first check, before Hydra composes the config: a bad group option exits 2 with one line."""
    try:
        check_group_choices(argv, conf_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _lightning_logs_to_root() -> None:
    """Lightning gives its logger a console handler of its own when imported before logging is set up;
    hand its messages to the root logger instead, so that they reach train.log too."""
    lightning = logging.getLogger("pytorch_lightning")
    for handler in list(lightning.handlers):
        if type(handler) is logging.StreamHandler:
            lightning.removeHandler(handler)
    lightning.propagate = True


def main(cfg: DictConfig) -> None:
    quiet()  # the app's entry: this process and the training processes it starts
    output_dir = HydraConfig.get().runtime.output_dir
    if logging.getLogger().handlers:  # Hydra configured logging (hydra/job_logging=none leaves it alone)
        _lightning_logs_to_root()
    try:
        result = train(cfg, output_dir)
    except ConfigError as exc:
        log.error(f"error: {exc}")
        sys.exit(2)
    except ProcessRaisedException as exc:  # a training process failed; its traceback was printed above
        last = [line for line in str(exc).strip().splitlines() if line.strip()][-1]
        log.error(f"error: training failed: {last}")
        sys.exit(1)
    if result is not None:
        keys = ("val_bpb" if result.get("val_bpb") is not None else "val_acc", "steps", "delivered_up", "delivered_down", "sim_time_s", "comm_time_s", "wall_time_s")
        line = ", ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}" for k in keys)
        log.info(f"summary: {line}" + (f"; {drops_line(result.get('drops'))}" if result.get("drops") else ""))
        log.info(f"written: {Path(output_dir) / cfg.summary_file}")
        if cfg.get("plot", True):
            _plot(Path(output_dir))


def _plot(output_dir: Path) -> None:
    from .compare import plot_run

    try:
        log.info(f"plot: {plot_run(output_dir)}")
    except FileNotFoundError as exc:  # no CSV logger (trainer.logger=false or another logger): nothing to draw
        log.info(f"no plot: {exc}")
