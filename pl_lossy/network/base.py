"""The round contract: the one interface between training and the network.

A *round* is one synchronization after one local optimizer step. What happens to its packets depends
only on sizes (:class:`RoundSpec`), never on tensor values, so a round can be simulated ahead, in
parallel, cached, recorded and replayed. Every model must make ``outcome(spec)`` a pure function of
(its configuration, its seed, ``spec``).
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ns3_bridge.sim.round import TRANSPORTS, fail_outcome


@dataclass(frozen=True)
class RoundSpec:
    """Sizes of one RPS round.

    ``n_servers`` blocks of ``packets_per_block`` packets each. With ``colocated_servers`` (the paper's
    setting) server ``j`` runs on worker ``j``, so worker ``j``'s own block ``j`` never crosses the
    network; otherwise the servers are ``n_servers`` hosts of their own.
    """

    round: int
    n_workers: int
    n_servers: int
    packets_per_block: int
    packet_bytes: int = 1400
    transport: str = "udp"
    colocated_servers: bool = True
    last_packet_bytes: int | None = None  # the last packet of a block may be short; None = full
    deadline_s: float | None = None  # each phase ends at the latest this long after it starts; later packets are lost
    compute_s: float = 0.0  # stragglers: the nominal compute time of a round...
    compute_jitter: float = 0.0  # ...each worker's drawn lognormal around it with this sigma (mean-preserving)...
    slow_workers: tuple[tuple[int, float], ...] = ()  # ...and (worker, factor): named slow workers
    worker_failures: tuple[tuple[int, int, int], ...] = ()  # (worker, first, last): down for rounds [first, last)

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"RoundSpec.round must be >= 0, got {self.round}")
        for name in ("n_workers", "n_servers", "packets_per_block", "packet_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"RoundSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"RoundSpec.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.colocated_servers and self.n_servers > self.n_workers:
            raise ValueError(
                f"{self.n_servers} co-located servers need at least as many workers (got {self.n_workers})"
            )
        if self.last_packet_bytes is not None and not 1 <= self.last_packet_bytes <= self.packet_bytes:
            raise ValueError(f"RoundSpec.last_packet_bytes must be in [1, packet_bytes], got {self.last_packet_bytes}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"RoundSpec.deadline_s must be > 0 seconds (or None: no deadline), got {self.deadline_s}")
        if self.deadline_s is not None and self.transport != "udp":
            raise ValueError(f"a round deadline applies to lossy UDP rounds; transport={self.transport!r} delivers every block")
        if self.compute_s < 0 or self.compute_jitter < 0:
            raise ValueError(f"RoundSpec.compute_s and compute_jitter must be >= 0, got {self.compute_s}, {self.compute_jitter}")
        for worker, factor in self.slow_workers:
            if not 0 <= worker < self.n_workers or not factor > 0:
                raise ValueError(f"slow worker {worker} with factor {factor}: workers are 0..{self.n_workers - 1}, factors > 0")
        for worker, first, last in self.worker_failures:
            if not 0 <= worker < self.n_workers or not 0 <= first < last:
                raise ValueError(f"worker failure [{worker}, {first}, {last}]: workers are 0..{self.n_workers - 1}, rounds 0 <= first < last")
        if self.has_stragglers and self.transport == "none":
            raise ValueError("stragglers delay training traffic; transport='none' has none on the fabric")

    @property
    def down_workers(self) -> tuple[int, ...]:
        """Workers down this round (``worker_failures``; see :mod:`pl_lossy.workers.failures`)."""
        return tuple(sorted({w for w, first, last in self.worker_failures if first <= self.round < last}))

    def workers_up(self) -> np.ndarray:
        """Boolean ``[n_workers]``: True for the workers up this round (not in :attr:`down_workers`)."""
        up = np.ones(self.n_workers, dtype=bool)
        up[list(self.down_workers)] = False
        return up

    def remote_pairs(self) -> np.ndarray:
        """Boolean ``[n_workers, n_servers]``: True where worker i's block j crosses the network this round:
        not a co-located pair, and both hosts up (a down worker, with co-located servers its server too,
        has no traffic: the same pairs as the simulator's ``RoundShape.remote_pairs``)."""
        remote = ~self.local_pairs()
        down = list(self.down_workers)
        if down:
            remote = remote.copy()
            remote[down] = False
            if self.colocated_servers:
                remote[:, [w for w in down if w < self.n_servers]] = False
        return remote

    @property
    def has_stragglers(self) -> bool:
        """Whether workers finish computing at different times (``compute_jitter`` or ``slow_workers``)."""
        return self.compute_jitter > 0 or bool(self.slow_workers)

    def compute_factors(self, seed: int) -> np.ndarray:
        """Each worker's compute time over the nominal ``compute_s`` this round: ``factor_w x exp(sigma z - sigma^2 / 2)``,
        ``z ~ N(0, 1)`` drawn from (seed, round, worker) (mean 1 over the draws), ``factor_w`` the slow workers' (else 1)."""
        factors = np.ones(self.n_workers)
        if self.compute_jitter > 0:
            z = round_rng(seed, self.round, STRAGGLER_STREAM).standard_normal(self.n_workers)
            factors = np.exp(self.compute_jitter * z - self.compute_jitter**2 / 2)
        for worker, factor in self.slow_workers:
            factors[worker] *= factor
        return factors

    def fastest_compute_factor(self, seed: int) -> float:
        """The smallest of :meth:`compute_factors` over the workers up this round: the uplink phase starts when
        the fastest of them is done (a down worker computes nothing the round waits for). 1.0 without
        stragglers or with nobody up."""
        if not self.has_stragglers:
            return 1.0
        up = self.workers_up()
        return float(self.compute_factors(seed)[up].min()) if up.any() else 1.0

    def start_offsets_s(self, seed: int) -> np.ndarray | None:
        """When each worker's uplink starts, from the uplink phase's start (when the fastest worker up finished
        computing): ``compute_s x (factor_w - fastest factor)``, 0 for a down worker (it sends nothing);
        None without stragglers."""
        if not self.has_stragglers:
            return None
        offsets = self.compute_s * (self.compute_factors(seed) - self.fastest_compute_factor(seed))
        offsets[~self.workers_up()] = 0.0  # never negative, which the simulator would refuse
        return offsets

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one block (what one worker sends one server)."""
        last = self.packet_bytes if self.last_packet_bytes is None else self.last_packet_bytes
        return (self.packets_per_block - 1) * self.packet_bytes + last

    @property
    def up_shape(self) -> tuple[int, int, int]:
        return (self.n_workers, self.n_servers, self.packets_per_block)

    @property
    def down_shape(self) -> tuple[int, int, int]:
        return (self.n_servers, self.n_workers, self.packets_per_block)

    def local_pairs(self) -> np.ndarray:
        """Boolean ``[n_workers, n_servers]``: True where worker i and server j share a host (read-only, shared)."""
        return _local_pairs(self.n_workers, self.n_servers, self.colocated_servers)


@functools.lru_cache(maxsize=64)  # asked several times a round, for the same few sizes
def _local_pairs(n_workers: int, n_servers: int, colocated_servers: bool) -> np.ndarray:
    local = np.zeros((n_workers, n_servers), dtype=bool)
    if colocated_servers:
        local[np.arange(n_servers), np.arange(n_servers)] = True
    local.flags.writeable = False
    return local


@dataclass
class RoundOutcome:
    """What the network did to one round.

    ``up[i, j, p]``: packet p of block j sent by worker i reached server j.
    ``down[j, i, p]``: packet p of server j's averaged block reached worker i.
    ``up_time_s`` / ``down_time_s``: simulated completion time of each phase.
    ``stats``: per-round counters (e.g. drops by cause); numbers only.
    """

    up: np.ndarray
    down: np.ndarray
    up_time_s: float
    down_time_s: float
    stats: dict[str, float] = field(default_factory=dict)

    def check(self, spec: RoundSpec) -> "RoundOutcome":
        """Raise ValueError unless the masks have the shapes ``spec`` asks for, a co-located server's
        own copies (``up[j, j]``, ``down[j, j]``), which never cross the network, are delivered (a down
        worker's too: it keeps its own block, see ``fail_outcome``) and nothing a down worker (or its
        co-located server) would send or receive is delivered."""
        if self.up.shape != spec.up_shape or self.up.dtype != np.bool_:
            raise ValueError(f"outcome.up must be bool {spec.up_shape}, got {self.up.dtype} {self.up.shape}")
        if self.down.shape != spec.down_shape or self.down.dtype != np.bool_:
            raise ValueError(f"outcome.down must be bool {spec.down_shape}, got {self.down.dtype} {self.down.shape}")
        local = spec.local_pairs()
        if not (self.up[local].all() and self.down[local.T].all()):
            raise ValueError(
                f"round {spec.round}: a co-located server's own block must be delivered (up[j, j] and down[j, j] all True): "
                "it never crosses the network"
            )
        for worker in spec.down_workers:  # usually none: the check costs nothing then
            if self._delivers_for(spec, worker):
                raise ValueError(
                    f"round {spec.round}: worker {worker} is down (worker_failures) but the network delivered its packets: "
                    "a NetworkModel must honour spec.down_workers (see pl_lossy.workers.failures.fail_outcome)"
                )
        return self

    def _delivers_for(self, spec: RoundSpec, worker: int) -> bool:
        """Whether a packet from or to down ``worker`` (or its co-located server) arrived, its own block aside."""
        pairs = np.zeros((spec.n_workers, spec.n_servers), dtype=bool)  # [W, S]: the pairs it takes part in
        pairs[worker] = True
        if spec.colocated_servers and worker < spec.n_servers:
            pairs[:, worker] = True
        pairs &= ~spec.local_pairs()
        return bool(self.up[pairs].any() or self.down.transpose(1, 0, 2)[pairs].any())

    @property
    def comm_time_s(self) -> float:
        return self.up_time_s + self.down_time_s

    def delivered_fractions(self, spec: RoundSpec) -> tuple[float, float]:
        """Fraction of packets that crossed the network and arrived, per phase (local pairs excluded)."""
        remote = ~spec.local_pairs()
        n_remote = int(remote.sum()) * spec.packets_per_block
        if n_remote == 0:
            return 1.0, 1.0
        up = float(self.up[remote].sum()) / n_remote
        down = float(self.down.transpose(1, 0, 2)[remote].sum()) / n_remote
        return up, down


class NetworkModel(abc.ABC):
    """Where a round's outcome comes from.

    Construction must be cheap and free of side effects (it happens in every process of a
    multi-process launch); acquire resources (a simulator, a bridge) on the first ``outcome``.
    """

    #: True when every rank can compute the same outcome itself (no broadcast needed).
    same_on_every_rank: bool = False
    #: How training's blocks cross this network (``RoundSpec.transport``): ``udp`` (lossy) unless it says otherwise.
    transport: str = "udp"
    #: What a round's random draws (drops, stragglers' compute times) are keyed on, with the round.
    seed: int = 0

    @abc.abstractmethod
    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        """The outcome of round ``spec.round``; a pure function of (config, seed, spec)."""

    def check_round(self, spec: RoundSpec) -> None:
        """Raise ValueError if rounds of this size are more than this model will take on (checked before launch)."""

    def check_run(self, spec: RoundSpec, n_rounds: int) -> None:
        """Raise ValueError if this model cannot give rounds 0 .. ``n_rounds`` - 1 of ``spec``'s size
        (checked when a fit starts, once its length is known)."""

    def prefetch(self, specs: Iterable[RoundSpec]) -> None:
        """Hint that these rounds will be asked for soon (may be a no-op)."""

    def close(self) -> None:
        """Release whatever ``outcome`` acquired; safe to call twice."""

    def describe(self) -> str:
        return type(self).__name__

    def __enter__(self) -> "NetworkModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The random stream stragglers' compute times are drawn from (drops use stream 0).
STRAGGLER_STREAM = 0x5354


def round_rng(seed: int, round_index: int, stream: int = 0) -> np.random.Generator:
    """A generator keyed by (seed, round, stream) alone: the same numbers in any process, any order."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, round_index, stream])))


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def check_probability(name: str, value: float) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def check_positive(name: str, value: float) -> float:
    value = _number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


@dataclass(frozen=True)
class StarTiming:
    """Analytic phase times on a star: every host has its own full-duplex link to one switch.

    A phase ends when the busiest host link has carried its bytes: ``max(bytes out, bytes in) / rate
    + latency`` (store-and-forward of one packet and queueing are folded into ``latency_s``).
    """

    link_rate_bps: float = 10e9
    latency_s: float = 50e-6

    def __post_init__(self) -> None:
        check_positive("link_rate_bps", self.link_rate_bps)
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}")

    def packet_arrivals(self, spec: RoundSpec, start_offsets_s: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """When each packet arrives (seconds from its phase's start; 0 for co-located pairs, which never
        cross the network): ``up [W, S, P]`` and ``down [S, W, P]``.

        Every sender paces its packets round-robin over its remote flows, one per packet time ``t``
        (packet ``p`` of its ``f``-th flow leaves in slot ``k = p x flows + f``); a receiver's link carries
        at most one packet per ``t``, so where receivers have more senders than senders have flows, slots
        stretch by that ratio ``r``. Packet ``k`` arrives at ``(k + 1) x t x r + latency``: the last one at
        :meth:`phase_times`'s phase time. ``start_offsets_s`` (stragglers) delays each worker's uplink.
        Only :meth:`RoundSpec.remote_pairs` are timed: a down host sends nothing, so takes no slot (0 there).
        """
        remote = spec.remote_pairs()  # [W, S]
        t = spec.packet_bytes * 8 / self.link_rate_bps

        def one_phase(remote: np.ndarray) -> np.ndarray:  # [senders, receivers] -> [senders, receivers, P]
            flows = remote.sum(axis=1, keepdims=True)
            senders_max, flows_max = int(remote.sum(axis=0).max(initial=0)), int(flows.max(initial=0))
            stretch = max(1.0, senders_max / flows_max) if flows_max else 1.0
            index = np.cumsum(remote, axis=1) - 1  # the receiver's place among its sender's flows
            slot = np.arange(spec.packets_per_block)[None, None, :] * flows[:, :, None] + index[:, :, None]
            arrival = (slot + 1) * t * stretch + self.latency_s
            return np.where(remote[:, :, None], arrival, 0.0)

        up = one_phase(remote)
        if start_offsets_s is not None:
            up = np.where(remote[:, :, None], up + start_offsets_s[:, None, None], 0.0)
        return up, one_phase(remote.T)

    def phase_times(self, spec: RoundSpec) -> tuple[float, float]:
        """Each phase's time, over :meth:`RoundSpec.remote_pairs` (down hosts carry nothing); (0, 0) without any."""
        remote = spec.remote_pairs()  # [W, S]
        # Uplink: worker i sends to every remote server; server j receives from every remote worker.
        blocks_busiest = max(int(remote.sum(axis=1).max()), int(remote.sum(axis=0).max()))
        if blocks_busiest == 0:
            return 0.0, 0.0
        t = blocks_busiest * spec.block_bytes * 8 / self.link_rate_bps + self.latency_s
        return t, t  # the downlink moves the same blocks the other way


def star_outcome(spec: RoundSpec, up: np.ndarray, down: np.ndarray, timing: StarTiming, seed: int = 0) -> RoundOutcome:
    """An analytic model's outcome: co-located pairs delivered (they never cross the network), star timing;
    down workers (``spec.down_workers``; with co-located servers their servers too) send and receive nothing
    (``fail_outcome``; stats ``workers_down``) and the round is timed as if they were absent; with a deadline,
    packets that would arrive after it (:meth:`StarTiming.packet_arrivals`) are lost and each phase lasts at
    most the deadline; stragglers (``seed`` draws them) start their uplink late. Changes ``up``/``down`` in place."""
    local = spec.local_pairs()
    up[local] = True
    down[local.T] = True
    stats: dict[str, float] = {}
    if spec.down_workers:
        fail_outcome(up, down, spec.down_workers, spec.colocated_servers)
        stats["workers_down"] = float(len(spec.down_workers))
    up_t, down_t = timing.phase_times(spec)
    offsets = spec.start_offsets_s(seed)
    if offsets is None and spec.deadline_s is None:
        return RoundOutcome(up, down, up_t, down_t, stats)
    up_at, down_at = timing.packet_arrivals(spec, offsets)
    if offsets is not None:
        up_t = max(up_t, float(up_at.max()))  # the uplink lasts until the late senders' last packets arrive
    if spec.deadline_s is None:
        return RoundOutcome(up, down, up_t, down_t, stats)
    deadline = spec.deadline_s
    late_up, late_down = (up_at > deadline) & up, (down_at > deadline) & down  # arrived, but after the deadline
    up &= ~late_up
    down &= ~late_down
    stats["packets_late"] = float(late_up.sum() + late_down.sum())
    remote = spec.remote_pairs()
    for phase, arrived, at in (("up", up & remote[:, :, None], up_at), ("down", down & remote.T[:, :, None], down_at)):
        stats[f"{phase}_t50_s"] = float(np.median(at[arrived])) if arrived.any() else 0.0  # what an adaptive deadline reads
    return RoundOutcome(up, down, min(up_t, deadline), min(down_t, deadline), stats)
