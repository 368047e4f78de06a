"""The paper's network model: every packet dropped independently."""

from __future__ import annotations

import logging
from typing import Optional

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

log = logging.getLogger(__name__)

_warned_aliases: set[str] = set()


def resolve_alias(name: str, value: Optional[float], alias: str, alias_value: Optional[float],
                  unset: tuple = (None,)) -> Optional[float]:
    """The value of setting ``name`` given also under its old name ``alias`` (every network calls the drop
    probability ``loss_rate``; ``drop_rate`` is accepted as its alias).

    ``alias_value`` None: ``value``. Otherwise the alias's value (checked as a probability under the name
    the user gave), with one log warning per process and alias; ``value`` must then be one of ``unset``
    (not given: a config file always passes its own default, so a network lists it there) or equal,
    else ValueError naming both. The caller checks the result itself."""
    if alias_value is None:
        return value
    alias_value = check_probability(alias, alias_value)
    if value not in unset and value != alias_value:
        raise ValueError(f"{name}={value} and its alias {alias}={alias_value} differ: give only {name}")
    if alias not in _warned_aliases:
        _warned_aliases.add(alias)
        log.warning("network.%s is an alias of network.%s; use %s", alias, name, name)
    return alias_value


class BernoulliNetwork(NetworkModel):
    """i.i.d. packet drops with probability ``loss_rate`` (per phase overridable), analytic star timing.

    ``drop_rate``, ``uplink_drop_rate`` and ``downlink_drop_rate`` are aliases of ``loss_rate``,
    ``uplink_loss_rate`` and ``downlink_loss_rate`` (see :func:`resolve_alias`); as ``loss_rate`` is
    always passed by the Hydra config, ``drop_rate`` replaces it where it is still the default 0.01.
    Phase times do not depend on drops: a lossy UDP sender sends every packet once.
    """

    same_on_every_rank = True

    def __init__(
        self,
        loss_rate: float = 0.01,
        uplink_loss_rate: float | None = None,
        downlink_loss_rate: float | None = None,
        link_rate_bps: float = 10e9,
        latency_s: float = 50e-6,
        seed: int = 0,
        drop_rate: float | None = None,
        uplink_drop_rate: float | None = None,
        downlink_drop_rate: float | None = None,
    ) -> None:
        loss_rate = resolve_alias("loss_rate", loss_rate, "drop_rate", drop_rate, unset=(0.01,))
        uplink_loss_rate = resolve_alias("uplink_loss_rate", uplink_loss_rate, "uplink_drop_rate", uplink_drop_rate)
        downlink_loss_rate = resolve_alias("downlink_loss_rate", downlink_loss_rate, "downlink_drop_rate", downlink_drop_rate)
        self.loss_rate = check_probability("loss_rate", loss_rate)
        self.uplink_loss_rate = check_probability(
            "uplink_loss_rate", self.loss_rate if uplink_loss_rate is None else uplink_loss_rate
        )
        self.downlink_loss_rate = check_probability(
            "downlink_loss_rate", self.loss_rate if downlink_loss_rate is None else downlink_loss_rate
        )
        self.timing = StarTiming(link_rate_bps, latency_s)
        self.seed = check_seed(seed)

    # the old names, read-only, for code written against them
    drop_rate = property(lambda self: self.loss_rate)
    uplink_drop_rate = property(lambda self: self.uplink_loss_rate)
    downlink_drop_rate = property(lambda self: self.downlink_loss_rate)

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        rng = round_rng(self.seed, spec.round)
        up = rng.random(spec.up_shape, dtype=np.float32) >= self.uplink_loss_rate
        down = rng.random(spec.down_shape, dtype=np.float32) >= self.downlink_loss_rate
        return star_outcome(spec, up, down, self.timing, self.seed)

    def describe(self) -> str:
        return (
            f"Bernoulli(up drop {self.uplink_loss_rate:g}, down drop {self.downlink_loss_rate:g}, "
            f"{self.timing.link_rate_bps / 1e9:g} Gb/s, seed {self.seed})"
        )
