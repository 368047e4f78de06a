"""What the app prints: quiet by default, and one line per epoch when nobody watches a progress bar.

:func:`quiet` is called at the app's entry (never on importing the library): it hides messages that
tell a user of this app nothing, in the process that calls it, and processes forked from it inherit it.
:class:`ConsoleLines` carries it into processes Lightning *spawns* (they unpickle the Trainer's callbacks
before Lightning prints anything) and prints the epoch lines.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

log = logging.getLogger("pl_lossy.experiment.console")

# (message regex, category): warnings the app hides
QUIET_WARNINGS = (
    # Lightning 2.6 builds torch's deprecated LeafSpec: nothing a user can act on, printed once per training process
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # short runs: the net/* rows are written every round whatever log_every_n_steps says
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning),
    # virtual workers of a transformer: vmap runs attention's kernel once per worker (the rest of the step is
    # batched); measured and explained in docs/transformers.md, nothing to act on
    (r"There is a performance drop because we have not yet implemented the batching rule for aten::_scaled_dot_product", UserWarning),
)
TIP_PREFIX = "💡 Tip:"  # Lightning's adverts for litlogger / litmodels


class NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger/litmodels" messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


def quiet() -> None:
    """Hide :data:`QUIET_WARNINGS` and Lightning's tips in this process (idempotent)."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    tips = logging.getLogger("pytorch_lightning.utilities.rank_zero")  # where rank_zero_info logs them
    if not any(isinstance(f, NoTips) for f in tips.filters):
        tips.addFilter(NoTips())


def wants_progress_bar(enabled: bool) -> bool:
    """Lightning's progress bar only where someone watches it: a log file or a pipe gets carriage-return
    redraws (~50 KB a run) instead; the app prints :class:`ConsoleLines`' epoch lines there."""
    return bool(enabled) and sys.stdout.isatty()


EPOCH_KEYS = ("train_loss", "val_acc", "val_bpb", "net/sim_time_s")  # beside the epoch and the step


class ConsoleLines(Callback):
    """On global rank 0, ``epoch_lines``: one line after every validation of a fit and at the end of every
    training epoch not just reported, e.g.
    ``epoch 0: step=22, train_loss=2.24, val_acc=0.5312, net/sim_time_s=0.000396, wall 1.4 s``
    (the last step's training loss, the last validation's accuracy or bits per byte, the simulated clock;
    a key not logged yet is left out). In every process it runs in, it applies :func:`quiet`."""

    def __init__(self, epoch_lines: bool = True) -> None:
        self.epoch_lines = epoch_lines
        self.started: Optional[float] = None
        self._reported_step: Optional[int] = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        quiet()  # unpickled in a spawned training process: quiet it before Lightning's first message there

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.started, self._reported_step = time.monotonic(), None  # a second fit reports from nothing

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # a long epoch (text) validates several times
            self._report(trainer)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step != self._reported_step:
            self._report(trainer)

    def _report(self, trainer: "pl.Trainer") -> None:
        if self.epoch_lines and trainer.is_global_zero:
            self._reported_step = trainer.global_step
            _say(epoch_line(trainer.current_epoch, trainer.global_step, trainer.callback_metrics,
                            time.monotonic() - (self.started or time.monotonic())))


def epoch_line(epoch: int, step: int, metrics: dict[str, Any], wall_s: float) -> str:
    """``epoch 0: step=22, train_loss=2.24, ..., wall 1.4 s`` from a Trainer's callback metrics."""
    values = [f"{key}={float(metrics[key]):.4g}" for key in EPOCH_KEYS if key in metrics]
    return f"epoch {epoch}: " + ", ".join([f"step={step}", *values]) + f", wall {wall_s:.1f} s"


def _say(line: str) -> None:
    """To the app's log (console and train.log) where logging is set up, else (a spawned process) stdout."""
    if logging.getLogger().handlers:
        log.info(line)
    else:
        print(line, flush=True)
