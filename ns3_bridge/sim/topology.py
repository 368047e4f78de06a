"""Topologies, each read top-down as a series of ns-3 helpers: ``star`` and ``leaf_spine``.

Every link is point-to-point with its own /24 (simulated addresses only). ns-3's Ipv4AddressHelper
installs an FqCoDel of 10,240 packets on every interface, which would hide the buffer sizes set here:
it is removed (``queue_disc="none"``) or replaced on every port by a FIFO (``"fifo"``) or by the
learning class's two bands (``learning_class``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import LEARNING_TOS, LINK_NAMES, NetworkConfig


@dataclass
class Topology:
    hosts: Any  # NodeContainer, host h = node h
    switches: list  # switch nodes (the star's one switch; leaves then spines)
    host_devices: list  # each host's own interface (it receives through the error model there)
    switch_devices: list  # every switch port (their egress queues are where congestion drops)
    host_addresses: list
    queue_discs: list = field(default_factory=list)  # every port's disc (queue_disc="fifo" or learning_class)
    leaf_of_host: list = field(default_factory=list)  # leaf_spine: which leaf each host hangs from
    spine_ports: list = field(default_factory=list)  # leaf_spine: per spine, its ports towards the leaves
    fabric_links: dict = field(default_factory=dict)  # leaf_spine: (leaf, spine) -> (leaf's device, spine's device)


class _Links:
    """Point-to-point links of one kind (rate, delay, device buffer), each on its own /24."""

    def __init__(self, ns: Any, rate_bps: float, delay_s: float, queue_packets: int) -> None:
        self.ns = ns
        self.helper = ns.PointToPointHelper()
        self.helper.SetDeviceAttribute("DataRate", ns.DataRateValue(ns.DataRate(int(round(rate_bps)))))
        self.helper.SetDeviceAttribute("Mtu", ns.UintegerValue(9216))  # jumbo frames: up to 9,000 B never fragment
        self.helper.SetChannelAttribute("Delay", ns.TimeValue(ns.NanoSeconds(int(round(delay_s * 1e9)))))
        self.helper.SetQueue("ns3::DropTailQueue<Packet>", "MaxSize", ns.QueueSizeValue(ns.QueueSize(f"{queue_packets}p")))


class _Builder:
    def __init__(self, ns: Any, cfg: NetworkConfig) -> None:
        self.ns, self.cfg = ns, cfg
        self.addresses = ns.Ipv4AddressHelper()
        self.all_devices = ns.NetDeviceContainer()
        self.ports: list[tuple[Any, int]] = []  # (device, its buffer in packets): where queue discs go
        self.n_links = 0

    @property
    def with_discs(self) -> bool:
        return self.cfg.queue_disc == "fifo" or self.cfg.learning_class

    def device_queue(self, packets: int) -> int:
        return 1 if self.with_discs else packets  # with a queue disc the disc holds the buffer

    def connect(self, links: _Links, a: Any, b: Any, buffer_packets: int) -> tuple[Any, Any, Any]:
        """Link node a to node b; returns (a's device, b's device, a's address)."""
        ns = self.ns
        pair = links.helper.Install(a, b)
        subnet = f"10.{self.n_links // 256}.{self.n_links % 256}.0"
        self.n_links += 1
        self.addresses.SetBase(ns.Ipv4Address(subnet), ns.Ipv4Mask("255.255.255.0"))
        interfaces = self.addresses.Assign(pair)
        self.all_devices.Add(pair)
        self.ports += [(pair.Get(0), buffer_packets), (pair.Get(1), buffer_packets)]
        return pair.Get(0), pair.Get(1), interfaces.GetAddress(0)

    def finish(self) -> list:
        """Replace ns-3's hidden FqCoDel, compute routes; returns the queue discs installed on the ports.

        ``queue_disc="fifo"``: a FIFO of the port's buffer on every port (host NICs included).
        ``learning_class``: the two-band queue of learning_class.hpp instead (learning traffic last,
        with a buffer of its own), also on every port, so hosts' NICs give way to other tenants too.
        """
        ns, cfg = self.ns, self.cfg
        ns.TrafficControlHelper().Uninstall(self.all_devices)
        discs = []
        buffers = sorted({b for _, b in self.ports}) if self.with_discs else []
        for buffer in buffers:  # one helper per buffer size (host links and fabric links may differ)
            ports = ns.NetDeviceContainer()
            for dev, b in self.ports:
                if b == buffer:
                    ports.Add(dev)
            if cfg.learning_class:
                learning = buffer if cfg.learning_queue_packets is None else cfg.learning_queue_packets
                installed = ns.cppyy.gbl.pl_lossy.InstallLearningClass(ports, buffer, learning, LEARNING_TOS)
            else:
                helper = ns.TrafficControlHelper()
                helper.SetRootQueueDisc("ns3::FifoQueueDisc", "MaxSize", ns.QueueSizeValue(ns.QueueSize(f"{buffer}p")))
                installed = helper.Install(ports)
            discs += [installed.Get(i) for i in range(installed.GetN())]
        ns.Ipv4GlobalRoutingHelper.PopulateRoutingTables()
        return discs


def build_star(ns: Any, cfg: NetworkConfig, n_hosts: int) -> Topology:
    """Every host on its own link to one switch."""
    hosts = ns.NodeContainer()
    hosts.Create(n_hosts)
    switch = ns.NodeContainer()
    switch.Create(1)
    stack = ns.InternetStackHelper()
    stack.Install(hosts)
    stack.Install(switch)

    build = _Builder(ns, cfg)
    host_links = _Links(ns, cfg.link_rate, cfg.link_delay, build.device_queue(cfg.queue_packets))
    host_devices, switch_devices, host_addresses = [], [], []
    for h in range(n_hosts):
        host_dev, switch_dev, address = build.connect(host_links, hosts.Get(h), switch.Get(0), cfg.queue_packets)
        host_devices.append(host_dev)
        switch_devices.append(switch_dev)
        host_addresses.append(address)
    discs = build.finish()
    return Topology(hosts, [switch.Get(0)], host_devices, switch_devices, host_addresses, discs)


def place_hosts(cfg: NetworkConfig, n_hosts: int) -> list[int]:
    """Leaf of each host (training workers, then dedicated servers, then tenant-only hosts).

    ``packed`` fills leaf 0, then 1, ...; ``spread`` deals hosts round-robin over the
    ``ceil(n_hosts / hosts_per_leaf)`` leaves; a list gives each host's leaf (leaves are numbered
    from 0 and a leaf with no host in the list still exists).
    """
    if not isinstance(cfg.placement, str):
        if len(cfg.placement) < n_hosts:
            raise ValueError(f"placement lists {len(cfg.placement)} hosts' leaves, but this fabric has {n_hosts} hosts "
                             "(workers, then dedicated servers, then background_hosts): list one leaf per host")
        return list(cfg.placement[:n_hosts])
    n_leaves = math.ceil(n_hosts / cfg.hosts_per_leaf)
    if cfg.placement == "packed":
        return [h // cfg.hosts_per_leaf for h in range(n_hosts)]
    return [h % n_leaves for h in range(n_hosts)]


def build_leaf_spine(ns: Any, cfg: NetworkConfig, n_hosts: int) -> Topology:
    """Racks of ``hosts_per_leaf`` hosts under leaf switches; every leaf linked to every spine.

    Routing is ns-3's global routing with ECMP: each packet picks one of the equal-cost spines at
    random (per-packet spraying; ns-3 3.44 has no per-flow hashing). Its random draws are re-seeded
    every round with the other streams, so rounds stay independent.
    """
    ns.Config.SetDefault("ns3::Ipv4GlobalRouting::RandomEcmpRouting", ns.BooleanValue(True))
    leaf_of_host = place_hosts(cfg, n_hosts)
    n_leaves = max(leaf_of_host) + 1
    hosts, leaves, spines = ns.NodeContainer(), ns.NodeContainer(), ns.NodeContainer()
    hosts.Create(n_hosts)
    leaves.Create(n_leaves)
    spines.Create(cfg.n_spines)
    stack = ns.InternetStackHelper()
    for group in (hosts, leaves, spines):
        stack.Install(group)

    build = _Builder(ns, cfg)
    host_links = _Links(ns, cfg.link_rate, cfg.link_delay, build.device_queue(cfg.queue_packets))
    fabric_links = _Links(ns, cfg.fabric_link_rate, cfg.fabric_link_delay, build.device_queue(cfg.fabric_queue_packets))
    host_devices, switch_devices, host_addresses = [], [], []
    for h in range(n_hosts):
        host_dev, leaf_dev, address = build.connect(host_links, hosts.Get(h), leaves.Get(leaf_of_host[h]), cfg.queue_packets)
        host_devices.append(host_dev)
        switch_devices.append(leaf_dev)
        host_addresses.append(address)
    spine_ports = [[] for _ in range(cfg.n_spines)]
    links = {}
    for leaf in range(n_leaves):
        for spine in range(cfg.n_spines):
            leaf_dev, spine_dev, _ = build.connect(fabric_links, leaves.Get(leaf), spines.Get(spine), cfg.fabric_queue_packets)
            switch_devices += [leaf_dev, spine_dev]
            spine_ports[spine].append(spine_dev)
            links[leaf, spine] = (leaf_dev, spine_dev)
    discs = build.finish()
    switches = [leaves.Get(i) for i in range(n_leaves)] + [spines.Get(i) for i in range(cfg.n_spines)]
    return Topology(hosts, switches, host_devices, switch_devices, host_addresses, discs, leaf_of_host, spine_ports, links)


def link_ends(cfg: NetworkConfig, n_hosts: int, name: str) -> tuple[str, int, int]:
    """A link's name (``NetworkConfig.link_failures``) checked against the fabric of ``n_hosts`` hosts (tenant-only
    hosts included): ``("host", h, 0)`` or ``("leaf", leaf, spine)``; ValueError in one line if there is no such link."""
    match = LINK_NAMES[cfg.topology].fullmatch(name)
    if match is None:
        raise ValueError(f"link_failures: no link {name!r} on topology={cfg.topology!r}")
    if name.startswith("host:"):
        host = int(match.group(1))
        if host >= n_hosts:
            raise ValueError(f"link_failures: no link {name!r}: this fabric has hosts 0..{n_hosts - 1} "
                             "(training workers, then dedicated servers, then background_hosts)")
        return "host", host, 0
    leaf, spine = int(match.group(2)), int(match.group(3))
    n_leaves = max(place_hosts(cfg, n_hosts)) + 1
    if leaf >= n_leaves or spine >= cfg.n_spines:
        raise ValueError(f"link_failures: no link {name!r}: this fabric has leaves 0..{n_leaves - 1} and spines 0..{cfg.n_spines - 1}")
    return "leaf", leaf, spine


def build_topology(ns: Any, cfg: NetworkConfig, n_hosts: int) -> Topology:
    return {"star": build_star, "leaf_spine": build_leaf_spine}[cfg.topology](ns, cfg, n_hosts)
