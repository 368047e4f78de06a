"""One fit, one session: everything that lives for one fit of the strategy, created when the fit starts
and closed at its teardown.

A :class:`FitSession` owns the simulated clock, the compute-time count, the freeze of down workers over
a step, the mask-agreement check, the network as this fit uses it (recording a trace when asked) and the
exchange's scratch state. A second ``fit`` (or ``validate`` then ``fit``) on the same Trainer or strategy
gets a new session: nothing of an earlier fit carries over, except what a checkpoint restores on purpose.
The round itself is :mod:`pl_lossy.round.pipeline`; the session is what it reads and advances.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ..network import NetworkModel, RoundSpec, TraceRecorder
from ..workers.failures import FrozenWorkers
from ..workers.replicas import WorkerReplicas
from ..workers.steps import WorkerSteps
from .clock import RoundRecord, SimClock
from .compute import ComputeModel
from .exchange import RPSExchange
from .gradient_exchange import GradientExchange
from .masks import MaskAgreement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessPlace:
    """Where this process stands in the fit: its rank among ``world_size`` processes, each hosting ``k`` workers."""

    rank: int
    world_size: int
    k: int
    device: torch.device

    @property
    def n_workers(self) -> int:
        return self.world_size * self.k

    @property
    def first_worker(self) -> int:
        return self.rank * self.k

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def own_rows(self, workers: Sequence[int]) -> list[int]:
        """This process's rows (0..k-1) among ``workers`` (global indices)."""
        return [w - self.first_worker for w in workers if 0 <= w - self.first_worker < self.k]


