"""LossyPSStrategy: data-parallel training with RPS over a simulated unreliable network.

The strategy is Lightning's lifecycle only, in the order Lightning calls it: checks at construction, the
workers laid out at setup, a :class:`~pl_lossy.round.session.FitSession` per fit (everything that lives for
one fit), one round per optimizer step (:mod:`pl_lossy.round.pipeline`), the session closed at teardown,
and the checkpoint hooks that carry every worker's state (:mod:`pl_lossy.workers.checkpointing`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from typing import Any, Callable, Literal, Mapping, Optional, Union

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.utilities.optimizer import _optimizers_to_device
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from .network import NetworkModel, Ns3Network, RoundSpec
from .round.aggregation import GRADIENT_RULES, check_aggregation
from .round.clock import RoundRecord, SimClock
from .round.compute import ComputeModel, check_stragglers
from .round.exchange import SIDE_FIELDS, RPSExchange
from .round.gradient_exchange import GradientExchange
from .round.pipeline import run_round
from .round.rps import PacketLayout
from .round.session import FitSession, ProcessPlace
from .workers import checkpointing
from .workers.buffer_sync import SYNC_BUFFERS
from .workers import failures
from .workers.failures import check_failures
from .workers.replicas import WorkerReplicas
from .workers.sharding import shard_dataloader
from .workers.steps import BATCHING, WorkerSteps

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "lossy_ps"


class LossyPSStrategy(DDPStrategy):
    """Data-parallel training where every step's exchange crosses a simulated lossy network.

    After each local optimizer step, one RPS round (Yu, Tang et al., ICML 2019) averages model blocks
    through parameter servers; the ``network`` decides which packets arrive and how long each phase
    takes, and training applies exactly those drops. The model is not wrapped in DDP: gradients stay
    local, and the only per-step communication is one all_reduce of the flat model. Other
    ``aggregation`` rules exchange gradients instead, between the backward pass and the optimizer step.

    Args:
        aggregation: what a round exchanges and makes of lost packets (see :mod:`pl_lossy.round.aggregation`):
            ``"rps"`` (models, averaged over the copies that arrived; a miss keeps its own block),
            ``"gradient"`` (gradients, likewise), ``"zero_fill"`` (gradients, a lost packet counts as zeros,
            MLT) or ``"hadamard"`` (``zero_fill`` in a randomized Hadamard basis, OptiReduce; blocks padded
            to powers of two).
        network: where each round's outcome comes from (default: ``Ns3Network(loss_rate=0.01)``, a
            packet-level ns-3 simulation of a 10 Gb/s star, started by rank 0 on the first round).
        workers_per_device: RPS workers (replicas) each process trains; ``W = processes x k`` workers in
            all. Each has its own parameters, buffers and optimizer state, trains on its own shard of
            the process's batch (the loader's ``batch_size`` rows each: the per-worker batch) and is one
            host of the network. See :mod:`pl_lossy.workers.replicas` and :mod:`pl_lossy.workers.sharding`.
        batching: how ``k > 1`` workers run a step: ``"vmap"`` (one ``torch.func.vmap`` call for all),
            ``"loop"`` (one after another; always correct), ``"auto"`` (vmap, falling back to the loop,
            logged, if the step cannot be batched), ``"cuda_graph"`` (on a GPU, the vmapped training
            step recorded once in CUDA graphs and replayed: for steps that are a function of the batch
            and the parameters alone; see :mod:`pl_lossy.workers.step_graph`).
        packet_bytes: payload bytes per packet (fp32 elements: ``packet_bytes / 4`` per packet at most).
        num_servers: parameter servers; default one per worker.
        colocated_servers: server j runs on worker j (the paper's setting). If False the servers are
            dedicated hosts: a server that receives none of a packet's copies resends its previous value.
        sync_buffers: module buffers (BatchNorm statistics) are not sent through the lossy network;
            after each round they are made equal reliably: ``"broadcast"`` worker 0's (as DDP does),
            ``"average"`` the mean of floating-point buffers over workers (others worker 0's), ``"none"`` kept per worker.
        compute_time_s: simulated compute time per round (see :mod:`pl_lossy.round.compute`): ``"flops"`` (one
            worker's step FLOPs, counted on the first step, / ``device_flops``: the same every run), a
            number of seconds, or ``"measured"`` (``None``): the slowest process's wall-clock time from its
            first training step after a round to the round (changes from run to run; on CUDA it reads a
            value back from the device every round).
        device_flops: sustained FLOP/s of one simulated worker's device, for ``compute_time_s="flops"``.
        deadline_s: bounded rounds: each phase (uplink, downlink) ends at the latest this many simulated
            seconds after it starts; packets that would arrive later count as lost (the receivers stop
            waiting; senders still send them). ``None``: a phase lasts until its last packet is resolved.
            Lossy UDP rounds only (not ``transport=tcp``).
        adaptive_deadline: adapt the deadline every round to what the last one needed (see
            :mod:`pl_lossy.round.deadlines`), starting at and never above ``deadline_s`` (required), with
            ``deadline_slack`` (default 1.25) over the estimate.
        compute_jitter: stragglers: each worker's compute time per round is the compute time times
            ``exp(sigma z - sigma^2 / 2)``, ``z ~ N(0, 1)`` drawn from (network seed, round, worker): a
            lognormal of mean 1 with this ``sigma``; 0: every worker computes for the same time.
        slow_workers: stragglers by name: ``{worker: factor}`` multiplies that worker's compute time.
            With stragglers the uplink starts when the fastest worker is done and each worker's uplink when
            its own compute ends (the round waits for the slowest, or for ``deadline_s``). They need a
            reproducible compute time (``compute_time_s`` "flops" or seconds).
        worker_failures: ``[[worker, first, last], ...]``: that worker is down for rounds ``first..last-1``: it
            sends and receives nothing (nor does its co-located server) and its replica stays as it was
            (parameters, optimizer state, buffers); then it rejoins (see :mod:`pl_lossy.workers.failures`).
        divergence_every: every this many rounds, measure how far replicas are from their mean (two
            extra all_reduces); 0 turns it off.
        mean_model_every: every this many rounds, keep the replicas' mean model (flat, float32, on the CPU:
            rounds / this x parameters x 4 bytes, meant for small models); :class:`~pl_lossy.callbacks.RunSummary`
            writes them to ``mean_model.pt`` (docs/reproduction.md measures drops' effect on it); 0 (default): off.
        record_trace: path of an ``.npz`` to which rank 0 records each fit's rounds as outcome-store entries
            (replay it with ``TraceNetwork``; ``pl-lossy store import PATH`` puts an ns-3 run's into the store).
        log_metrics: add a :class:`~pl_lossy.callbacks.LossyPSMetrics` callback if none is present.
        **kwargs: passed to :class:`~pytorch_lightning.strategies.DDPStrategy` (``start_method``,
            ``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "lossy_ps"

    def __init__(
        self,
        network: Optional[NetworkModel] = None,
        aggregation: Literal["rps", "gradient", "zero_fill", "hadamard"] = "rps",
        workers_per_device: int = 1,
        batching: Literal["auto", "vmap", "loop", "cuda_graph"] = "auto",
        packet_bytes: int = 1400,
        num_servers: Optional[int] = None,
        colocated_servers: bool = True,
        sync_buffers: Literal["broadcast", "average", "none"] = "broadcast",
        compute_time_s: Union[float, str, None] = "flops",
        device_flops: float = 1e12,
        deadline_s: Optional[float] = None,
        adaptive_deadline: bool = False,
        deadline_slack: float = 1.25,
        compute_jitter: float = 0.0,
        slow_workers: Optional[dict[int, float]] = None,
        worker_failures: Optional[list] = None,
        divergence_every: int = 50,
        mean_model_every: int = 0,
        record_trace: Optional[str] = None,
        log_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if network is not None and not isinstance(network, NetworkModel):
            raise TypeError(f"network must be a pl_lossy.network.NetworkModel, got {type(network).__name__}")
        self.aggregation = check_aggregation(aggregation)
        if isinstance(workers_per_device, bool) or not isinstance(workers_per_device, int) or workers_per_device < 1:
            raise ValueError(f"workers_per_device must be an integer >= 1, got {workers_per_device!r}")
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        if packet_bytes < 4:
            raise ValueError(f"packet_bytes must be >= 4 (one fp32 element), got {packet_bytes}")
        if num_servers is not None and num_servers < 1:
            raise ValueError(f"num_servers must be >= 1 or None (one per worker), got {num_servers}")
        if sync_buffers not in SYNC_BUFFERS:
            raise ValueError(f"sync_buffers must be one of {SYNC_BUFFERS}, got {sync_buffers!r}")
        for name, every in (("divergence_every", divergence_every), ("mean_model_every", mean_model_every)):
            if isinstance(every, bool) or not isinstance(every, int) or every < 0:
                raise ValueError(f"{name} must be an integer >= 0 (rounds; 0: off), got {every!r}")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not deadline_s > 0):
            raise ValueError(f"deadline_s must be a number of seconds > 0 (or None: no deadline), got {deadline_s!r}")
        self.network = network if network is not None else Ns3Network(loss_rate=0.01)
        self.record_trace = str(record_trace) if record_trace else None
        self.workers_per_device = workers_per_device
        self.batching = batching
        self.packet_bytes = int(packet_bytes)
        self.num_servers = num_servers
        self.colocated_servers = colocated_servers
        self.sync_buffers = sync_buffers
        self._compute = ComputeModel(compute_time_s, device_flops)  # the configured model; each fit counts on a fresh copy
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        if not isinstance(adaptive_deadline, bool):
            raise ValueError(f"adaptive_deadline must be true or false, got {adaptive_deadline!r}")
        if adaptive_deadline and self.deadline_s is None:
            raise ValueError("adaptive_deadline needs deadline_s: the first round's deadline and the cap it never exceeds")
        if isinstance(deadline_slack, bool) or not isinstance(deadline_slack, (int, float)) or not deadline_slack >= 1:
            raise ValueError(f"deadline_slack must be a number >= 1 (the margin over the estimated time), got {deadline_slack!r}")
        self.adaptive_deadline, self.deadline_slack = adaptive_deadline, float(deadline_slack)
        self.compute_jitter, self.slow_workers = check_stragglers(compute_jitter, slow_workers, self._compute)
        self.worker_failures = check_failures(worker_failures)
        self.divergence_every, self.mean_model_every = divergence_every, mean_model_every
        self.log_metrics = log_metrics
        self._replicas: Optional[WorkerReplicas] = None
        self._replicas_of: Optional[int] = None  # id() of the module the replicas belong to
        self._steps: Optional[WorkerSteps] = None  # how the replicas' steps run
        self._session: Optional[FitSession] = None  # the current (or last) fit's
        self._clip_patched = False

    # ------------------------------------------------------------------ what a fit is made of

    @property
    def n_workers(self) -> int:
        """RPS workers in all: processes x ``workers_per_device``."""
        return self.world_size * self.workers_per_device

    @property
    def first_worker(self) -> int:
        """Index of this process's first worker (its workers are ``first_worker + j``, j < k)."""
        return self.global_rank * self.workers_per_device

    @property
    def replicas(self) -> Optional[WorkerReplicas]:
        return self._replicas

    @property
    def steps(self) -> Optional[WorkerSteps]:
        """How the workers' steps run (``steps.mode``: vmap, loop or cuda_graph)."""
        return self._steps

    @property
    def session(self) -> Optional[FitSession]:
        """The current fit's session (after a fit ends, that fit's, closed, until the next fit starts)."""
        return self._session

    @property
    def clock(self) -> SimClock:
        return self._session.clock if self._session is not None else SimClock()

    @property
    def compute(self) -> ComputeModel:
        """The fit's compute-time model (its FLOP count once made), or the configured one before any fit."""
        return self._session.compute if self._session is not None else self._compute

    @property
    def last_round(self) -> Optional[RoundRecord]:
        return self._session.last_round if self._session is not None else None

    @property
    def last_divergence(self) -> Optional[float]:
        return self._session.last_divergence if self._session is not None else None

    @property
    def mean_models(self) -> list[tuple[int, Tensor]]:
        """``(rounds done, the replicas' mean model, flat)`` every ``mean_model_every`` rounds of the current (or last) fit."""
        return self._session.mean_models if self._session is not None else []

    @property
    def round(self) -> int:
        return self.clock.rounds

    def round_spec(self, round_index: int) -> RoundSpec:
        assert self._session is not None, "the strategy is not fitting"
        return self._session.round_spec(round_index)

    def _layout(self, module: torch.nn.Module, n_workers: int) -> PacketLayout:
        """How every floating-point parameter of ``module`` (frozen ones too) is cut into packets."""
        numel = sum(p.numel() for p in module.parameters() if p.dtype.is_floating_point)
        return PacketLayout.for_model(numel, self.num_servers or n_workers, self.packet_bytes, self.aggregation == "hadamard")

    def round_spec_for(self, module: torch.nn.Module, world_size: int) -> RoundSpec:
        """The rounds a fit of ``module`` on ``world_size`` processes will run (round 0), known before launch."""
        n_workers = world_size * self.workers_per_device
        layout = self._layout(module, n_workers)
        return RoundSpec(0, n_workers, layout.n_servers, layout.packets_per_block, layout.packet_bytes, self.network.transport,
                         self.colocated_servers, deadline_s=self.deadline_s, compute_jitter=self.compute_jitter,
                         slow_workers=self.slow_workers, worker_failures=self.worker_failures)

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError if this strategy cannot run on ``world_size`` processes (checked before launch)."""
        n_workers = world_size * self.workers_per_device
        if self.colocated_servers and self.num_servers is not None and self.num_servers > n_workers:
            raise ValueError(
                f"num_servers={self.num_servers} co-located servers need at least as many workers; there are {n_workers} "
                "(raise trainer.devices or strategy.workers_per_device, or set colocated_servers=false)"
            )

    # ------------------------------------------------------------------ lifecycle

    def setup(self, trainer: "pl.Trainer") -> None:
        """DDPStrategy.setup without the DDP wrapper, and without resetting replicas trained by an earlier fit."""
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if self.batching == "cuda_graph" and self.workers_per_device > 1 and self.root_device.type != "cuda":
            raise ValueError(f"batching='cuda_graph' records CUDA graphs and needs a GPU, but the workers are on {self.root_device.type}: use batching='vmap'")
        if fitting:
            self.configure_ddp()
            self.setup_optimizers(trainer)
            self._adopt_optimizers()
        else:
            self._setup_replicas(fresh=False)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._check_run_length(trainer)
        if self.log_metrics:
            from .callbacks import LossyPSMetrics

            if not any(isinstance(cb, LossyPSMetrics) for cb in trainer.callbacks):
                trainer.callbacks.append(LossyPSMetrics())

    def configure_ddp(self) -> None:
        """Do not wrap the model: broadcast rank 0's initial state, lay the workers out, open this fit's session."""
        assert isinstance(self.model, pl.LightningModule)
        if self.workers_per_device > 1 and not self.model.automatic_optimization:
            raise ValueError(
                "workers_per_device > 1 needs automatic optimization (one optimizer step of all workers per batch); "
                "this LightningModule optimizes manually: use workers_per_device=1"
            )
        if self._session is not None:
            self._session.close()  # an earlier fit's, should its teardown not have run
        layout = self._setup_replicas(fresh=True)
        exchange = RPSExchange(
            self._replicas.storage, layout, self.global_rank, self.world_size, self.workers_per_device, self.colocated_servers
        )
        gradient_exchange = None
        if self.aggregation in GRADIENT_RULES:
            gradient_exchange = GradientExchange(
                self.aggregation, *self._replicas.trained_tensors(), layout, self.global_rank, self.world_size,
                self.workers_per_device, self.colocated_servers, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
            )
        spec = self.round_spec_for(self.model, self.world_size)
        self.network.check_round(spec)  # the app checks this before launch; here for every other way in
        place = ProcessPlace(self.global_rank, self.world_size, self.workers_per_device, self.root_device)
        self._session = FitSession(
            self.network, spec, self._compute, place, self._replicas, self._steps, exchange, gradient_exchange, self._all_reduce_sum,
            record_trace=self.record_trace, adaptive_deadline=self.adaptive_deadline, deadline_slack=self.deadline_slack,
            sync_buffers=self.sync_buffers, divergence_every=self.divergence_every,
            mean_model_every=self.mean_model_every,
        )
        rank_zero_info(
            f"lossy_ps: {self.n_workers} workers ({self.world_size} processes x {self.workers_per_device}), {layout.n_servers} "
            f"{'co-located' if self.colocated_servers else 'dedicated'} servers, {layout.numel:,} parameters in blocks of "
            f"{layout.packets_per_block} packets x {layout.packet_bytes} B ({2 * int((~spec.local_pairs()).sum()) * layout.packets_per_block:,} "
            f"packets a round), aggregation {self.aggregation}; "
            f"network {self._session.network.describe()}"
        )
        if self.workers_per_device > 1 and self.root_device.type == "cuda" and self.batching in ("auto", "vmap"):
            rank_zero_info(
                "lossy_ps: the workers' steps run as one vmapped call; batching='cuda_graph' records the training step once in CUDA "
                "graphs and replays it (2.5-3.6x faster for 16 ResNet-20 workers), for a training_step that is a function of the batch "
                "and the parameters alone (docs/virtual_workers.md)"
            )

    def _check_run_length(self, trainer: "pl.Trainer") -> None:
        """A network that holds a limited number of rounds (a trace) fails now, not after an epoch."""
        if not self.lightning_module.automatic_optimization:
            return  # rounds are the module's optimizer steps: not known ahead
        steps = trainer.estimated_stepping_batches
        if math.isfinite(steps):
            self.network.check_run(self._session.spec, int(steps))

    def _setup_replicas(self, fresh: bool) -> PacketLayout:
        """Lay this process's workers out in one storage (see :class:`~pl_lossy.workers.replicas.WorkerReplicas`).

        ``fresh``: from rank 0's module state (a fit). Otherwise (validate/test/predict) replicas an
        earlier fit of this module left are kept, each rank its own, instead of Lightning's reset of
        every rank to rank 0's; without them, rank 0's state is broadcast as DDP does.
        """
        module = self.lightning_module
        layout = self._layout(module, self.n_workers)
        reuse = (
            not fresh and self._replicas is not None and self._replicas_of == id(module)
            and self._replicas.k == self.workers_per_device and self._replicas.row_numel == layout.padded_numel
        )
        if reuse:
            self._replicas.to(self.root_device, module)
        else:
            _sync_module_states(module)
            self._replicas = WorkerReplicas(module, self.workers_per_device, layout.padded_numel, trailing=SIDE_FIELDS * self.world_size)
            self._replicas_of = id(module)
            self._steps = WorkerSteps(self._replicas, self.batching)
        return layout

    def _adopt_optimizers(self) -> None:
        """With k > 1: optimizers step the stacked workers, and norm clipping is per worker."""
        assert self._replicas is not None
        if self.workers_per_device == 1:
            return
        failures.check_failure_optimizers(self.optimizers, self.workers_per_device, self.worker_failures)
        self._replicas.adopt_optimizers(self.optimizers)
        plugin, replicas = self.precision_plugin, self._replicas

        def clip_grad_by_norm(optimizer: Optimizer, clip_val: float) -> None:
            replicas.clip_grad_norm_(list(plugin.main_params(optimizer)), float(clip_val))

        # an instance attribute shadows the plugin's method (Lightning calls it on this object); removed in teardown
        plugin.clip_grad_by_norm = clip_grad_by_norm
        self._clip_patched = True

    def process_dataloader(self, dataloader: object) -> object:
        """With k > 1 a process's batch is its k workers' batches (see :mod:`pl_lossy.workers.sharding`);
        predict loaders stay as they are (worker 0's replica predicts, on the module)."""
        if self.workers_per_device == 1 or self._predicting():
            return dataloader
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return shard_dataloader(dataloader, self.n_workers, self.global_rank, self.workers_per_device, seed)

    def _predicting(self) -> bool:
        trainer = getattr(self.lightning_module, "_trainer", None)
        return trainer is not None and trainer.state.fn == TrainerFn.PREDICTING

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._session is not None
        self._session.begin_step(self.optimizers, self.lightning_module)
        if self.workers_per_device == 1:
            return super().training_step(*args, **kwargs)
        with self.precision_plugin.train_step_context(), self._session.step_context():
            return self._steps.run_step(self.lightning_module, "training_step", *args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.workers_per_device == 1:
            return super().validation_step(*args, **kwargs)
        with self.precision_plugin.val_step_context():
            return self._steps.run_step(self.lightning_module, "validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.workers_per_device == 1:
            return super().test_step(*args, **kwargs)
        with self.precision_plugin.test_step_context():
            return self._steps.run_step(self.lightning_module, "test_step", *args, **kwargs)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        """The local step (precision plugin, clipping, closure) then one RPS round; under a gradient rule
        the round runs between the closure (backward) and clipping, so the step uses the aggregate."""
        assert self._session is not None
        if self._session.gradient_exchange is not None:
            def closure_then_round() -> Any:
                result = closure()
                self.exchange_round()
                return result

            output = super().optimizer_step(optimizer, closure_then_round, model, **kwargs)
            self._session.thaw()
            return output
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._session.thaw()
        self.exchange_round()
        return output

    def exchange_round(self) -> RoundRecord:
        """One round (:func:`pl_lossy.round.pipeline.run_round`), then the callbacks that define ``on_round_end``
        (a round is not a Lightning hook)."""
        assert self._session is not None, "the strategy is not fitting"
        record = run_round(self._session, self.lightning_module)
        trainer = getattr(self.lightning_module, "_trainer", None)
        if trainer is not None:
            for cb in trainer.callbacks:
                if callable(getattr(cb, "on_round_end", None)):
                    cb.on_round_end(trainer, self)
        return record

    def teardown(self) -> None:
        if self._session is not None:
            self._session.close()  # the session stays readable (clock, last round) until the next fit
        if self._clip_patched:
            del self.precision_plugin.clip_grad_by_norm
            self._clip_patched = False
        if self._replicas is not None and self.lightning_module is not None and self._replicas_of == id(self.lightning_module):
            self._replicas.to(torch.device("cpu"), self.lightning_module)  # all workers, not just the module's worker 0
        super().teardown()

    def _all_reduce_sum(self, tensor: Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    # ------------------------------------------------------------------ checkpoints

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the workers' storage exists before a checkpoint is poured into it

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint carries besides Lightning's own: the clock, dedicated servers' blocks, and
        every worker's parameters, buffers and optimizer state (gathered from every process: a collective)."""
        session = self._session
        state: dict[str, Any] = {
            **(session.state_dict() if session is not None else {"clock": asdict(SimClock()), "exchange": {}, "compute": self.compute.describe()}),
            "aggregation": self.aggregation,
            "n_workers": self.n_workers,
            "workers_per_device": self.workers_per_device,
        }
        if self._replicas is not None:
            mine = checkpointing.process_workers(self._replicas, self.optimizers, self.lightning_module)
            everyone = [None] * self.world_size
            if self.world_size > 1:
                dist.all_gather_object(everyone, mine)
            else:
                everyone = [mine]
            state["workers"] = checkpointing.merge_processes(everyone)
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        # Lightning's `state_dict` and `optimizer_states` are worker 0's (rank 0's); every worker's are under `lossy_ps`
        checkpoint[CHECKPOINT_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Worker 0's replica into the module, then every worker of this process its own (or worker 0's, from a
        checkpoint with another worker count); the clock when fitting. Called outside a fit too (Lightning's
        checkpoint connector restores a module attached to no Trainer), so it asks the module nothing of one."""
        super().load_model_state_dict(checkpoint, strict=strict)
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        replicas, module = self._replicas, self.lightning_module
        if replicas is not None:
            workers = self._checkpoint_workers(state)
            if workers is not None:
                replicas.load_worker_state(workers["params"], workers["buffers"], module)
            elif replicas.k > 1:
                replicas.load_worker_state(*checkpointing.worker_zero_everywhere(replicas, module), module)
        trainer = getattr(module, "_trainer", None)
        if state and self._session is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._session.load_state_dict(state)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        workers = self._checkpoint_workers(checkpoint.get(CHECKPOINT_KEY) or {}, warn=False)
        if workers is not None and workers["optimizers"]:
            per_optimizer = workers["optimizers"]
        elif self.workers_per_device > 1:  # only worker 0's (rank 0's): every worker starts from it
            per_optimizer = [[s] * self.workers_per_device for s in checkpoint["optimizer_states"]]
        else:
            return super().load_optimizer_state_dict(checkpoint)
        for optimizer, states in zip(self.optimizers, per_optimizer):
            optimizer.load_state_dict(checkpointing.stack_optimizer_state(optimizer, states))
            _optimizers_to_device([optimizer], self.root_device)

    def _checkpoint_workers(self, state: Mapping[str, Any], warn: bool = True) -> Optional[dict[str, Any]]:
        workers = checkpointing.own_workers(state, self.n_workers, self.first_worker, self.workers_per_device)
        if warn and workers is not None and state.get("n_workers") != self.n_workers:
            rank_zero_warn(
                f"lossy_ps: the checkpoint holds {state.get('n_workers')} workers' replicas, this run has {self.n_workers}: "
                "every worker resumes from worker 0's replica"
            )
        return workers

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, start_method in (("lossy_ps", "popen"), ("lossy_ps_spawn", "spawn"), ("lossy_ps_fork", "fork")):
            strategy_registry.register(
                name,
                cls,
                description=f"RPS over a simulated lossy network, start_method '{start_method}'",
                override=True,
                start_method=start_method,
            )
