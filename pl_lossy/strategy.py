"""LossyPSStrategy: data-parallel training with RPS over a simulated unreliable network."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from .exchange import RPSExchange
from .network import NetworkModel, Ns3Network, RoundOutcome, RoundSpec, TraceRecorder

log = logging.getLogger(__name__)

SYNC_BUFFERS = ("broadcast", "average", "none")
CHECKPOINT_KEY = "lossy_ps"


@dataclass
class RoundRecord:
    """What the last round did, for loggers (see :class:`~pl_lossy.callbacks.LossyPSMetrics`)."""

    round: int
    delivered_up: float
    delivered_down: float
    up_time_s: float
    down_time_s: float
    compute_time_s: float
    sim_time_s: float
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def comm_time_s(self) -> float:
        return self.up_time_s + self.down_time_s


@dataclass
class SimClock:
    """Simulated time: ``sim_time += compute + up + down`` per round."""

    rounds: int = 0
    sim_time_s: float = 0.0
    comm_time_s: float = 0.0
    compute_time_s: float = 0.0
    delivered_up_sum: float = 0.0
    delivered_down_sum: float = 0.0

    def advance(self, compute_s: float, outcome: RoundOutcome, delivered: tuple[float, float]) -> None:
        self.rounds += 1
        self.compute_time_s += compute_s
        self.comm_time_s += outcome.comm_time_s
        self.sim_time_s += compute_s + outcome.comm_time_s
        self.delivered_up_sum += delivered[0]
        self.delivered_down_sum += delivered[1]

    @property
    def delivered_up(self) -> float:
        return self.delivered_up_sum / self.rounds if self.rounds else 1.0

    @property
    def delivered_down(self) -> float:
        return self.delivered_down_sum / self.rounds if self.rounds else 1.0


class LossyPSStrategy(DDPStrategy):
    """Data-parallel training where every step's model exchange crosses a simulated lossy network.

    After each local optimizer step, one RPS round (Yu, Tang et al., ICML 2019) averages model blocks
    through parameter servers; the ``network`` decides which packets arrive and how long each phase
    takes, and training applies exactly those drops. The model is not wrapped in DDP: gradients stay
    local, and the only per-step communication is one all_reduce of the flat model.

    Args:
        network: where each round's outcome comes from (default: ``Ns3Network(loss_rate=0.01)``, a
            packet-level ns-3 simulation of a 10 Gb/s star, started by rank 0 on the first round).
        packet_bytes: payload bytes per packet (fp32 elements: ``packet_bytes / 4`` per packet at most).
        num_servers: parameter servers; default one per worker.
        colocated_servers: server j runs on worker j (the paper's setting). If False the servers are
            dedicated hosts: a server that receives none of a packet's copies resends its previous value.
        sync_buffers: module buffers (BatchNorm statistics) are not sent through the lossy network;
            after each round they are made equal reliably: ``"broadcast"`` rank 0's (as DDP does),
            ``"average"`` the mean of floating-point buffers (others from rank 0), ``"none"`` kept local.
        compute_time_s: simulated compute time per round; ``None`` measures it (the slowest rank's time
            from its first training step after a round to the start of the next round).
        divergence_every: every this many rounds, measure how far replicas are from their mean (two
            extra all_reduces); 0 turns it off.
        record_trace: path of an ``.npz`` to which rank 0 records every round's outcome (replay it with
            ``TraceNetwork``).
        log_metrics: add a :class:`~pl_lossy.callbacks.LossyPSMetrics` callback if none is present.
        **kwargs: passed to :class:`~pytorch_lightning.strategies.DDPStrategy` (``start_method``,
            ``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "lossy_ps"

    def __init__(
        self,
        network: Optional[NetworkModel] = None,
        packet_bytes: int = 1400,
        num_servers: Optional[int] = None,
        colocated_servers: bool = True,
        sync_buffers: Literal["broadcast", "average", "none"] = "broadcast",
        compute_time_s: Optional[float] = None,
        divergence_every: int = 50,
        record_trace: Optional[str] = None,
        log_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if network is not None and not isinstance(network, NetworkModel):
            raise TypeError(f"network must be a pl_lossy.network.NetworkModel, got {type(network).__name__}")
        if packet_bytes < 4:
            raise ValueError(f"packet_bytes must be >= 4 (one fp32 element), got {packet_bytes}")
        if num_servers is not None and num_servers < 1:
            raise ValueError(f"num_servers must be >= 1 or None (one per worker), got {num_servers}")
        if sync_buffers not in SYNC_BUFFERS:
            raise ValueError(f"sync_buffers must be one of {SYNC_BUFFERS}, got {sync_buffers!r}")
        if compute_time_s is not None and compute_time_s < 0:
            raise ValueError(f"compute_time_s must be >= 0 or None (measured), got {compute_time_s}")
        if divergence_every < 0:
            raise ValueError(f"divergence_every must be >= 0, got {divergence_every}")
        self.network = network if network is not None else Ns3Network(loss_rate=0.01)
        if record_trace:
            self.network = TraceRecorder(self.network, record_trace)
        self.packet_bytes = int(packet_bytes)
        self.num_servers = num_servers
        self.colocated_servers = colocated_servers
        self.sync_buffers = sync_buffers
        self.compute_time_s = compute_time_s
        self.divergence_every = divergence_every
        self.log_metrics = log_metrics
        self.clock = SimClock()
        self.last_round: Optional[RoundRecord] = None
        self.last_divergence: Optional[float] = None
        self._exchange: Optional[RPSExchange] = None
        self._spec: Optional[RoundSpec] = None
        self._compute_start: Optional[float] = None
        self._restored: Optional[dict] = None

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError if this strategy cannot run on ``world_size`` workers (checked before launch)."""
        if self.colocated_servers and self.num_servers is not None and self.num_servers > world_size:
            raise ValueError(
                f"num_servers={self.num_servers} co-located servers need at least as many workers; "
                f"there are {world_size} (raise trainer.devices or set colocated_servers=false)"
            )

    # ------------------------------------------------------------------ lifecycle

    def setup(self, trainer: "pl.Trainer") -> None:
        super().setup(trainer)  # moves the model, calls configure_ddp(), sets up optimizers
        if self.log_metrics:
            from .callbacks import LossyPSMetrics

            if not any(isinstance(cb, LossyPSMetrics) for cb in trainer.callbacks):
                trainer.callbacks.append(LossyPSMetrics())

    def configure_ddp(self) -> None:
        """Do not wrap the model: broadcast rank 0's initial state and lay the parameters out flat."""
        assert isinstance(self.model, pl.LightningModule)
        _sync_module_states(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        n_servers = self.num_servers or self.world_size
        self._exchange = RPSExchange(
            params, self.global_rank, self.world_size, n_servers, self.packet_bytes, self.colocated_servers
        )
        layout = self._exchange.layout
        self._spec = RoundSpec(
            round=0,
            n_workers=self.world_size,
            n_servers=n_servers,
            packets_per_block=layout.packets_per_block,
            packet_bytes=layout.packet_bytes,
            colocated_servers=self.colocated_servers,
        )
        if isinstance(self.network, TraceRecorder) and not self.is_global_zero:
            self.network = self.network.network  # only rank 0 records
        if self._restored is not None:
            self._apply_restored(self._restored)
            self._restored = None
        rank_zero_info(
            f"lossy_ps: {self.world_size} workers, {n_servers} {'co-located' if self.colocated_servers else 'dedicated'} "
            f"servers, {layout.numel:,} parameters in blocks of {layout.packets_per_block} packets x "
            f"{layout.packet_bytes} B; network {self.network.describe()}"
        )

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._compute_start is None:
            self._compute_start = time.perf_counter()
        return super().training_step(*args, **kwargs)

    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Any:
        """The local step (precision plugin, clipping, closure) then one RPS round."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.exchange_round()
        return output

    def teardown(self) -> None:
        if self.network is not None and self.is_global_zero:
            self.network.close()
        self._exchange = None  # its scratch buffers go; the parameters keep their flat storage
        super().teardown()

    # ------------------------------------------------------------------ the round

    @property
    def round(self) -> int:
        return self.clock.rounds

    def round_spec(self, round_index: int) -> RoundSpec:
        assert self._spec is not None, "the strategy is not set up"
        return RoundSpec(**{**asdict(self._spec), "round": round_index})

    def exchange_round(self) -> RoundRecord:
        assert self._exchange is not None, "the strategy is not set up"
        compute = time.perf_counter() - self._compute_start if self._compute_start is not None else 0.0
        spec = self.round_spec(self.clock.rounds)
        outcome = self._obtain_outcome(spec)
        up = torch.from_numpy(outcome.up)
        down = torch.from_numpy(outcome.down)
        side = self._exchange.step(up, down, self._all_reduce_sum, side_value=compute)
        compute_s = float(side.max()) if self.compute_time_s is None else self.compute_time_s
        self._sync_buffers()
        delivered = outcome.delivered_fractions(spec)
        self.clock.advance(compute_s, outcome, delivered)
        self.last_round = RoundRecord(
            spec.round, *delivered, outcome.up_time_s, outcome.down_time_s, compute_s, self.clock.sim_time_s, outcome.stats
        )
        if self.divergence_every and self.clock.rounds % self.divergence_every == 0:
            rms, norm = self._exchange.divergence(self._all_reduce_sum)
            self.last_divergence = rms / norm if norm > 0 else 0.0
        if self.is_global_zero and not self.network.same_on_every_rank:
            self.network.prefetch([self.round_spec(spec.round + 1)])
        self._compute_start = None
        return self.last_round

    def _obtain_outcome(self, spec: RoundSpec) -> RoundOutcome:
        """Rank 0 asks the network; the others get the masks by broadcast (or draw them when they can)."""
        if self.world_size == 1 or self.network.same_on_every_rank:
            return self.network.outcome(spec).check(spec)
        n_up = int(np.prod(spec.up_shape))
        n_packed = 2 * ((n_up + 7) // 8)
        payload = np.zeros(17 + n_packed, dtype=np.uint8)  # [ok flag][2 x float64 times][up bits][down bits]
        error: Optional[BaseException] = None
        if self.is_global_zero:
            try:
                outcome = self.network.outcome(spec).check(spec)
                payload[0] = 1
                payload[1:17] = np.frombuffer(np.asarray([outcome.up_time_s, outcome.down_time_s]).tobytes(), np.uint8)
                bits = np.concatenate([np.packbits(outcome.up.ravel()), np.packbits(outcome.down.ravel())])
                payload[17:] = bits
            except BaseException as exc:  # still broadcast, so the other ranks fail instead of hanging
                error = exc
        buf = torch.from_numpy(payload).to(self.root_device)
        dist.broadcast(buf, src=0)
        payload = buf.cpu().numpy()
        if payload[0] != 1:
            reason = [f"{type(error).__name__}: {error}" if error is not None else None]
            dist.broadcast_object_list(reason, src=0)  # so every rank fails with rank 0's reason
            if error is not None and not isinstance(error, Exception):
                raise error  # KeyboardInterrupt and friends stay what they are
            message = f"rank 0 could not obtain round {spec.round} from the network {self.network.describe()}: {reason[0]}"
            raise RuntimeError(message) from error
        if self.is_global_zero:
            return outcome
        times = np.frombuffer(payload[1:17].tobytes(), dtype=np.float64)
        half = n_packed // 2
        up = np.unpackbits(payload[17 : 17 + half], count=n_up).astype(bool).reshape(spec.up_shape)
        down = np.unpackbits(payload[17 + half :], count=n_up).astype(bool).reshape(spec.down_shape)
        return RoundOutcome(up, down, float(times[0]), float(times[1]))

    def _all_reduce_sum(self, tensor: Tensor) -> None:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def _sync_buffers(self) -> None:
        """Make module buffers equal on every rank, reliably (one collective per buffer dtype)."""
        if self.sync_buffers == "none" or self.world_size == 1:
            return
        assert self.lightning_module is not None
        buffers = [b for b in self.lightning_module.buffers() if b.numel()]
        for dtype in sorted({b.dtype for b in buffers}, key=str):  # the same order on every rank
            group = [b for b in buffers if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in group])
            if self.sync_buffers == "average" and dtype.is_floating_point:
                dist.all_reduce(flat)
                flat.div_(self.world_size)
            else:
                dist.broadcast(flat, src=0)
            for b, synced in zip(group, flat.split([b.numel() for b in group])):
                b.copy_(synced.view_as(b))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry so that a resumed run continues the same drop sequence."""
        return {
            "clock": asdict(self.clock),
            "exchange": self._exchange.state_dict() if self._exchange is not None else {},
        }

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        # The model state in `checkpoint` is rank 0's replica (under drops replicas differ).
        checkpoint[CHECKPOINT_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is not None:
            if self._exchange is None:
                self._restored = state  # applied once the exchange is built in configure_ddp()
            else:
                self._apply_restored(state)
        return checkpoint

    def _apply_restored(self, state: Mapping[str, Any]) -> None:
        self.clock = SimClock(**state["clock"])
        if self._exchange is not None and state.get("exchange"):
            self._exchange.load_state_dict(state["exchange"])

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
