"""RoundSimulator: one process's ns-3, simulating RPS rounds on a fixed topology.

A round is two phases run back to back (uplink: workers -> servers, then downlink), each until its
events drain, so every round starts from empty queues. Before each round the RNG run is set from the
round index and every error model gets fresh streams, so a round's outcome depends only on
(settings, seed, round), whichever rounds this process simulated before.
"""

from __future__ import annotations

import numpy as np

from .config import NetworkConfig
from .round import RoundShape, SimulatedRound
from .loader import load_ns
from .topology import build_topology

PORT = 9000
PHASE_UP, PHASE_DOWN = 1, 2


class RoundSimulator:
    def __init__(self, config: NetworkConfig) -> None:
        self.config = config
        self.ns = load_ns()
        self._n_hosts: int | None = None

    def warm_up(self) -> None:
        """Simulate a one-packet round so that cppyy compiles the engine's code paths now, not in round 0.

        Harmless to determinism: every round resets its RNG streams and starts from drained queues.
        """
        self.simulate(RoundShape(0, 2, 2, 1, 64))

    def close(self) -> None:
        """Destroy this process's simulation (topology, events) so that a new one starts clean."""
        if self._n_hosts is not None:
            self.ns.Simulator.Destroy()
            self._n_hosts = None

    def _ensure_topology(self, n_hosts: int) -> None:
        if self._n_hosts == n_hosts:
            return
        ns = self.ns
        self.close()
        self._tcp_defaults()
        self.topology = build_topology(ns, self.config, n_hosts)
        self.tcp = None  # built on the first tcp round
        self.engine = ns.cppyy.gbl.pl_lossy.RoundEngine(PORT)
        for h in range(n_hosts):
            self.engine.AddHost(self.topology.hosts.Get(h), self.topology.host_addresses[h])
        self.error_models = [self._error_model() for _ in range(n_hosts)]
        for dev, em in zip(self.topology.host_devices, self.error_models):
            dev.SetAttribute("ReceiveErrorModel", ns.PointerValue(em))
            self.engine.WatchLinkErrors(dev)
        for dev in self.topology.switch_devices + self.topology.host_devices:
            self.engine.WatchDeviceQueue(dev)
        for node in self.topology.switches + [self.topology.hosts.Get(h) for h in range(n_hosts)]:
            self.engine.WatchTrafficControl(node)
        for disc in self.topology.queue_discs:
            self.engine.WatchQueueDisc(disc)
        self._n_hosts = n_hosts

    def _error_model(self):
        ns, cfg = self.ns, self.config
        if cfg.error_model == "rate":
            em = ns.CreateObject[ns.RateErrorModel]()
            em.SetAttribute("ErrorRate", ns.DoubleValue(cfg.loss_rate))
            em.SetAttribute("ErrorUnit", ns.StringValue("ERROR_UNIT_PACKET"))
        elif cfg.error_model == "burst":
            em = ns.CreateObject[ns.BurstErrorModel]()
            em.SetBurstRate(cfg.burst_rate)
            start, size = ns.CreateObject[ns.UniformRandomVariable](), ns.CreateObject[ns.UniformRandomVariable]()
            size.SetAttribute("Min", ns.DoubleValue(1))
            size.SetAttribute("Max", ns.DoubleValue(2 * cfg.burst_packets - 1))
            em.SetRandomVariable(start)
            em.SetRandomBurstSize(size)
            # BurstErrorModel.AssignStreams gives both variables the same stream (identical draws):
            # keep our own handles and give them streams of their own each round
            em.streams = (start, size)
        else:
            em = ns.CreateObject[ns.cppyy.gbl.pl_lossy.GilbertElliottErrorModel]()
            em.SetParameters(cfg.ge_p_good_to_bad, cfg.ge_p_bad_to_good, cfg.ge_loss_good, cfg.ge_loss_bad)
        return em

    def _stack_streams(self) -> None:
        ns = self.ns
        nodes = ns.NodeContainer()
        nodes.Add(self.topology.hosts)
        for switch in self.topology.switches:
            nodes.Add(switch)
        ns.InternetStackHelper().AssignStreams(nodes, 1 << 20)

    def _tcp_defaults(self) -> None:
        """TCP settings that ns-3 reads when it creates TCP objects: set before the stack is installed."""
        ns, cfg = self.ns, self.config
        from .config import TCP_VARIANTS

        ns.Config.SetDefault("ns3::TcpL4Protocol::SocketType", ns.TypeIdValue(ns.TypeId.LookupByName(TCP_VARIANTS[cfg.tcp_variant])))
        ns.Config.SetDefault("ns3::TcpSocketBase::Sack", ns.BooleanValue(cfg.tcp_sack))
        ns.Config.SetDefault("ns3::TcpSocketBase::MinRto", ns.TimeValue(ns.NanoSeconds(int(cfg.tcp_min_rto_s * 1e9))))
        ns.Config.SetDefault("ns3::TcpSocket::ConnTimeout", ns.TimeValue(ns.NanoSeconds(int(cfg.tcp_conn_timeout_s * 1e9))))
        ns.Config.SetDefault("ns3::TcpSocket::DelAckCount", ns.UintegerValue(1))  # no 200 ms delayed-ACK stalls
        # timestamps carry absolute time in ms: RTT samples would depend on where a round falls on the clock
        ns.Config.SetDefault("ns3::TcpSocketBase::Timestamp", ns.BooleanValue(False))
        # closed connections must leave TIME_WAIT before the round's events drain (ports are reused)
        ns.Config.SetDefault("ns3::TcpSocketBase::MaxSegLifetime", ns.DoubleValue(1e-3))

    def _tcp_phase(self, shape: RoundShape, src: list[int], dst: list[int]) -> tuple[np.ndarray, float]:
        ns = self.ns
        if self.tcp is None:
            self.tcp = ns.cppyy.gbl.pl_lossy.TcpRoundEngine(PORT)
            for h in range(self._n_hosts):
                self.tcp.AddHost(self.topology.hosts.Get(h), self.topology.host_addresses[h])
        ns.Config.SetDefault("ns3::TcpSocket::SegmentSize", ns.UintegerValue(shape.packet_bytes))
        completion = np.empty(len(src), dtype=np.float64)
        if not src:
            return completion, 0.0
        elapsed = self.tcp.RunPhase(
            np.asarray(src, dtype=np.int32), np.asarray(dst, dtype=np.int32), len(src),
            shape.packets_per_block * shape.packet_bytes, completion,
        )
        return completion, float(elapsed)

    def _start_round(self, round_index: int) -> None:
        ns = self.ns
        ns.RngSeedManager.SetSeed(self.config.seed + 1)  # ns-3 seeds must be > 0
        ns.RngSeedManager.SetRun(round_index)
        for h, em in enumerate(self.error_models):
            # fresh streams under this round's run
            for k, variable in enumerate(getattr(em, "streams", ())):
                variable.SetStream(16 * h + k)
            if not hasattr(em, "streams"):
                em.AssignStreams(16 * h)
            em.Reset()
        self.engine.ResetCounters()
        # ECMP's per-packet choices (leaf_spine) and any other internet-stack draws: round-keyed too
        self._stack_streams()
        if self.tcp is not None:
            self.tcp.ResetCounters()

    def _phase(self, shape: RoundShape, phase: int, src: list[int], dst: list[int]) -> tuple[np.ndarray, float]:
        arrivals = np.empty((len(src), shape.packets_per_block), dtype=np.int64)
        if not src:
            return arrivals, 0.0
        elapsed = self.engine.RunPhase(
            shape.round,
            phase,
            np.asarray(src, dtype=np.int32),
            np.asarray(dst, dtype=np.int32),
            len(src),
            shape.packets_per_block,
            shape.packet_bytes,
            self.config.link_rate_bps,
            arrivals,
        )
        return arrivals, float(elapsed)

    def simulate(self, shape: RoundShape) -> SimulatedRound:
        self._ensure_topology(shape.n_hosts)
        self._start_round(shape.round)
        pairs = shape.remote_pairs()
        workers = [i for i, _ in pairs]
        servers = [shape.server_host(j) for _, j in pairs]
        W, S, P = shape.n_workers, shape.n_servers, shape.packets_per_block
        up = np.ones((W, S, P), dtype=bool)
        down = np.ones((S, W, P), dtype=bool)
        i, j = np.asarray(pairs, dtype=np.int64).reshape(-1, 2).T
        e = self.engine
        if shape.transport == "tcp":
            # reliable: every byte arrives unless a connection gave up (then that block counts as lost)
            up_done, up_time = self._tcp_phase(shape, workers, servers)
            down_done, down_time = self._tcp_phase(shape, servers, workers)
            up[i, j] = (up_done >= 0)[:, None]
            down[j, i] = (down_done >= 0)[:, None]
            stats = {"bytes_received": float(self.tcp.bytesReceived), "failed_connections": float(self.tcp.failedConnections)}
        else:
            up_arrivals, up_time = self._phase(shape, PHASE_UP, workers, servers)
            down_arrivals, down_time = self._phase(shape, PHASE_DOWN, servers, workers)
            up[i, j] = up_arrivals >= 0
            down[j, i] = down_arrivals >= 0
            stats = {"packets_sent": float(e.sent), "packets_received": float(e.received)}
        stats.update(drops_link_error=float(e.linkDrops), drops_queue=float(e.queueDrops))
        return SimulatedRound(up, down, up_time, down_time, stats)
