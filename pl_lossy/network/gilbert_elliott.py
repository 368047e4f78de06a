"""Bursty loss: a two-state (Gilbert-Elliott) Markov chain per link."""

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
from .bernoulli import resolve_alias


def _p_good_to_bad_for(mean_loss: float, p_bad_to_good: float, loss_good: float, loss_bad: float) -> float:
    """The ``p_good_to_bad`` whose stationary chain loses ``mean_loss`` of packets (ValueError if none can)."""
    if not min(loss_good, loss_bad) <= mean_loss <= max(loss_good, loss_bad) or mean_loss == loss_bad != loss_good:
        raise ValueError(f"loss_rate={mean_loss} is not a mean loss of a chain with loss_good={loss_good} and "
                         f"loss_bad={loss_bad}: it must lie in [loss_good, loss_bad)")
    if loss_bad == loss_good:
        return 0.0 if p_bad_to_good > 0 else 1.0  # every state loses the same: any chain gives the mean
    pi_bad = (mean_loss - loss_good) / (loss_bad - loss_good)  # mean = (1 - pi_bad) * loss_good + pi_bad * loss_bad
    return p_bad_to_good * pi_bad / (1 - pi_bad)  # pi_bad = p_gb / (p_gb + p_bg)


class GilbertElliottNetwork(NetworkModel):
    """Each directed worker/server transfer walks its own Good/Bad chain over its packets, in send order.

    Per packet, Good -> Bad with probability ``p_good_to_bad`` and Bad -> Good with ``p_bad_to_good``;
    a packet is lost with ``loss_good`` in Good and ``loss_bad`` in Bad. Each chain starts a round in
    its stationary state, so every packet has the same marginal loss, the **mean loss rate**::

        pi_bad = p_good_to_bad / (p_good_to_bad + p_bad_to_good)
        mean_loss = (1 - pi_bad) * loss_good + pi_bad * loss_bad

    and losses come in bursts of mean length ``1 / p_bad_to_good`` packets (with ``loss_bad = 1``).
    The defaults give mean loss 1% in bursts of 10 packets.

    ``loss_rate`` (the drop probability, as on every network; ``drop_rate`` is its alias), given, is the
    mean loss rate: it sets ``p_good_to_bad`` to give that mean, the bursts keeping their length.
    """

    same_on_every_rank = True

    def __init__(
        self,
        p_good_to_bad: float = 1.0 / 990.0,
        p_bad_to_good: float = 0.1,
        loss_good: float = 0.0,
        loss_bad: float = 1.0,
        link_rate_bps: float = 10e9,
        latency_s: float = 50e-6,
        seed: int = 0,
        loss_rate: float | None = None,
        drop_rate: float | None = None,
    ) -> None:
        loss_rate = resolve_alias("loss_rate", loss_rate, "drop_rate", drop_rate)
        if loss_rate is not None:
            p_good_to_bad = _p_good_to_bad_for(check_probability("loss_rate", loss_rate), p_bad_to_good,
                                               check_probability("loss_good", loss_good),
                                               check_probability("loss_bad", loss_bad))
        self.p_good_to_bad = check_probability("p_good_to_bad", p_good_to_bad)
        self.p_bad_to_good = check_probability("p_bad_to_good", p_bad_to_good)
        if self.p_good_to_bad + self.p_bad_to_good == 0:
            raise ValueError("p_good_to_bad and p_bad_to_good cannot both be 0 (the chain would never mix)")
        self.loss_good = check_probability("loss_good", loss_good)
        self.loss_bad = check_probability("loss_bad", loss_bad)
        self.timing = StarTiming(link_rate_bps, latency_s)
        self.seed = check_seed(seed)

    @property
    def pi_bad(self) -> float:
        return self.p_good_to_bad / (self.p_good_to_bad + self.p_bad_to_good)

    @property
    def mean_loss_rate(self) -> float:
        return (1 - self.pi_bad) * self.loss_good + self.pi_bad * self.loss_bad

    def _bad_states(self, rng: np.random.Generator, n_links: int, n_packets: int) -> np.ndarray:
        """Bool ``[n_links, n_packets]``: whether each packet is sent in the Bad state.

        Vectorized over links: each loop draws one geometric sojourn per link, so it runs as many
        times as the busiest link changes state, not once per packet.
        """
        start_bad = rng.random(n_links) < self.pi_bad
        flips = np.zeros((n_links, n_packets + 1), dtype=np.int8)
        bad = start_bad.copy()
        pos = np.zeros(n_links, dtype=np.int64)  # first packet of the current sojourn
        while (pos < n_packets).any():
            p_leave = np.where(bad, self.p_bad_to_good, self.p_good_to_bad)
            sojourn = np.full(n_links, n_packets + 1, dtype=np.int64)  # p_leave == 0: stays forever
            moving = p_leave > 0
            sojourn[moving] = rng.geometric(p_leave[moving])
            pos = np.minimum(pos + sojourn, n_packets)
            links = np.nonzero(pos < n_packets)[0]
            flips[links, pos[links]] = 1
            bad = ~bad
        states = (np.cumsum(flips[:, :n_packets], axis=1) % 2).astype(bool)
        return states ^ start_bad[:, None]

    def _phase_mask(self, rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
        n_links = shape[0] * shape[1]
        bad = self._bad_states(rng, n_links, shape[2])
        loss_p = np.where(bad, self.loss_bad, self.loss_good)
        return (rng.random(bad.shape) >= loss_p).reshape(shape)

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        rng = round_rng(self.seed, spec.round)
        up = self._phase_mask(rng, spec.up_shape)
        down = self._phase_mask(rng, spec.down_shape)
        return star_outcome(spec, up, down, self.timing, self.seed)

    def describe(self) -> str:
        return (
            f"GilbertElliott(mean loss {self.mean_loss_rate:.3g}, mean burst {1 / self.p_bad_to_good:.3g} pkts, "
            f"seed {self.seed})"
        )
