"""The paper's network model: every packet dropped independently."""

from __future__ import annotations

import numpy as np

from .base import (
    NetworkModel,
    RoundOutcome,
    RoundSpec,
    StarTiming,
    check_probability,
    check_seed,
    round_rng,
    star_outcome,
)


class BernoulliNetwork(NetworkModel):
    """i.i.d. packet drops with probability ``drop_rate`` (per phase overridable), analytic star timing.

    Phase times do not depend on drops: a lossy UDP sender sends every packet once.
    """

    same_on_every_rank = True

    def __init__(
        self,
        drop_rate: float = 0.01,
        uplink_drop_rate: float | None = None,
        downlink_drop_rate: float | None = None,
        link_rate_bps: float = 10e9,
        latency_s: float = 50e-6,
        seed: int = 0,
    ) -> None:
        self.drop_rate = check_probability("drop_rate", drop_rate)
        self.uplink_drop_rate = check_probability(
            "uplink_drop_rate", self.drop_rate if uplink_drop_rate is None else uplink_drop_rate
        )
        self.downlink_drop_rate = check_probability(
            "downlink_drop_rate", self.drop_rate if downlink_drop_rate is None else downlink_drop_rate
        )
        self.timing = StarTiming(link_rate_bps, latency_s)
        self.seed = check_seed(seed)

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        rng = round_rng(self.seed, spec.round)
        up = rng.random(spec.up_shape, dtype=np.float32) >= self.uplink_drop_rate
        down = rng.random(spec.down_shape, dtype=np.float32) >= self.downlink_drop_rate
        return star_outcome(spec, up, down, self.timing, self.seed)

    def describe(self) -> str:
        return (
            f"Bernoulli(up drop {self.uplink_drop_rate:g}, down drop {self.downlink_drop_rate:g}, "
            f"{self.timing.link_rate_bps / 1e9:g} Gb/s, seed {self.seed})"
        )
