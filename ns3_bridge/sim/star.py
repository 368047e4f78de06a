"""The star topology: every host on its own point-to-point link to one switch, read top-down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import NetworkConfig


@dataclass
class Star:
    hosts: Any  # NodeContainer
    switch: Any  # NodeContainer
    host_devices: list  # each host's own interface (receives through the error model)
    switch_devices: list  # the switch's port towards each host (its egress queue is where incast drops)
    host_addresses: list
    queue_discs: list  # switch ports' queue disciplines (queue_disc="fifo"), else empty


def _address_base(host: int) -> str:
    return f"10.{1 + host // 256}.{host % 256}.0"  # one /24 per link (simulated addresses only)


def build_star(ns: Any, cfg: NetworkConfig, n_hosts: int) -> Star:
    hosts = ns.NodeContainer()
    hosts.Create(n_hosts)
    switch = ns.NodeContainer()
    switch.Create(1)

    link = ns.PointToPointHelper()
    link.SetDeviceAttribute("DataRate", ns.DataRateValue(ns.DataRate(int(round(cfg.link_rate_bps)))))
    link.SetDeviceAttribute("Mtu", ns.UintegerValue(9216))  # jumbo frames: packets up to 9,000 B never fragment
    link.SetChannelAttribute("Delay", ns.TimeValue(ns.NanoSeconds(int(round(cfg.link_delay_s * 1e9)))))
    device_queue = 1 if cfg.queue_disc == "fifo" else cfg.queue_packets
    link.SetQueue("ns3::DropTailQueue<Packet>", "MaxSize", ns.QueueSizeValue(ns.QueueSize(f"{device_queue}p")))

    stack = ns.InternetStackHelper()
    stack.Install(hosts)
    stack.Install(switch)

    addresses = ns.Ipv4AddressHelper()
    host_devices, switch_devices, host_addresses = [], [], []
    all_devices = ns.NetDeviceContainer()
    for h in range(n_hosts):
        pair = link.Install(hosts.Get(h), switch.Get(0))
        addresses.SetBase(ns.Ipv4Address(_address_base(h)), ns.Ipv4Mask("255.255.255.0"))
        interfaces = addresses.Assign(pair)
        host_devices.append(pair.Get(0))
        switch_devices.append(pair.Get(1))
        host_addresses.append(interfaces.GetAddress(0))
        all_devices.Add(pair)

    # Assign() installed FqCoDel (10,240 packets) on every device, hiding the queue size: remove it.
    traffic_control = ns.TrafficControlHelper()
    traffic_control.Uninstall(all_devices)
    queue_discs = []
    if cfg.queue_disc == "fifo":
        traffic_control.SetRootQueueDisc("ns3::FifoQueueDisc", "MaxSize", ns.QueueSizeValue(ns.QueueSize(f"{cfg.queue_packets}p")))
        switch_ports = ns.NetDeviceContainer()
        for dev in switch_devices:
            switch_ports.Add(dev)
        installed = traffic_control.Install(switch_ports)
        queue_discs = [installed.Get(i) for i in range(installed.GetN())]

    ns.Ipv4GlobalRoutingHelper.PopulateRoutingTables()
    return Star(hosts, switch, host_devices, switch_devices, host_addresses, queue_discs)
