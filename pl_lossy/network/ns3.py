"""Ns3Network: rounds simulated packet by packet by ns-3, behind the ZeroMQ bridge."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import subprocess
import sys
import uuid
from typing import Any, Iterable, Optional, Union

from ns3_bridge.client import BridgeClient, BridgeError
from ns3_bridge.lifetime import private_ipc_endpoint
from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import SIM_PACKETS_PER_S, TRANSPORTS, RoundShape, packet_budget
from ns3_bridge.sim.topology import link_ends

from .base import NetworkModel, RoundOutcome, RoundSpec
from .bernoulli import resolve_alias
from . import fidelity as fidelities
from .fidelity import Fidelity, ReusedRounds
from .outcome_store import OutcomeStore, config_settings, resolve_path, round_key, simulator_identity

log = logging.getLogger(__name__)


#: ``loss_rate`` values a config file passes when the user set none: NetworkConfig's default and
#: conf/network/ns3_star.yaml's. The alias ``drop_rate`` replaces them; any other must equal it.
_LOSS_RATE_DEFAULTS = (None, 0.0, 0.01)


def _canonical_names(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``drop_rate`` (the alias every network accepts) mapped to ``loss_rate``; mapped here,
    not in NetworkConfig, so the rounds' store keys and the simulator's identity stay as they were."""
    if "drop_rate" not in settings:
        return settings
    settings = dict(settings)
    loss_rate = resolve_alias("loss_rate", settings.get("loss_rate"), "drop_rate", settings.pop("drop_rate"),
                              unset=_LOSS_RATE_DEFAULTS)
    if loss_rate is not None:
        settings["loss_rate"] = loss_rate
    return settings


