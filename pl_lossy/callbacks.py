"""Lightning callbacks: per-round network metrics for loggers and the progress bar, and run summaries."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_only


def _lossy_strategy(trainer: "pl.Trainer"):
    from .strategy import LossyPSStrategy

    return trainer.strategy if isinstance(trainer.strategy, LossyPSStrategy) else None


class LossyPSMetrics(Callback):
    """Logs every round's ``net/*`` values to every logger (whatever ``log_every_n_steps`` says: one row
    per round, ``step`` = the round index) and shows ``net/sim_s`` and ``net/drop`` in the progress bar.

    ``net/delivered_up`` / ``net/delivered_down``: fraction of the round's network packets that arrived
    per phase (a co-located worker's own block does not cross the network and is not counted);
    ``net/up_time_s``, ``net/down_time_s``, ``net/comm_time_s``: simulated phase times; ``net/compute_time_s``:
    the slowest process's compute time (or the configured one); ``net/sim_time_s``: the simulated clock;
    ``net/divergence``: RMS distance of the workers' replicas from their mean, relative to the mean's norm
    (every ``divergence_every`` rounds); ``net/<stat>``: counters the network reports (e.g. drops by cause).
    The last round's values are also in ``trainer.callback_metrics``.
    """

    def on_round_end(self, trainer: "pl.Trainer", strategy) -> None:
        """Called by the strategy after every round (also several per batch with manual optimization)."""
        rec = strategy.last_round
        metrics = _round_metrics(rec)
        metrics.update({f"net/{k}": float(v) for k, v in rec.stats.items()})
        if strategy.divergence_every and strategy.last_divergence is not None and strategy.round % strategy.divergence_every == 0:
            metrics["net/divergence"] = strategy.last_divergence
        callback, progress_bar = _metric_dicts(trainer)
        callback.update({k: torch.tensor(v) for k, v in metrics.items()})
        progress_bar.update({"net/sim_s": rec.sim_time_s, "net/drop": 1.0 - 0.5 * (rec.delivered_up + rec.delivered_down)})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=rec.round)


def _metric_dicts(trainer: "pl.Trainer") -> tuple[dict, dict]:
    """The dicts behind ``trainer.callback_metrics`` and ``trainer.progress_bar_metrics``, written directly:
    ``LightningModule.log`` costs ~0.25 ms of host time a value, and reading either property recomputes
    every logged value, reading a progress-bar value back from the device (a synchronization a step).
    On a GPU a step is launch-bound, so both cost training time (docs/virtual_workers.md, one worker)."""
    connector = getattr(trainer, "_logger_connector", None)
    callback, progress_bar = getattr(connector, "_callback_metrics", None), getattr(connector, "_progress_bar_metrics", None)
    if isinstance(callback, dict) and isinstance(progress_bar, dict):
        return callback, progress_bar
    return trainer.callback_metrics, trainer.progress_bar_metrics  # another Lightning: the public, slower way


def _round_metrics(rec) -> dict[str, float]:
    return {
        "net/round": float(rec.round),
        "net/delivered_up": rec.delivered_up,
        "net/delivered_down": rec.delivered_down,
        "net/up_time_s": rec.up_time_s,
        "net/down_time_s": rec.down_time_s,
        "net/comm_time_s": rec.comm_time_s,
        "net/compute_time_s": rec.compute_time_s,
        "net/sim_time_s": rec.sim_time_s,
    }


def _number(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


MEAN_MODEL_FILE = "mean_model.pt"


class RunSummary(Callback):
    """Writes ``summary.json`` (rank 0, at the end of fit): final validation metrics, steps, the
    network's delivered fractions and simulated times, wall time, and the config it is given.

    Keys: ``val_acc``, ``val_loss``, ``val_bpb`` and ``val_ppl`` (a language model's bits and perplexity per byte), ``train_loss`` (the last epoch's mean training loss, when the module
    logs ``train_loss_epoch``), ``train_eval_loss`` (the whole training set's, when it logs that), ``steps``, ``n_workers``, ``workers_per_device``, ``delivered_up``, ``delivered_down`` (means over rounds),
    ``sim_time_s``, ``comm_time_s``, ``compute_time_s`` (totals), ``compute`` (the compute model and its
    per-round time), ``background`` (when the network had tenants: flows completed, their flow-weighted
    mean completion time, the mean over rounds of each round's 99th percentile), ``drops`` (packets lost over
    this fit's rounds, by cause: see :class:`DropTally`), ``outcome_store`` (ns-3:
    rounds replayed from the store, simulated, written, damaged; the store's path and size), ``fidelity`` (ns-3: the
    mode, its simulated rounds, why ``auto`` chose it; see docs/fidelity.md), ``mean_model_file`` (with
    ``strategy.mean_model_every``: ``mean_model.pt`` beside the summary, ``{"rounds": [T], "mean": [T, parameters]}``),
    ``wall_time_s`` (from this callback's creation), ``config``.
    """

    def __init__(self, path: str | Path, config: Optional[dict] = None) -> None:
        self.path = Path(path)
        self.config = config
        self.started = time.time()
        self.background = BackgroundTally()
        self.drops = DropTally()

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """A fit's tallies are its own (a second fit on the same Trainer starts from nothing)."""
        self.background, self.drops = BackgroundTally(), DropTally()

    def on_round_end(self, trainer: "pl.Trainer", strategy) -> None:
        if trainer.is_global_zero:
            self.background.add(strategy.last_round.stats)
            self.drops.add(strategy.last_round, strategy)

    @rank_zero_only
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.write(trainer)

    def summary(self, trainer: "pl.Trainer") -> dict[str, Any]:
        metrics = trainer.callback_metrics
        out: dict[str, Any] = {
            "val_acc": _number(metrics.get("val_acc")),
            "val_loss": _number(metrics.get("val_loss")),
            "val_bpb": _number(metrics.get("val_bpb")),
            "train_loss": _number(metrics.get("train_loss_epoch")),
            "train_eval_loss": _number(metrics.get("train_eval_loss")),
            "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch),
            "world_size": int(trainer.world_size),
        }
        if out["val_bpb"] is not None and out["val_loss"] is not None:
            # per byte: the exponential of the mean loss, not a mean of exponentials; a diverged run has none
            out["val_ppl"] = math.exp(out["val_loss"]) if out["val_loss"] < 700 else None
        strategy = _lossy_strategy(trainer)
        if strategy is not None:
            clock = strategy.clock
            out.update(
                n_workers=strategy.n_workers,
                workers_per_device=strategy.workers_per_device,
                batching=strategy.steps.mode if strategy.steps is not None and strategy.workers_per_device > 1 else None,
                rounds=clock.rounds,
                delivered_up=clock.delivered_up,
                delivered_down=clock.delivered_down,
                sim_time_s=clock.sim_time_s,
                comm_time_s=clock.comm_time_s,
                compute_time_s=clock.compute_time_s,
                compute=strategy.compute.describe(),
                network=strategy.network.describe(),
            )
            if self.drops.rounds:
                out["drops"] = self.drops.summary()
            if self.background.rounds:
                out["background"] = self.background.summary()
            network = strategy.network
            while not hasattr(network, "store_summary") and hasattr(network, "network"):  # a TraceRecorder's
                network = network.network
            report = network.store_summary() if hasattr(network, "store_summary") else None
            fidelity = getattr(network, "fidelity", None)
            if fidelity is not None:
                out["fidelity"] = fidelity.summary()
            if report is not None:
                out["outcome_store"] = report
            if strategy.mean_models:
                out["mean_model_file"] = MEAN_MODEL_FILE
        out["wall_time_s"] = time.time() - self.started
        out["config"] = self.config
        return out

    def write(self, trainer: "pl.Trainer") -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        strategy = _lossy_strategy(trainer)
        if strategy is not None and strategy.mean_models:
            rounds, means = zip(*strategy.mean_models)
            torch.save({"rounds": torch.tensor(rounds), "mean": torch.stack(means)}, self.path.parent / MEAN_MODEL_FILE)
        self.path.write_text(json.dumps(self.summary(trainer), indent=2, default=str) + "\n")
        return self.path


class DropTally:
    """Packets lost over a run's rounds, by cause, from each round's masks and its network's ``stats``.

    ``summary()``: ``packets`` (every packet that crossed the network, both phases), ``lost`` (those that did
    not arrive), then per cause the count of the rounds' stat, under the stat's name less its prefix, for the
    causes the network reported: ``link_error`` (``drops_link_error``: the error model, ns-3), ``queue``
    (``drops_queue``: full switch buffers, ns-3), ``source`` (``drops_source``: dropped by their senders),
    ``late`` (``packets_late``: arrived after the deadline); ``other``: lost for no reported cause (an analytic
    network's random drops, down workers' packets). ``workers_down`` (when workers failed) counts worker-rounds,
    not packets, so it sits beside them. ns-3 counts link-error and queue drops over all the traffic it carries:
    where training shares the fabric (tenants' flows, or TCP with its acknowledgements and retransmissions)
    those two go under ``all_traffic`` instead, and are not taken as causes of training's losses."""

    CAUSES = {"drops_link_error": "link_error", "drops_queue": "queue", "drops_source": "source", "packets_late": "late"}

    def __init__(self) -> None:
        self.rounds = 0
        self.packets = 0
        self.lost = 0.0
        self.causes: dict[str, float] = {}
        self.workers_down = 0.0
        self.shared = False  # whether other traffic than training's packets crossed the fabric (then ns-3's counts are of all)
        self._per_phase: Optional[int] = None  # packets a phase sends over the network (local pairs never do)

    def add(self, record, strategy) -> None:
        """Count one round (its :class:`~pl_lossy.round.clock.RoundRecord`) of ``strategy``'s fit."""
        if self._per_phase is None:
            spec = strategy.round_spec(record.round)
            self._per_phase = int((~spec.local_pairs()).sum()) * spec.packets_per_block
            self.shared = spec.transport == "tcp"
        self.shared = self.shared or "background_flows" in record.stats
        self.rounds += 1
        self.packets += 2 * self._per_phase
        self.lost += (2.0 - record.delivered_up - record.delivered_down) * self._per_phase
        for stat, cause in self.CAUSES.items():
            if stat in record.stats:
                self.causes[cause] = self.causes.get(cause, 0.0) + float(record.stats[stat])
        self.workers_down += float(record.stats.get("workers_down", 0.0))

    def summary(self) -> dict[str, int]:
        lost = round(self.lost)
        counts = {k: round(v) for k, v in self.causes.items()}
        all_traffic = {k: counts.pop(k) for k in ("link_error", "queue") if self.shared and k in counts}
        out = {"packets": self.packets, "lost": lost, **counts}
        out["other"] = max(lost - sum(counts.values()), 0)
        if all_traffic:
            out["all_traffic"] = all_traffic
        if self.workers_down:
            out["workers_down"] = round(self.workers_down)
        return out


def drops_line(drops: Optional[dict[str, int]]) -> str:
    """``drops: 1,290 of 40,000 packets: queue 1,234, link_error 56`` (causes by count, none at 0; ``workers_down``
    in worker-rounds); "" without a tally."""
    if not drops:
        return ""
    causes = {k: v for k, v in drops.items() if k not in ("packets", "lost", "workers_down", "all_traffic") and v}
    parts = [f"{k} {v:,}" for k, v in sorted(causes.items(), key=lambda kv: -kv[1])]
    line = f"drops: {drops['lost']:,} of {drops['packets']:,} packets" + (": " + ", ".join(parts) if parts else "")
    shared = ", ".join(f"{k} {v:,}" for k, v in (drops.get("all_traffic") or {}).items() if v)
    line += f"; all traffic on the fabric: {shared}" if shared else ""
    down = drops.get("workers_down", 0)
    return line + (f"; workers down {down:,} worker-round{'' if down == 1 else 's'}" if down else "")


class BackgroundTally:
    """The background tenants' flows over a run's rounds, from the rounds' ``background_*`` stats."""

    def __init__(self) -> None:
        self.rounds = 0
        self.flows = 0.0
        self.done = 0.0  # flows that completed within their round
        self.fct_sum_s = 0.0  # sum over rounds of completed flows x their mean completion time
        self.p99_sum_s = 0.0
        self.p99_rounds = 0

    def add(self, stats: dict[str, float]) -> None:
        if "background_flows" not in stats:
            return
        self.rounds += 1
        self.flows += float(stats["background_flows"])
        done = float(stats["background_flows"]) - float(stats.get("background_unfinished", 0.0))
        self.done += done
        if done:
            self.fct_sum_s += done * float(stats["background_fct_mean_s"])
            self.p99_sum_s += float(stats["background_fct_p99_s"])
            self.p99_rounds += 1

    def summary(self) -> dict[str, Optional[float]]:
        return {
            "rounds": self.rounds,
            "flows": self.flows,
            "unfinished": self.flows - self.done,
            "fct_mean_s": self.fct_sum_s / self.done if self.done else None,
            "fct_p99_s": self.p99_sum_s / self.p99_rounds if self.p99_rounds else None,
        }
