"""Everything delivered: the DDP-equivalent baseline."""

from __future__ import annotations

import numpy as np

from .base import NetworkModel, RoundOutcome, RoundSpec, StarTiming, star_outcome


class ReliableNetwork(NetworkModel):
    """Every packet arrives; phase times are the analytic star times (no retransmissions needed)."""

    same_on_every_rank = True

    def __init__(self, link_rate_bps: float = 10e9, latency_s: float = 50e-6, seed: int = 0) -> None:
        self.timing = StarTiming(link_rate_bps, latency_s)
        self.seed = seed  # draws stragglers' compute times (no drops to draw)

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        return star_outcome(spec, np.ones(spec.up_shape, bool), np.ones(spec.down_shape, bool), self.timing, self.seed)

    def describe(self) -> str:
        return f"Reliable({self.timing.link_rate_bps / 1e9:g} Gb/s)"
