"""Other tenants' traffic: which background flows a round has (no ns-3 needed; the simulator runs them).

Flows arrive as a Poisson process over the round's *background window*, each between two hosts
drawn uniformly (any host of the fabric, training hosts included: tenants share machines), with a
size drawn from a flow-size distribution. Everything is drawn from a generator keyed on (seed,
round), never from ns-3, so the flows of a round are the same whatever the training traffic is:
two runs that differ only in how they train see the same background flows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import NetworkConfig
from .round import RoundShape

# The web-search workload of DCTCP (Alizadeh et al., SIGCOMM 2010) as used by pFabric and HPCC:
# (flow size in bytes, cumulative probability), linear in between. Mean about 1.6 MB; most flows
# are short, most bytes are in the few long ones.
WEB_SEARCH_CDF = (
    (0, 0.0), (10_000, 0.15), (20_000, 0.20), (30_000, 0.30), (50_000, 0.40), (80_000, 0.53),
    (200_000, 0.60), (1_000_000, 0.70), (2_000_000, 0.80), (5_000_000, 0.90), (10_000_000, 0.97),
    (30_000_000, 1.0),
)
FLOW_SIZE_CDFS = {"web_search": WEB_SEARCH_CDF}

# bytes on the wire per packet of a learning round beyond its payload (UDP 8 + IPv4 20 + PPP 2)
_HEADER_BYTES = 30


@dataclass(frozen=True)
class BackgroundFlows:
    start_ns: np.ndarray  # int64, from the round's start
    src: np.ndarray  # int32 host index
    dst: np.ndarray  # int32 host index
    size_bytes: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.src)


def mean_flow_bytes(cfg: NetworkConfig) -> float:
    """Mean of the (scaled) flow-size distribution: sum over its linear pieces of P(piece) x midpoint
    (``background_flow_bytes`` when sizes are fixed)."""
    if cfg.background_flow_bytes is not None:
        return float(cfg.background_flow_bytes)
    sizes, cdf = np.array(FLOW_SIZE_CDFS[cfg.background_flow_sizes], dtype=np.float64).T
    return float(np.sum(np.diff(cdf) * (sizes[1:] + sizes[:-1]) / 2) * cfg.background_size_scale)


def flow_sizes(cfg: NetworkConfig, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF sizes (bytes, at least 1) for uniforms in [0, 1); all ``background_flow_bytes`` when set."""
    if cfg.background_flow_bytes is not None:
        return np.full(len(uniforms), cfg.background_flow_bytes, dtype=np.int64)
    sizes, cdf = np.array(FLOW_SIZE_CDFS[cfg.background_flow_sizes], dtype=np.float64).T
    return np.maximum(1, np.round(np.interp(uniforms, cdf, sizes) * cfg.background_size_scale)).astype(np.int64)


def ideal_exchange_s(cfg: NetworkConfig, shape: RoundShape) -> float:
    """The round's learning traffic at line rate without loss: the busiest sender of each phase."""
    pairs = dataclasses.replace(shape, down_workers=None).remote_pairs()  # the tenants' load does not follow training's failures
    if not pairs:
        return 0.0
    up = max(sum(1 for i, _ in pairs if i == w) for w, _ in pairs)
    down = max(sum(1 for _, j in pairs if j == s) for _, s in pairs)
    packet_s = (shape.packet_bytes + _HEADER_BYTES) * 8 / cfg.link_rate
    return (up + down) * shape.packets_per_block * packet_s


def background_window_s(cfg: NetworkConfig, shape: RoundShape) -> float:
    """How long flows keep arriving in a round: ``background_window`` or, unset, the ideal exchange time."""
    return cfg.background_window if cfg.background_window is not None else ideal_exchange_s(cfg, shape)


def background_flows(cfg: NetworkConfig, shape: RoundShape, n_hosts: int) -> BackgroundFlows:
    """The round's background flows: Poisson arrivals at ``background_load`` of the hosts' capacity,
    or at ``background_flows_per_s`` over the fabric.

    Arrival rate = load x n_hosts x link_rate / (8 x mean flow size): on average the flows offer
    ``background_load`` of every host link's capacity.
    """
    empty = np.empty(0, dtype=np.int64)
    window = background_window_s(cfg, shape)
    if not cfg.has_background or n_hosts < 2 or window <= 0:
        return BackgroundFlows(empty, empty.astype(np.int32), empty.astype(np.int32), empty)
    rng = np.random.default_rng([cfg.seed, shape.round, 0x6267])  # "bg": a stream of its own
    if cfg.background_flows_per_s:
        rate = cfg.background_flows_per_s
    else:
        rate = cfg.background_load * n_hosts * cfg.link_rate / (8 * mean_flow_bytes(cfg))
    expected = rate * window
    starts = np.cumsum(rng.exponential(1 / rate, size=int(expected + 10 * np.sqrt(expected) + 10)))
    while starts[-1] < window:  # (almost never) more arrivals than drawn
        starts = np.concatenate([starts, starts[-1] + np.cumsum(rng.exponential(1 / rate, size=len(starts)))])
    starts = starts[starts < window]
    n = len(starts)
    src = rng.integers(0, n_hosts, size=n)
    dst = (src + rng.integers(1, n_hosts, size=n)) % n_hosts  # any other host, uniformly
    sizes = flow_sizes(cfg, rng.random(n))
    return BackgroundFlows(np.round(starts * 1e9).astype(np.int64), src.astype(np.int32), dst.astype(np.int32), sizes)
