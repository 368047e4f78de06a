"""RoundSimulator: one process's ns-3, simulating RPS rounds on a fixed topology.

A round is two phases back to back (uplink: workers -> servers; the downlink starts when every
uplink packet or transfer is resolved), plus the round's background flows (other tenants), all in
one run of the simulator that lasts until every event drains, so every round starts from empty
queues. Before each round the RNG run is set from the round index and every error model gets fresh
streams, and the background flows are drawn from (seed, round), so a round's outcome depends only
on (settings, seed, round), whichever rounds this process simulated before. Links the settings'
``link_failures`` cut in a round destroy every packet that reaches them (or, with
``link_failure_reroute``, leave the routes); workers a round names down send and receive nothing.
"""

from __future__ import annotations

import numpy as np

from .background import background_flows
from .config import LEARNING_TOS, TCP_VARIANTS, NetworkConfig
from .round import RoundShape, SimulatedRound, fail_outcome
from .loader import load_ns
from .topology import build_topology, link_ends

PORT = 9000  # training traffic (UDP datagrams or TCP transfers)
BACKGROUND_PORT = 9100  # background flows' listeners
BACKGROUND_SEGMENT_BYTES = 1448  # a 1,500-byte Ethernet MTU's TCP payload: what tenants send


def median_arrival_s(arrivals_ns: np.ndarray) -> float:
    """Seconds from the phase's start to the median arrival among the packets that arrived (0: none did)."""
    arrived = arrivals_ns[arrivals_ns >= 0]
    return float(np.median(arrived)) / 1e9 if arrived.size else 0.0


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
        """Build the fabric for n_hosts training hosts (plus the tenant-only hosts) once per size."""
        if self._n_hosts == n_hosts:
            return
        ns, cfg = self.ns, self.config
        self.close()
        self._tcp_defaults()
        self.topology = build_topology(ns, cfg, n_hosts + cfg.background_hosts)
        tos = LEARNING_TOS if cfg.learning_class else 0
        gbl = ns.cppyy.gbl.pl_lossy
        self.engine = gbl.RoundEngine(PORT, tos)
        self.tcp = gbl.TcpRoundEngine(PORT, tos)
        self.background = gbl.BackgroundTraffic(BACKGROUND_PORT, BACKGROUND_SEGMENT_BYTES)
        all_hosts = range(n_hosts + cfg.background_hosts)
        for h in all_hosts:
            node, address = self.topology.hosts.Get(h), self.topology.host_addresses[h]
            self.background.AddHost(node, address)
            if h < n_hosts:
                self.engine.AddHost(node, address)
                self.tcp.AddHost(node, address)
        self.error_models = [self._error_model() for _ in all_hosts]
        for dev, em in zip(self.topology.host_devices, self.error_models):
            dev.SetAttribute("ReceiveErrorModel", ns.PointerValue(em))
            self.engine.WatchLinkErrors(dev)
        for dev in self.topology.switch_devices + self.topology.host_devices:
            self.engine.WatchDeviceQueue(dev)
        for node in self.topology.switches + [self.topology.hosts.Get(h) for h in all_hosts]:
            self.engine.WatchTrafficControl(node)
        for disc in self.topology.queue_discs:
            self.engine.WatchQueueDisc(disc)
        # made with the topology, in the config's order, so every process creates the same objects (ns-3's
        # automatic random streams are numbered in creation order)
        self.cuts = {}
        self._rerouted: set = set()  # fabric links whose interfaces are down (link_failure_reroute)
        for name, _, _ in cfg.link_failures:
            try:
                self.cuts[name] = self._cut_ends(name, n_hosts + cfg.background_hosts)
            except ValueError:  # not on a fabric this small (the warm-up's): a round that cuts it fails in _cut_links
                pass
        self._n_hosts = n_hosts

    def _cut_ends(self, name: str, n_hosts: int) -> list:
        """A link's two receiving ends as (device, its usual error model or None, a model that destroys everything)."""
        ns, topology = self.ns, self.topology
        kind, a, b = link_ends(self.config, n_hosts, name)
        if kind == "host":
            ends = [(topology.host_devices[a], self.error_models[a]), (topology.switch_devices[a], None)]
        else:
            leaf_dev, spine_dev = topology.fabric_links[a, b]
            ends = [(leaf_dev, None), (spine_dev, None)]
        out = []
        for dev, usual in ends:
            cut = ns.CreateObject[ns.RateErrorModel]()
            cut.SetAttribute("ErrorRate", ns.DoubleValue(1.0))
            cut.SetAttribute("ErrorUnit", ns.StringValue("ERROR_UNIT_PACKET"))
            if usual is None:  # a switch port: no error model of its own; the cut one stays, enabled only when cut
                cut.Disable()
                dev.SetAttribute("ReceiveErrorModel", ns.PointerValue(cut))
                self.engine.WatchLinkErrors(dev)  # its drops must resolve learning packets too
            out.append((dev, usual, cut))
        return out

    def _cut_links(self, round_index: int) -> None:
        """The links ``link_failures`` cuts this round destroy every packet that reaches them; the others are as configured."""
        down = set(self.config.links_down(round_index))
        missing = sorted(down - set(self.cuts))
        if missing:
            raise ValueError(f"round {round_index} cuts links {missing}, which this fabric of {self._n_hosts} training hosts does not have")
        if self.config.link_failure_reroute:
            self._reroute({name for name in down if name.startswith("leaf:")})
        for name, ends in self.cuts.items():
            for dev, usual, cut in ends:
                if usual is None and name in down:
                    cut.Enable()
                elif usual is None:
                    cut.Disable()
                else:  # a host's interface: the cut model in place of its own error model
                    dev.SetAttribute("ReceiveErrorModel", self.ns.PointerValue(cut if name in down else usual))

    def _reroute(self, fabric_links: set) -> None:
        """Take ``fabric_links``' interfaces down (and every other cut link's up) and recompute the global routes when
        that changes anything: the routes are a function of which links are down, whatever rounds came before."""
        if fabric_links == self._rerouted:
            return
        ns = self.ns
        for name, ends in self.cuts.items():
            if name.startswith("leaf:") and (name in fabric_links) != (name in self._rerouted):
                for dev, _, _ in ends:
                    ipv4 = dev.GetNode().GetObject[ns.Ipv4]()
                    interface = ipv4.GetInterfaceForDevice(dev)
                    if name in fabric_links:
                        ipv4.SetDown(interface)
                    else:
                        ipv4.SetUp(interface)
        ns.Ipv4GlobalRoutingHelper.RecomputeRoutingTables()
        self._rerouted = set(fabric_links)

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
        ns.Config.SetDefault("ns3::TcpL4Protocol::SocketType", ns.TypeIdValue(ns.TypeId.LookupByName(TCP_VARIANTS[cfg.tcp_variant])))
        ns.Config.SetDefault("ns3::TcpSocketBase::Sack", ns.BooleanValue(cfg.tcp_sack))
        ns.Config.SetDefault("ns3::TcpSocketBase::MinRto", ns.TimeValue(ns.NanoSeconds(int(cfg.tcp_min_rto * 1e9))))
        ns.Config.SetDefault("ns3::TcpSocket::ConnTimeout", ns.TimeValue(ns.NanoSeconds(int(cfg.tcp_conn_timeout * 1e9))))
        ns.Config.SetDefault("ns3::TcpSocket::DelAckCount", ns.UintegerValue(1))  # no 200 ms delayed-ACK stalls
        # timestamps carry absolute time in ms: RTT samples would depend on where a round falls on the clock
        ns.Config.SetDefault("ns3::TcpSocketBase::Timestamp", ns.BooleanValue(False))
        # closed connections must leave TIME_WAIT before the round's events drain (ports are reused)
        ns.Config.SetDefault("ns3::TcpSocketBase::MaxSegLifetime", ns.DoubleValue(1e-3))

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
        for counters in (self.engine, self.tcp, self.background):
            counters.ResetCounters()
        # ECMP's per-packet choices (leaf_spine) and any other internet-stack draws: round-keyed too
        self._stack_streams()

    def simulate(self, shape: RoundShape) -> SimulatedRound:
        self._ensure_topology(shape.n_hosts)
        self._cut_links(shape.round)
        self._start_round(shape.round)
        training = self._start_training(shape)
        fct = self._start_background(shape)
        self.ns.Simulator.Run()
        up, down, up_time, down_time, stats = training()
        stats.update(drops_link_error=float(self.engine.linkDrops), drops_queue=float(self.engine.queueDrops))
        if self.config.has_background:
            stats.update(self._background_stats(fct))
        return SimulatedRound(up, down, up_time, down_time, stats)

    def _start_training(self, shape: RoundShape):
        """Schedule the round's training traffic; returns what reads its outcome once the run is over."""
        pairs = shape.remote_pairs()
        i, j = np.asarray(pairs, dtype=np.int64).reshape(-1, 2).T
        workers = i.astype(np.int32)
        servers = np.asarray([shape.server_host(s) for s in j], dtype=np.int32)
        W, S, P, n = shape.n_workers, shape.n_servers, shape.packets_per_block, len(pairs)
        up, down = np.ones((W, S, P), dtype=bool), np.ones((S, W, P), dtype=bool)
        fail_outcome(up, down, shape.down_workers or (), shape.colocated_servers)  # their flows are not sent (remote_pairs)

        def times(engine) -> tuple[float, float]:
            if not engine.finished:
                raise RuntimeError(f"round {shape.round}: the simulation drained before the training traffic "
                                   "was resolved (a packet dropped where no trace watches)")
            return float(engine.upSeconds), float(engine.downSeconds)

        start_ns = np.zeros(shape.n_hosts, dtype=np.int64)  # when each worker's uplink starts (stragglers)
        if shape.start_offsets_ns is not None:
            start_ns[: shape.n_workers] = shape.start_offsets_ns
        if shape.transport == "udp":
            up_arrivals, down_arrivals = np.empty((n, P), dtype=np.int64), np.empty((n, P), dtype=np.int64)
            self.engine.Start(shape.round, workers, servers, n, servers, workers, n,
                              P, shape.packet_bytes, self.config.link_rate, up_arrivals, down_arrivals,
                              self.config.source_drop_rate, self.config.seed,
                              0 if shape.deadline_s is None else round(shape.deadline_s * 1e9), start_ns)

            def read_udp():
                up[i, j] = up_arrivals >= 0
                down[j, i] = down_arrivals >= 0
                stats = {"packets_sent": float(self.engine.sent), "packets_received": float(self.engine.received),
                         "drops_source": float(self.engine.sourceDrops), "packets_late": float(self.engine.late)}
                if shape.deadline_s is not None:  # what an adaptive deadline reads: when the median arrival came
                    stats.update(up_t50_s=median_arrival_s(up_arrivals), down_t50_s=median_arrival_s(down_arrivals))
                return (up, down, *times(self.engine), stats)

            return read_udp
        if shape.transport == "tcp":
            up_done, down_done = np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64)
            self.tcp.Start(workers, servers, n, servers, workers, n, P * shape.packet_bytes, shape.packet_bytes,
                           up_done, down_done, start_ns)

            def read_tcp():
                # reliable: every byte arrives unless a connection gave up (then that block counts as lost)
                up[i, j] = (up_done >= 0)[:, None]
                down[j, i] = (down_done >= 0)[:, None]
                stats = {"bytes_received": float(self.tcp.bytesReceived), "failed_connections": float(self.tcp.failedConnections)}
                return (up, down, *times(self.tcp), stats)

            return read_tcp
        # "none": only the background crosses the fabric; the blocks are delivered outside it, at once
        return lambda: (up, down, 0.0, 0.0, {})

    def _start_background(self, shape: RoundShape) -> np.ndarray:
        """Schedule the round's background flows; returns the array their completion times land in."""
        flows = background_flows(self.config, shape, shape.n_hosts + self.config.background_hosts)
        fct = np.empty(len(flows), dtype=np.float64)
        if len(flows):
            self.background.Start(flows.start_ns, flows.src, flows.dst, flows.size_bytes, len(flows), fct)
        return fct

    def _background_stats(self, fct: np.ndarray) -> dict[str, float]:
        """Flow completion times of the round's background flows: count, mean, 99th percentile."""
        done = fct[fct >= 0]
        stats = {"background_flows": float(len(fct)), "background_unfinished": float(len(fct) - len(done))}
        if len(done):
            stats.update(background_fct_mean_s=float(done.mean()), background_fct_p99_s=float(np.percentile(done, 99)))
        return stats