class Ns3Network(NetworkModel):
    """Every round's packets cross an ns-3 simulation; its masks and phase times are what training applies.

    With ``endpoint=None`` the first round starts a bridge (``python -m ns3_bridge.server``) as a
    child of this process, which is stopped by :meth:`close` (the strategy's teardown), at exit, and
    by the bridge itself if this process dies. Give ``endpoint`` (``ipc://...`` or ``tcp://host:port``)
    to use a bridge you run yourself. Only rank 0 talks to the bridge.

    Every keyword besides the transport, bridge and speed ones below is a network setting: a field of
    :class:`ns3_bridge.sim.config.NetworkConfig` (an unknown name is refused, naming the known ones):
    ``topology`` (``star`` or
    ``leaf_spine`` with ``hosts_per_leaf``, ``n_spines``, ``fabric_link_rate``, ``fabric_link_delay``,
    ``fabric_queue_packets``, ``placement`` = ``packed``/``spread``/a list of each host's leaf), ``link_rate``
    (``"10Gbps"`` or bits/s), ``link_delay`` (``"10us"`` or seconds), ``loss_rate`` (error model ``rate``;
    ``drop_rate`` is its alias),
    ``queue_packets`` (switch buffer per port), ``queue_disc`` (``none``/``fifo``), ``error_model``
    (``rate``/``burst``/``gilbert_elliott``) and its parameters, ``seed``. ``timeout_s`` bounds every
    request; ``startup_timeout_s`` the bridge's start (which may build ns-3's precompiled header once).

    ``transport="tcp"`` is the reliable baseline: each block crosses the same network as a TCP
    transfer (a fresh connection per worker/server pair and round, so rounds stay independent);
    everything arrives (RPS then equals DDP) and the phase times are what differ. ``tcp_variant``
    (``cubic``, ``newreno``, ``bic``, ``vegas``), ``tcp_sack``, ``tcp_min_rto`` and ``tcp_conn_timeout``
    replace ns-3's defaults (a 1 s minimum RTO and a 3 s SYN timeout would dominate every loss).

    Other tenants (off unless ``background_load`` > 0): TCP flows arriving as a Poisson process at
    ``background_load`` of every host link's capacity, between any two hosts (``background_hosts`` adds
    tenant-only hosts), sized by ``background_flow_sizes`` (``web_search``) times
    ``background_size_scale``, over each round's ``background_window`` (default: the round's ideal
    exchange time). Every round reports their completion times (``background_fct_mean_s``,
    ``background_fct_p99_s``). ``learning_class=True`` marks training packets (DSCP CS1) and gives
    them, at every port, the lowest priority and a buffer of ``learning_queue_packets`` of their own.
    ``transport="none"`` simulates the background alone (blocks are delivered outside the fabric).

    Speed (outcomes are identical either way): ``sim_workers`` simulation processes in the bridge it
    starts (rounds are independent, so K processes simulate K rounds at once; ``"auto"``: the cores this
    process may use minus the training processes on this machine, at least 1); ``run_ahead=k`` queues
    rounds r+1..r+k whenever round r is asked for, so the bridge simulates them while training
    computes (``"auto"``: as many rounds as the pool has processes when training leaves a core spare,
    else 0). The bridge keeps at most 1,024 outcomes and queues at most 256 rounds.

    ``store``: simulated rounds are kept in an SQLite outcome store and replayed by later runs of the same
    network (see :mod:`pl_lossy.network.outcome_store`): ``"auto"`` (``$PL_LOSSY_STORE``, else the user
    cache), a path, or ``None``/``"off"``. A run whose rounds are all stored starts no bridge. Rounds are
    keyed with the identity of the bridge that simulates them (its ns-3 version and engine hash): the
    bridge this network starts runs this installation's engine, whose identity is computed here; a bridge
    at ``endpoint`` is asked for its own (one ping) before the store is read, and one too old to report
    any gets no stored rounds and stores none.

    ``fidelity`` (:mod:`pl_lossy.network.fidelity`, docs/fidelity.md): ``full`` simulates every round;
    ``reuse`` simulates rounds 0 .. ``fidelity_rounds`` - 1 and serves every later round one of them, drawn by
    (seed, round); ``auto`` is ``full`` up to ``fidelity_budget_packets`` packets a round, else ``reuse``. The
    chosen one (and why) is in :meth:`describe`, so in the run's first line and its summary.
    """

    same_on_every_rank = False

    def __init__(
        self,
        transport: str = "udp",
        endpoint: Optional[str] = None,
        timeout_s: float = 120.0,
        startup_timeout_s: float = 300.0,
        sim_workers: Union[int, str] = 1,
        run_ahead: Union[int, str] = 0,
        max_round_packets: Optional[int] = None,
        curve_keys: Optional[str] = None,
        store: Union[str, bool, None] = "auto",
        fidelity: str = "auto",
        fidelity_rounds: int = fidelities.REUSE_ROUNDS,
        fidelity_budget_packets: int = fidelities.FULL_BUDGET_PACKETS,
        **settings: Any,
    ) -> None:
        # the network itself: NetworkConfig's fields, validated (and unknown names refused) there
        self.config = NetworkConfig.from_dict(_canonical_names(settings))
        self.seed = self.config.seed
        if transport not in TRANSPORTS:
            raise ValueError(
                f"transport must be 'udp' (lossy, RPS), 'tcp' (the reliable baseline) or 'none' (no training "
                f"traffic on the fabric: background only), got {transport!r}"
            )
        self.transport = transport
        if not timeout_s > 0 or not startup_timeout_s > 0:
            raise ValueError(f"timeout_s and startup_timeout_s must be > 0, got {timeout_s}, {startup_timeout_s}")
        if sim_workers != "auto" and (isinstance(sim_workers, (bool, str)) or int(sim_workers) != sim_workers or sim_workers < 1):
            raise ValueError(f"sim_workers must be an integer >= 1 or 'auto', got {sim_workers!r}")
        if run_ahead != "auto" and (isinstance(run_ahead, (bool, str)) or int(run_ahead) != run_ahead or run_ahead < 0):
            raise ValueError(f"run_ahead must be an integer >= 0 or 'auto', got {run_ahead!r}")
        if endpoint is not None and sim_workers not in (1, "auto"):
            raise ValueError("sim_workers applies to the bridge Ns3Network starts; start yours with --workers")
        # "auto" is sized when the bridge starts, from the cores training leaves free (known then)
        self.sim_workers: Union[int, str] = sim_workers if sim_workers == "auto" else int(sim_workers)
        self.run_ahead: Union[int, str] = run_ahead if run_ahead == "auto" else int(run_ahead)
        if max_round_packets is not None and (not isinstance(max_round_packets, int) or isinstance(max_round_packets, bool)
                                              or max_round_packets < 1):
            raise ValueError(f"max_round_packets must be a positive integer or None (sized from timeout_s), got {max_round_packets!r}")
        # a round the simulation cannot finish within timeout_s is refused before it starts
        self.max_round_packets = packet_budget(timeout_s) if max_round_packets is None else int(max_round_packets)
        self._ahead_until = -1  # the last round already asked for in advance
        self.endpoint = endpoint
        if curve_keys is not None and endpoint is None:
            raise ValueError("curve_keys is for a bridge you run at `endpoint` (the bridge Ns3Network starts is private and key-free)")
        self.curve_keys = curve_keys
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._client: Optional[BridgeClient] = None
        self._process: Optional[subprocess.Popen] = None
        if not isinstance(store, (str, os.PathLike, bool, type(None))):
            raise ValueError(f"store must be 'auto', 'off' or a path, got {store!r}")
        self.store_path = resolve_path(store)
        fidelities.check_settings(fidelity, fidelity_rounds, fidelity_budget_packets)
        self.fidelity_setting, self.fidelity_rounds, self.fidelity_budget_packets = fidelity, fidelity_rounds, fidelity_budget_packets
        self.fidelity: Optional[Fidelity] = None  # chosen by check_round, once a round's size is known
        self._reused = ReusedRounds()  # reuse's simulated rounds, for runs without a store
        self._store: Optional[OutcomeStore] = None
        self._store_report: Optional[dict[str, Any]] = None
        self._settings: Optional[dict[str, Any]] = None
        self._configured = False  # the bridge holds self.config
        self._simulator: Optional[str] = None  # the simulating bridge's identity (None: it reports none)...
        self._simulator_known = False  # ...once looked up (see _simulator_identity)
        self._warned_no_identity = False

    # ------------------------------------------------------------------ the bridge

    @property
    def bridge_pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def _connect(self) -> BridgeClient:
        """The bridge (see :meth:`_bridge`), configured with this network once."""
        client = self._bridge()
        if not self._configured:
            try:
                client.configure(self.config, timeout_s=self.startup_timeout_s)
            except BridgeError:
                self.close()
                raise
            self._configured = True
        return client

    def _bridge(self) -> BridgeClient:
        """The client of this run's bridge (started first when it is ours), pinged: its identity is known.
        Configuring is left to :meth:`_connect` (the first round to simulate): asking the identity costs one ping."""
        if self._client is not None:
            return self._client
        alive = None
        endpoint = self.endpoint
        self._size_pool()
        if endpoint is None:
            endpoint = private_ipc_endpoint(f"pl-lossy-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            self._process = subprocess.Popen(
                [sys.executable, "-m", "ns3_bridge.server", "--endpoint", endpoint, "--parent-pid", str(os.getpid()),
                 "--workers", str(self.sim_workers), "--max-round-packets", str(self.max_round_packets)],
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the bridge in close()
            )
            atexit.register(self.close)
            process = self._process
            alive = lambda: process.poll() is None  # noqa: E731
        client = BridgeClient(endpoint, self.timeout_s, alive=alive, curve_keys=self.curve_keys)
        try:
            client.ping(timeout_s=self.startup_timeout_s)
        except BridgeError:
            client.close()
            self.close()
            raise
        self._client = client
        if self._simulator_known and client.simulator != self._simulator:
            # our bridge imported other sources than this process (edited since, or another checkout
            # first on its path): its rounds are keyed as its own from now on
            log.warning("the ns-3 bridge reports simulator %r, not %r as computed here; its rounds are stored under its own",
                        client.simulator, self._simulator)
        self._simulator, self._simulator_known = client.simulator, True
        return client

    def _simulator_identity(self) -> Optional[str]:
        """The identity of the bridge that simulates this run's rounds (None: it reports none), known before
        the store is first read: a stored round is served only to a bridge of the identity that simulated it.
        The bridge this network starts runs this installation's engine, so its identity is computed here and
        no bridge is started while every round is stored; a bridge at ``endpoint`` is asked."""
        if not self._simulator_known:
            if self.endpoint is None and self._client is None:
                self._simulator, self._simulator_known = simulator_identity(), True
            else:
                self._bridge()
        return self._simulator

    def _usable_store(self) -> Optional[OutcomeStore]:
        """The store, or None when the simulating bridge reports no identity: its rounds may come from any
        engine, so none is served to it and none it makes is kept (keying them "unknown:<endpoint>" would
        serve them to a later, upgraded bridge at the same endpoint)."""
        store = self.store
        if store is None or self._simulator_identity() is not None:
            return store
        if not self._warned_no_identity:
            self._warned_no_identity = True
            log.warning("the ns-3 bridge at %s reports no simulator identity (it predates the field): its rounds are "
                        "simulated and not stored (upgrade it to use the outcome store)", self.endpoint)
        return None

    def _size_pool(self) -> None:
        """Resolve ``"auto"``: spare cores = this process's usable cores minus the training processes here."""
        if self.sim_workers != "auto" and self.run_ahead != "auto":
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        training = int(os.environ.get("LOCAL_WORLD_SIZE") or 0)
        if not training:
            import torch.distributed as dist

            training = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        spare = cores - training
        if self.sim_workers == "auto":
            self.sim_workers = 1 if self.endpoint is not None else max(1, spare)
        if self.run_ahead == "auto":
            self.run_ahead = self.sim_workers if spare > 0 else 0
        log.info("ns-3: %d simulation process(es), run-ahead %d (%d cores, %d training processes)",
                 self.sim_workers, self.run_ahead, cores, training)

    def check_round(self, spec: RoundSpec) -> None:
        shape = self._shape(spec, spec.round)
        for name, _, _ in self.config.link_failures:
            link_ends(self.config, shape.n_hosts + self.config.background_hosts, name)
        packets = shape.training_packets
        if packets > self.max_round_packets:
            raise ValueError(
                f"a round of {spec.n_workers} workers x {spec.n_servers} servers x {spec.packets_per_block} packets a block is "
                f"{packets:,} packets, over max_round_packets={self.max_round_packets:,} (~{packets / SIM_PACKETS_PER_S:,.0f} s of ns-3 "
                f"at ~{SIM_PACKETS_PER_S:,} packets/s, timeout_s={self.timeout_s:g}): use fewer workers, larger packets "
                "(strategy.packet_bytes), an analytic network, or raise network.max_round_packets and network.timeout_s"
            )
        differ = fidelities.rounds_differ(spec, bool(self.config.link_failures))
        self.fidelity = fidelities.choose(self.fidelity_setting, self.fidelity_rounds, self.fidelity_budget_packets, packets, differ)

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        self.check_round(spec)
        assert self.fidelity is not None
        source = self.fidelity.source_round(self.seed, spec.round)  # the round simulated for this one (itself at full)
        reused = self._reused.get(source, spec.deadline_s)
        if reused is not None:
            return reused
        outcome = self._simulated(spec, source)
        if self.fidelity.mode == "reuse":
            self._reused.keep(source, spec.deadline_s, outcome)
        return outcome

    def _simulated(self, spec: RoundSpec, source: int) -> RoundOutcome:
        """Round ``source`` of ``spec``'s shape, from the store, else from the bridge (and then stored)."""
        store = self._usable_store()
        if store is not None:
            stored = store.get(self._key(spec, source))
            if stored is not None:
                return stored
        client = self._connect()
        if self.run_ahead:
            # queue the rounds that rounds r+1..r+run_ahead need first: the pool simulates them while training computes
            ahead = range(max(spec.round + 1, self._ahead_until + 1), spec.round + 1 + self.run_ahead)
            needed = dict.fromkeys(self.fidelity.source_round(self.seed, r) for r in ahead)  # in order, once each
            missing = [r for r in needed if r != source and (r, spec.deadline_s) not in self._reused
                       and (store is None or not store.contains(self._key(spec, r)))]
            if missing:
                client.prefetch([self._shape(spec, r) for r in missing])
            if len(ahead):
                self._ahead_until = ahead[-1]
        (result,) = client.outcomes([self._shape(spec, source)])
        outcome = RoundOutcome(result.up, result.down, result.up_time_s, result.down_time_s, result.stats)
        store = self._usable_store()  # keyed by the bridge that simulated it (ours may only now have started)
        if store is not None:
            store.put(self._key(spec, source), outcome)
        return outcome

    @property
    def store(self) -> Optional[OutcomeStore]:
        """The outcome store (opened on first use; None when off)."""
        if self._store is None and self.store_path is not None:
            self._store = OutcomeStore(self.store_path)
        return self._store

    def _key(self, spec: RoundSpec, round_index: int) -> str:
        if self._settings is None:
            self._settings = config_settings(self.config)
            del self._settings["link_failures"]  # a round keys on the links cut in it (below): other rounds keep their keys
        shape = dataclasses.asdict(self._shape(spec, round_index))  # its stragglers' offsets are this round's
        del shape["round"]
        for optional in ("deadline_s", "start_offsets_ns", "down_workers"):  # absent when unset: rounds stored before they existed still match
            if shape[optional] is None:
                del shape[optional]
        links_down = self.config.links_down(round_index)
        if links_down:
            shape["links_down"] = list(links_down)
        simulator = self._simulator_identity()
        if simulator is None:
            raise RuntimeError("no store key for the rounds of a bridge that reports no simulator identity")
        return round_key(self._settings, shape, round_index, simulator)

    def store_key(self, spec: RoundSpec) -> Optional[str]:
        """Round ``spec``'s key in an outcome store (what a trace records, so that ``pl-lossy store import`` can
        put the trace's rounds where this network's runs look them up); None for a bridge that reports no
        simulator identity (its rounds never enter a store)."""
        if self._simulator_identity() is None:
            return None
        # a round reuse serves is exactly its source round's outcome: keyed as that round, never as itself
        source = self.fidelity.source_round(self.seed, spec.round) if self.fidelity is not None else spec.round
        return self._key(spec, source)

    def store_summary(self) -> Optional[dict[str, Any]]:
        """This run's hits, misses and the store's size (None when there is no store or it was never used)."""
        return self._store.summary() if self._store is not None else self._store_report

    def _shape(self, spec: RoundSpec, round_index: int) -> RoundShape:
        this_round = dataclasses.replace(spec, round=round_index)
        offsets = this_round.start_offsets_s(self.config.seed)
        return RoundShape(
            round_index, spec.n_workers, spec.n_servers, spec.packets_per_block, spec.packet_bytes,
            spec.colocated_servers, self.transport, spec.deadline_s,
            None if offsets is None else tuple(int(round(x * 1e9)) for x in offsets),
            this_round.down_workers or None,
        )

    def prefetch(self, specs: Iterable[RoundSpec]) -> None:
        """Run-ahead is driven by :meth:`outcome` (``run_ahead`` rounds past each request)."""

    def close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            log.info(store.describe())
            self._store_report = store.summary()
            store.close()
        client, process = self._client, self._process
        self._client = self._process = None
        # another connection may reach another bridge (restarted, upgraded): configure and ask it again
        self._configured = self._simulator_known = False
        self._ahead_until = -1  # a later fit starts at round 0 again: run ahead from there
        self._reused.clear()
        if client is not None and process is not None and process.poll() is None:
            try:  # only a bridge we started is ours to shut down
                client.shutdown(timeout_s=5.0)
            except BridgeError:
                pass
        if client is not None:
            client.close()
        if process is not None:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def describe(self) -> str:
        c = self.config
        where = self.endpoint or "a bridge of its own"
        fabric = c.topology
        if c.topology == "leaf_spine":
            fabric = f"leaf_spine[{c.hosts_per_leaf} hosts/leaf, {c.n_spines} spines, {c.oversubscription:g}:1, {c.placement if isinstance(c.placement, str) else 'explicit'}]"
        loss = f"{c.error_model} loss {c.mean_loss_rate:g}"
        tenants = f", background load {c.background_load:g}" if c.background_load else ""
        if c.background_flows_per_s:
            tenants = f", background {c.background_flows_per_s:g} flows/s"
        if c.background_flow_bytes is not None and c.has_background:
            tenants += f" of {c.background_flow_bytes:,} B"
        if c.source_drop_rate:
            tenants += f", senders drop {c.source_drop_rate:g} of learning packets"
        tenants += ", learning class" if c.learning_class else ""
        return (
            f"ns-3 {self.transport.upper()} over {fabric}({c.link_rate / 1e9:g} Gb/s, {c.link_delay * 1e6:g} us, {loss}, "
            f"queue {c.queue_packets} pkts{tenants}, seed {c.seed}) via {where}, fidelity "
            f"{self.fidelity.describe() if self.fidelity is not None else self.fidelity_setting}"
        )
