"""The simulated network's settings, validated without ns-3 (the training side checks them before launch)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

TOPOLOGIES = ("star", "leaf_spine")
PLACEMENTS = ("packed", "spread")
ERROR_MODELS = ("rate", "burst", "gilbert_elliott")
QUEUE_DISCS = ("none", "fifo")
FLOW_SIZE_DISTRIBUTIONS = ("web_search",)
LEARNING_TOS = 0x20  # DSCP CS1, the "scavenger" class: what the learning class matches on
#: Links a failure can cut, by topology: a host's access link (host h: training workers, then dedicated
#: servers, then tenant-only hosts), or on a leaf-spine a leaf's link to a spine.
LINK_NAMES = {"star": re.compile(r"host:(\d+)"), "leaf_spine": re.compile(r"host:(\d+)|leaf:(\d+)-spine:(\d+)")}
LINK_EXAMPLES = {"star": "'host:H'", "leaf_spine": "'host:H' or 'leaf:L-spine:S'"}
TCP_VARIANTS = {"cubic": "ns3::TcpCubic", "newreno": "ns3::TcpNewReno", "bic": "ns3::TcpBic", "vegas": "ns3::TcpVegas"}

def _rate_units() -> dict[str, float]:
    """ns-3's DataRate notation, case-sensitive: ``b`` bits, ``B`` bytes (``10GBps`` = 80 Gb/s); ``k``/``K`` kilo."""
    units = {}
    for prefix, scale in (("", 1.0), ("k", 1e3), ("K", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        for bit, per_bit in (("b", 1.0), ("B", 8.0)):
            units[f"{prefix}{bit}ps"] = units[f"{prefix}{bit}/s"] = scale * per_bit
    return units


_RATE_UNITS = _rate_units()
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _quantity(value: Any, units: dict[str, float], name: str, example: str, unit_name: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        return float(str(value))  # a number given as text: already in the base unit
    except ValueError:
        pass
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z/]+)\s*", str(value))
    if not m or m.group(2) not in units:
        raise ValueError(f"{name} must be a number of {unit_name} or like {example!r}, got {value!r}{_unit_hint(m, units)}")
    try:
        return float(m.group(1)) * units[m.group(2)]
    except ValueError:
        raise ValueError(f"{name} must be a number of {unit_name} or like {example!r}, got {value!r}") from None


def _unit_hint(m: "re.Match | None", units: dict[str, float]) -> str:
    if m and units is _RATE_UNITS:
        return " (units are case-sensitive, as in ns-3: Gbps/Mbps/Kbps/bps are bits per second, GBps/MBps/KBps/Bps bytes per second)"
    return ""


def parse_rate(value: Any) -> float:
    """``"10Gbps"``, ``"100Mbps"`` or a number of bits per second -> bits per second."""
    rate = _quantity(value, _RATE_UNITS, "link_rate", "10Gbps", "bits/s")
    if not rate > 0:
        raise ValueError(f"link_rate must be > 0, got {value!r}")
    return rate


def parse_time(value: Any, name: str = "link_delay") -> float:
    """``"10us"``, ``"1ms"`` or a number of seconds -> seconds."""
    seconds = _quantity(value, _TIME_UNITS, name, "10us", "seconds")
    if seconds < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return seconds


def _probability(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class NetworkConfig:
    """One simulated network. Every host has its own point-to-point link to one switch (``star``).

    ``loss_rate`` and the error model sit on each host's receiving interface, so every packet meets
    exactly one of them. ``queue_packets`` is the switch's egress buffer per port (where incast
    drops happen); ``queue_disc="none"`` keeps only that device queue (ns-3's default FqCoDel, which
    would hide it, is removed), ``"fifo"`` puts a FIFO queue discipline of that size in front of a
    one-packet device queue.

    ``leaf_spine`` puts hosts in racks under leaf switches linked to every spine (``hosts_per_leaf``,
    ``n_spines``, ``fabric_*``, ``placement``). ``background_*`` adds other tenants' TCP flows
    (see ``background.py``); ``learning_class`` gives training packets (DSCP CS1) the lowest
    priority and a buffer of ``learning_queue_packets`` at every port (see ``learning_class.hpp``).
    ``source_drop_rate`` drops that fraction of learning packets at their senders, before they use
    any link: the paper's "learning traffic allowed to drop" (see ``round_engine.hpp``).
    ``link_failures`` cuts links for windows of rounds: every packet that reaches a cut link is lost; with
    ``link_failure_reroute`` a cut leaf-spine link also leaves the routes, so the fabric carries the
    traffic over the other spines (the state after routing converged).

    Rates are given as ``"10Gbps"`` or bits/s and stored in bits/s; times as ``"10us"`` or seconds
    and stored in seconds.
    """

    topology: str = "star"
    link_rate: float = 10e9  # host links, bits/s
    link_delay: float = 10e-6  # one way, per link, seconds
    queue_packets: int = 100
    queue_disc: str = "none"
    error_model: str = "rate"
    loss_rate: float = 0.0
    burst_rate: float = 0.0  # error_model=burst: probability that a burst starts at a packet
    burst_packets: int = 10  # error_model=burst: mean burst length (uniform on 1..2*burst_packets-1)
    ge_p_good_to_bad: float = 0.001
    ge_p_bad_to_good: float = 0.1
    ge_loss_good: float = 0.0
    ge_loss_bad: float = 1.0
    hosts_per_leaf: int = 4  # leaf_spine: hosts under each leaf switch (a rack)
    n_spines: int = 2  # leaf_spine: every leaf links to every spine
    fabric_link_rate: Any = None  # leaf_spine: leaf-spine links (None: link_rate)
    fabric_link_delay: Any = None  # leaf_spine: (None: link_delay)
    fabric_queue_packets: Any = None  # leaf_spine: buffers on leaf-spine links (None: queue_packets)
    placement: Any = "packed"  # leaf_spine: packed fills leaf 0 first | spread: round-robin | [leaf of each host]
    tcp_variant: str = "cubic"  # transport=tcp: congestion control (a key of TCP_VARIANTS)
    tcp_sack: bool = False  # on or off made no difference under loss (README, tcp_under_loss.py)
    tcp_min_rto: float = 1e-3  # datacenter-tuned; ns-3's default (1 s) would dominate every loss
    tcp_conn_timeout: float = 3e-3  # SYN retransmission timeout (ns-3's default: 3 s)
    background_load: float = 0.0  # other tenants' flows, as a fraction of every host link (0: none)
    background_flows_per_s: Any = None  # or: flows (messages) a second over the whole fabric (instead of a load)
    background_flow_sizes: str = "web_search"  # flow-size distribution of the background flows
    background_flow_bytes: Any = None  # or: every flow (message) exactly this many bytes
    background_size_scale: float = 1.0  # multiplies every background flow size drawn from the distribution
    background_hosts: int = 0  # tenant-only hosts added to the fabric (placed after the training hosts)
    background_window: Any = None  # arrivals per round span this long (None: the ideal exchange time)
    learning_class: bool = False  # learning packets: lowest priority and a buffer of their own at every port
    learning_queue_packets: Any = None  # learning_class: the learning band's buffer per port (None: the port's)
    source_drop_rate: float = 0.0  # learning packets a sender drops before they enter the fabric (see round_engine.hpp)
    link_failures: Any = ()  # [[link, first, last], ...]: that link is cut for rounds first..last-1 (see LINK_NAMES)
    link_failure_reroute: bool = False  # leaf_spine: a cut leaf-spine link also leaves the routes (ECMP over the other spines)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {self.topology!r}")
        if self.error_model not in ERROR_MODELS:
            raise ValueError(f"error_model must be one of {ERROR_MODELS}, got {self.error_model!r}")
        if self.queue_disc not in QUEUE_DISCS:
            raise ValueError(f"queue_disc must be one of {QUEUE_DISCS}, got {self.queue_disc!r}")
        object.__setattr__(self, "link_rate", parse_rate(self.link_rate))
        object.__setattr__(self, "link_delay", parse_time(self.link_delay))
        self._check_placement()
        for name in ("hosts_per_leaf", "n_spines"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "fabric_link_rate",
                           self.link_rate if self.fabric_link_rate is None else parse_rate(self.fabric_link_rate))
        object.__setattr__(self, "fabric_link_delay",
                           self.link_delay if self.fabric_link_delay is None else parse_time(self.fabric_link_delay, "fabric_link_delay"))
        if self.tcp_variant not in TCP_VARIANTS:
            raise ValueError(f"tcp_variant must be one of {sorted(TCP_VARIANTS)}, got {self.tcp_variant!r}")
        if not isinstance(self.tcp_sack, bool):
            raise ValueError(f"tcp_sack must be true or false, got {self.tcp_sack!r}")
        object.__setattr__(self, "tcp_min_rto", parse_time(self.tcp_min_rto, "tcp_min_rto"))
        object.__setattr__(self, "tcp_conn_timeout", parse_time(self.tcp_conn_timeout, "tcp_conn_timeout"))
        if self.tcp_min_rto <= 0 or self.tcp_conn_timeout <= 0:
            raise ValueError("tcp_min_rto and tcp_conn_timeout must be > 0")
        if int(self.queue_packets) != self.queue_packets or self.queue_packets < 1:
            raise ValueError(f"queue_packets must be an integer >= 1, got {self.queue_packets!r}")
        if int(self.burst_packets) != self.burst_packets or self.burst_packets < 1:
            raise ValueError(f"burst_packets must be an integer >= 1, got {self.burst_packets!r}")
        for name in ("loss_rate", "burst_rate", "ge_p_good_to_bad", "ge_p_bad_to_good", "ge_loss_good", "ge_loss_bad"):
            object.__setattr__(self, name, _probability(name, getattr(self, name)))
        if self.ge_p_good_to_bad + self.ge_p_bad_to_good == 0:
            raise ValueError("ge_p_good_to_bad and ge_p_bad_to_good cannot both be 0")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2^31), got {self.seed!r}")
        object.__setattr__(self, "queue_packets", int(self.queue_packets))
        fq = self.queue_packets if self.fabric_queue_packets is None else self.fabric_queue_packets
        if isinstance(fq, bool) or int(fq) != fq or fq < 1:
            raise ValueError(f"fabric_queue_packets must be an integer >= 1, got {fq!r}")
        object.__setattr__(self, "fabric_queue_packets", int(fq))
        object.__setattr__(self, "burst_packets", int(self.burst_packets))
        object.__setattr__(self, "seed", int(self.seed))
        self._check_background()
        self._check_link_failures()

    def _check_link_failures(self) -> None:
        try:
            items = [tuple(item) for item in (self.link_failures or ())]
        except TypeError:
            items = None
        out = []
        for item in items if items is not None else [None]:
            ok = (item is not None and len(item) == 3 and isinstance(item[0], str) and all(
                not isinstance(x, bool) and isinstance(x, int) for x in item[1:]) and 0 <= item[1] < item[2])
            match = LINK_NAMES.get(self.topology).fullmatch(item[0]) if ok else None
            if match is None:
                raise ValueError(
                    f"link_failures must be a list of [link, first_round, last_round] with 0 <= first < last, the link named "
                    f"{LINK_EXAMPLES[self.topology]} on topology={self.topology!r}; got {self.link_failures!r}"
                )
            out.append((item[0], int(item[1]), int(item[2])))
        object.__setattr__(self, "link_failures", tuple(sorted(out)))
        if not isinstance(self.link_failure_reroute, bool):
            raise ValueError(f"link_failure_reroute must be true or false, got {self.link_failure_reroute!r}")
        if self.link_failure_reroute and (self.topology != "leaf_spine" or self.n_spines < 2):
            raise ValueError("link_failure_reroute needs another path: topology=leaf_spine with n_spines >= 2")
        for r in sorted({first for _, first, _ in self.link_failures}):  # the most links are down when a window opens
            per_leaf = Counter(name.split("-")[0] for name in self.links_down(r) if name.startswith("leaf:"))
            for leaf, cut in sorted(per_leaf.items()):
                if cut >= self.n_spines:
                    raise ValueError(f"link_failures cut every spine link of {leaf} in round {r}: its hosts would be cut off; "
                                     "cut their host links instead")

    def links_down(self, round_index: int) -> tuple[str, ...]:
        """The links cut in round ``round_index`` (``link_failures``)."""
        return tuple(sorted({name for name, first, last in self.link_failures if first <= round_index < last}))

    def _check_placement(self) -> None:
        if isinstance(self.placement, str):
            if self.placement not in PLACEMENTS:
                raise ValueError(f"placement must be one of {PLACEMENTS} or a list of each host's leaf, got {self.placement!r}")
            return
        try:
            leaves = tuple(self.placement)
        except TypeError:
            leaves = None
        if not leaves or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in leaves):
            raise ValueError(f"placement must be one of {PLACEMENTS} or a list of each host's leaf (integers >= 0), "
                             f"got {self.placement!r}")
        crowded = sorted({leaf for leaf in leaves if leaves.count(leaf) > self.hosts_per_leaf})
        if crowded:
            raise ValueError(f"placement puts more than hosts_per_leaf={self.hosts_per_leaf} hosts on leaf {crowded[0]}")
        object.__setattr__(self, "placement", leaves)

    def _check_background(self) -> None:
        try:
            load = float(self.background_load)
        except (TypeError, ValueError):
            raise ValueError(f"background_load must be a number, got {self.background_load!r}") from None
        if not 0.0 <= load < 1.0:
            raise ValueError(f"background_load must be in [0, 1) (a fraction of each host link), got {load}")
        object.__setattr__(self, "background_load", load)
        if self.background_flows_per_s is not None:
            rate = self.background_flows_per_s
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
                raise ValueError(f"background_flows_per_s must be a number >= 0 (or null: use background_load), got {rate!r}")
            if load > 0 and rate > 0:
                raise ValueError("set background_load (a fraction of the links) or background_flows_per_s (flows a second), not both")
            object.__setattr__(self, "background_flows_per_s", float(rate))
        if self.background_flow_bytes is not None:
            size = self.background_flow_bytes
            if isinstance(size, bool) or not isinstance(size, (int, float)) or int(size) != size or size < 1:
                raise ValueError(f"background_flow_bytes must be an integer >= 1 (or null: draw sizes from background_flow_sizes), got {size!r}")
            object.__setattr__(self, "background_flow_bytes", int(size))
        if self.background_flow_sizes not in FLOW_SIZE_DISTRIBUTIONS:
            raise ValueError(f"background_flow_sizes must be one of {FLOW_SIZE_DISTRIBUTIONS}, got {self.background_flow_sizes!r}")
        try:
            scale = float(self.background_size_scale)
        except (TypeError, ValueError):
            scale = -1.0
        if not scale > 0:
            raise ValueError(f"background_size_scale must be a number > 0, got {self.background_size_scale!r}")
        object.__setattr__(self, "background_size_scale", scale)
        hosts = self.background_hosts
        if isinstance(hosts, bool) or int(hosts) != hosts or hosts < 0:
            raise ValueError(f"background_hosts must be an integer >= 0, got {hosts!r}")
        object.__setattr__(self, "background_hosts", int(hosts))
        if self.background_window is not None:
            window = parse_time(self.background_window, "background_window")
            if window <= 0:
                raise ValueError(f"background_window must be > 0 (or null: the ideal exchange time), got {self.background_window!r}")
            object.__setattr__(self, "background_window", window)
        if not isinstance(self.learning_class, bool):
            raise ValueError(f"learning_class must be true or false, got {self.learning_class!r}")
        lq = self.learning_queue_packets
        if lq is not None:
            if isinstance(lq, bool) or int(lq) != lq or lq < 1:
                raise ValueError(f"learning_queue_packets must be an integer >= 1 (or null: the port's buffer), got {lq!r}")
            object.__setattr__(self, "learning_queue_packets", int(lq))
        object.__setattr__(self, "source_drop_rate", _probability("source_drop_rate", self.source_drop_rate))

    @property
    def has_background(self) -> bool:
        """Whether other tenants' flows share the fabric."""
        return self.background_load > 0 or bool(self.background_flows_per_s)

    @property
    def oversubscription(self) -> float:
        """leaf_spine: a leaf's host bandwidth over its spine bandwidth (1.0 = non-blocking)."""
        return self.hosts_per_leaf * self.link_rate / (self.n_spines * self.fabric_link_rate)

    @property
    def mean_loss_rate(self) -> float:
        """Expected fraction of packets the error model destroys (queue drops come on top)."""
        if self.error_model == "rate":
            return self.loss_rate
        if self.error_model == "burst":
            # ns-3's BurstErrorModel: at every packet a new burst starts with probability b (this packet
            # is lost and the count restarts); otherwise the packet is lost while the current burst of
            # size S (uniform on 1..M) has not run out. P(lost) = b + (1-b) sum_k b(1-b)^(k-1) P(S > k).
            b, m = self.burst_rate, 2 * self.burst_packets - 1
            return b + (1 - b) * sum(b * (1 - b) ** (k - 1) * (m - k) / m for k in range(1, m))
        pi_bad = self.ge_p_good_to_bad / (self.ge_p_good_to_bad + self.ge_p_bad_to_good)
        return pi_bad * self.ge_loss_bad + (1 - pi_bad) * self.ge_loss_good

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NetworkConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown network settings {unknown}; known: {sorted(known)}")
        return cls(**data)