class FitSession:
    """The state of one fit; see the module docstring.

    Args:
        network: the strategy's network; rank 0 of a fit that records (``record_trace``) wraps it in a new
            :class:`~pl_lossy.network.TraceRecorder`, so each fit writes its own rounds.
        spec: round 0 of this fit (sizes, deadline, stragglers, failures).
        compute: the strategy's compute-time model; the session counts on a fresh copy of it.
        place: this process's rank, world size, workers per process and device.
        replicas, steps, exchange, gradient_exchange: this fit's workers, how their steps run, the exchange over them.
        all_reduce_sum: in-place sum over processes (a no-op with one process).
        record_trace, adaptive_deadline, deadline_slack, sync_buffers, divergence_every, mean_model_every: the
            strategy's settings of the same names.
    """

    def __init__(
        self,
        network: NetworkModel,
        spec: RoundSpec,
        compute: ComputeModel,
        place: ProcessPlace,
        replicas: WorkerReplicas,
        steps: WorkerSteps,
        exchange: RPSExchange,
        gradient_exchange: Optional[GradientExchange],
        all_reduce_sum: Callable[[Tensor], None],
        record_trace: Optional[str] = None,
        adaptive_deadline: bool = False,
        deadline_slack: float = 1.25,
        sync_buffers: str = "broadcast",
        divergence_every: int = 0,
        mean_model_every: int = 0,
    ) -> None:
        self.network = TraceRecorder(network, record_trace) if record_trace and place.is_global_zero else network
        self.spec, self.place = spec, place
        self.compute = compute.fresh()
        self.replicas, self.steps = replicas, steps
        self.exchange, self.gradient_exchange = exchange, gradient_exchange
        self.all_reduce_sum = all_reduce_sum
        self.adaptive_deadline, self.deadline_slack = adaptive_deadline, deadline_slack
        self.sync_buffers, self.divergence_every = sync_buffers, divergence_every
        self.clock = SimClock()
        self.last_round: Optional[RoundRecord] = None
        self.last_divergence: Optional[float] = None
        self.mean_model_every = mean_model_every
        self.mean_models: list[tuple[int, Tensor]] = []  # (rounds done, the replicas' mean model then), every mean_model_every
        self.closed = False
        self._compute_start: Optional[float] = None
        self._flop_counter: Optional[FlopCounterMode] = None
        self._frozen: Optional[FrozenWorkers] = None
        self.mask_check = MaskAgreement()

    # ------------------------------------------------------------------ the round's spec

    def round_spec(self, round_index: int) -> RoundSpec:
        """Round ``round_index`` of this fit: the fit's spec at that round, with this round's adaptive
        deadline and, with stragglers, the nominal compute time they are late by."""
        spec = replace(self.spec, round=round_index)
        if self.adaptive_deadline and self.clock.deadline_s is not None:
            spec = replace(spec, deadline_s=self.clock.deadline_s)
        if spec.has_stragglers:  # reproducible compute models only ("flops" or seconds): no measured value needed
            spec = replace(spec, compute_s=self.compute.round_time_s(lambda: 0.0))
        return spec

    # ------------------------------------------------------------------ a step, between two rounds

    def begin_step(self, optimizers: Sequence[torch.optim.Optimizer], module: torch.nn.Module) -> None:
        """At every micro-batch: the round's first one starts its compute time, freezes the workers down this
        round (:class:`~pl_lossy.workers.failures.FrozenWorkers`) and, for ``compute_time_s="flops"`` before
        the first count, starts counting FLOPs (forward and backward of every micro-batch, until the round)."""
        if self._compute_start is None:
            self._compute_start = time.perf_counter()
            self._freeze_down_workers(optimizers, module)
        if self.compute.counting and self._flop_counter is None:
            self._flop_counter = FlopCounterMode(display=False)
            self._flop_counter.__enter__()

    @property
    def counting_flops(self) -> bool:
        """Whether this step's FLOPs are being counted (then virtual workers run one after another:
        a vmapped step's batched convolutions count several times one worker's FLOPs)."""
        return self._flop_counter is not None

    def step_context(self) -> ContextManager:
        """How the workers of this micro-batch run: one after another while counting FLOPs, else as configured."""
        return self.steps.looped() if self.counting_flops and self.place.k > 1 else nullcontext()

    def end_compute(self) -> float:
        """At the round: stop counting FLOPs and return the wall-clock seconds since the round's first
        micro-batch (what ``compute_time_s="measured"`` reads)."""
        if self._flop_counter is not None:
            self._stop_counting()
        compute = time.perf_counter() - self._compute_start if self._compute_start is not None else 0.0
        self._compute_start = None
        return compute

    def thaw(self) -> None:
        """After the optimizer step: the frozen workers are as they were before it."""
        frozen, self._frozen = self._frozen, None
        if frozen is not None:
            frozen.restore()

    def _freeze_down_workers(self, optimizers: Sequence[torch.optim.Optimizer], module: torch.nn.Module) -> None:
        if not self.spec.worker_failures:
            return
        down = replace(self.spec, round=self.clock.rounds).down_workers  # not round_spec: it may need a compute time not counted yet
        rows = self.place.own_rows(down)
        if rows:
            tensors, _ = self.replicas.trained_tensors()
            self._frozen = FrozenWorkers(tensors, self.replicas.all_buffers(module), optimizers, rows, stacked=self.place.k > 1)

    def _stop_counting(self) -> None:
        counter, self._flop_counter = self._flop_counter, None
        counter.__exit__(None, None, None)
        self.compute.step_flops = counter.get_total_flops() / self.place.k

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"clock": asdict(self.clock), "exchange": self.exchange.state_dict(), "compute": self.compute.describe()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed fit continues the saved fit's clock (and dedicated servers' blocks), and keeps its FLOP count
        when the compute model is the same: the resumed steps then run as the uninterrupted fit's did (a counted
        step runs its workers one after another), so the resumed fit equals it bit for bit."""
        self.clock = SimClock(**state["clock"])
        saved_blocks, blocks = (state.get("exchange") or {}).get("server_blocks"), self.exchange.server_blocks
        if saved_blocks is not None and blocks is not None and saved_blocks.shape != blocks.shape:
            # dedicated servers of another layout (another worker or server count): they start from worker 0's model,
            # restored before this (load_model_state_dict pours the replicas in first)
            log.warning("lossy_ps: the checkpoint's dedicated-server blocks %s do not fit this layout %s: the servers start "
                        "from worker 0's restored model", tuple(saved_blocks.shape), tuple(blocks.shape))
            blocks.copy_(self.exchange.blocks()[0])
        elif state.get("exchange"):
            self.exchange.load_state_dict(state["exchange"])
        saved = state.get("compute") or {}
        if (self.compute.kind == "flops" and saved.get("model") == "flops" and saved.get("step_flops")
                and saved.get("device_flops") == self.compute.device_flops):
            self.compute.step_flops = float(saved["step_flops"])

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        """End the fit: stop a count a failed round left open, check the last round's masks, and (rank 0)
        release the network (a recording writes its trace). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self._flop_counter is not None:
            self._stop_counting()
        self._frozen = None
        try:
            self.mask_check.flush()  # the last round's check (on CUDA it runs a round late)
        finally:  # a disagreement still releases the network: no bridge left behind
            self.exchange.free_scratch()  # kept for its state (a checkpoint saved after the fit); its scratch goes
            self.gradient_exchange = None
            if self.place.is_global_zero:
                self.network.close()
