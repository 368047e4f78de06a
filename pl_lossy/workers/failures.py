"""Worker failures: a schedule of rounds in which a worker is down, and what a down worker does.

A failure ``(w, first, last)`` takes worker ``w`` down for rounds ``first <= r < last``. A down worker
sends and receives nothing: its uplink packets are lost and, with co-located servers, so is everything
its server would receive or send (the other hosts learn of the failure and send it nothing; on ns-3
those flows are not sent at all, so the fabric carries less). Whatever a network model returns, the
round applies :func:`fail_outcome`, so every network honours the schedule the same way.

Its replica is frozen: parameters, optimizer state and buffers stay as they were when the round began
(:class:`FrozenWorkers`: the process still runs the worker's step, as one process runs every worker's,
and undoes it). When the window ends the worker rejoins with that stale replica, and the next rounds
average it back toward the others. A schedule is part of every round's spec, so a round's outcome
stays a function of (network config, seed, round) with failures too.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ns3_bridge.sim.round import fail_outcome  # the masks' cut, shared with the simulator

__all__ = ["Failure", "FrozenWorkers", "check_failure_optimizers", "check_failures", "fail_outcome"]

#: A failure as the spec keeps it: (worker, first round down, first round up again).
Failure = tuple[int, int, int]


def check_failures(value: Any) -> tuple[Failure, ...]:
    """``[[worker, first, last], ...]`` (or None) as sorted tuples; ValueError in one line if malformed.
    Worker indices are checked against the worker count by :class:`~pl_lossy.network.RoundSpec`."""
    if value is None:
        return ()
    try:
        items = [tuple(item) for item in value]
    except TypeError:
        items = None
    out = []
    for item in items if items is not None else [value]:
        if (items is None or len(item) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in item)
                or not (item[0] >= 0 and 0 <= item[1] < item[2])):
            raise ValueError(
                f"worker_failures must be a list of [worker, first_round, last_round] with worker >= 0 and 0 <= first < last "
                f"(the worker is down for rounds first..last-1), got {value!r}"
            )
        out.append((int(item[0]), int(item[1]), int(item[2])))
    return tuple(sorted(out))


#: Optimizers whose update uses the step count (bias correction, a step-dependent rate), per torch's
#: sources; SGD keeps none, RMSprop and Adadelta count steps but do not use the count.
STEP_COUNTED_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
)


def _counts_steps(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s update of a parameter depends on how many steps it took."""
    if isinstance(optimizer, torch.optim.Adagrad):  # its rate decays with the step count only if lr_decay != 0
        return any(group.get("lr_decay", 0) != 0 for group in optimizer.param_groups)
    return isinstance(optimizer, STEP_COUNTED_OPTIMIZERS)


def check_failure_optimizers(optimizers: Sequence[torch.optim.Optimizer], workers_per_device: int,
                             worker_failures: Sequence[Failure]) -> None:
    """ValueError in one line if failures would freeze stacked workers (``workers_per_device > 1``) whose
    optimizer counts steps: the count is one scalar for all ``k`` rows (:class:`FrozenWorkers` cannot
    hold it still for a frozen row), so a frozen worker would resume with another worker's count, not
    what it would have as one worker per process. Call it before training, once optimizers exist."""
    if not worker_failures or workers_per_device <= 1:
        return
    for optimizer in optimizers:
        if _counts_steps(optimizer):
            name = type(optimizer).__name__
            raise ValueError(
                f"worker_failures with workers_per_device > 1 freezes workers by rows, but {name}'s shared step count would move "
                f"on for a frozen worker (its update would differ from one worker per process): use workers_per_device=1 "
                "(one worker per process) or an optimizer without a step count (SGD, RMSprop, Adadelta, Adagrad with lr_decay=0)"
            )


class FrozenWorkers:
    """Some of a process's workers, kept as they are over one training step: built before the step
    (copies their parameters, buffers and optimizer state), :meth:`restore` after it.

    ``tensors``: the tensors optimizers step, stacked ``[k, ...]`` when ``stacked`` (several workers a
    process), else one worker's own; ``rows``: the frozen workers among the ``k``. Optimizer state of a
    stacked tensor is restored by rows where it has the tensor's shape (momentum, Adam's moments);
    a scalar state shared by the rows (a step count) moves on for all of them, so stacked workers are
    exact only for optimizers whose update does not use it: :func:`check_failure_optimizers` refuses
    the others before training. State made by this step is zeroed in the frozen rows (state an
    optimizer makes on its first step starts from zero). One worker a process (``stacked=False``)
    gets its whole state back, step count included: exact for every optimizer.
    """

    def __init__(self, tensors: Sequence[Tensor], buffers: Sequence[Tensor], optimizers: Sequence[torch.optim.Optimizer],
                 rows: Sequence[int], stacked: bool) -> None:
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)
        self.stacked = stacked
        self.tensors = list(tensors)
        self.buffers = list(buffers)  # each [k, ...] (one worker's: [1, ...])
        self.optimizers = list(optimizers)
        with torch.no_grad():
            self._tensors = [self._take(t) for t in self.tensors]
            self._buffers = [b[self.rows.to(b.device)].clone() for b in self.buffers]
            self._state = {id(p): {name: self._take(v) if self._rows_of(p, v) else _copy(v) for name, v in opt.state[p].items()}
                           for opt in self.optimizers for p in self._params(opt) if p in opt.state}

    def _take(self, t: Tensor) -> Tensor:
        return t[self.rows.to(t.device)].clone() if self.stacked else t.detach().clone()

    def _rows_of(self, p: Tensor, value: Any) -> bool:
        """Whether ``value`` is state of ``p`` laid out like it (restored by rows, or whole for one worker)."""
        return isinstance(value, Tensor) and value.shape == p.shape

    @staticmethod
    def _params(opt: torch.optim.Optimizer) -> list[Tensor]:
        return [p for group in opt.param_groups for p in group["params"]]

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the step for the frozen workers."""
        for t, saved in zip(self.tensors, self._tensors):
            self._put(t, saved)
        for b, saved in zip(self.buffers, self._buffers):
            b[self.rows.to(b.device)] = saved
        for opt in self.optimizers:
            for p in self._params(opt):
                saved = self._state.get(id(p))
                if not self.stacked:  # the process's one worker: its whole state, as it was
                    if saved is None:
                        opt.state.pop(p, None)
                    else:
                        opt.state[p] = saved
                    continue
                for name, value in opt.state.get(p, {}).items():
                    if self._rows_of(p, value):  # shared scalars (a step count) move on
                        value[self.rows.to(value.device)] = saved[name] if saved is not None and name in saved else 0

    def _put(self, t: Tensor, saved: Tensor) -> None:
        if self.stacked:
            t[self.rows.to(t.device)] = saved
        else:
            t.copy_(saved)


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value
