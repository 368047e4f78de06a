"""Fidelity: how many of a run's rounds ns-3 simulates, and what serving the others costs in exactness.

A round's packets grow as ``2 x workers x model bytes / packet bytes``; ns-3 decides each one at
~20-90k packets per core-second (docs/fidelity.md), so a transformer's first run can spend minutes of
simulation a round. A fidelity setting trades exactness for that time, and is never silent: the run's
first line, its summary and its traces name it, with its parameters and why ``auto`` chose it.

- ``full``: every round simulated (the reference).
- ``reuse``: rounds ``0 .. K-1`` are simulated in full; round ``r >= K`` is served the outcome of round
  ``s(r) = u(seed, r) mod K``, a uniform draw keyed by (seed, r) alone. Assumption: rounds are i.i.d. given
  (network settings, seed) -- true of the round contract when every round has the same shape (no
  stragglers, worker failures or link failures, which change a round's shape with its index). Every served
  outcome is a real ns-3 outcome (masks, phase times, counters); what is lost is diversity: a run sees at
  most K distinct drop patterns, each about R / K times. Cost: K rounds of ns-3 for a run of any length
  (a run of at most K rounds is exactly ``full``). The outcome store holds only the K simulated rounds,
  under their own keys, and a trace records a served round under its source's key: what it holds is exactly
  that round's outcome, so nothing approximate is ever stored as exact. With an adaptive deadline (the one
  field of a round that may change with its index) round s is simulated once per deadline it is served with.
- ``auto`` (the default): ``full`` while a round has at most ``budget`` packets, else ``reuse``; the run
  says which and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .base import RoundOutcome, RoundSpec, round_rng

MODES = ("auto", "full", "reuse")
#: The random stream reuse draws source rounds from (drops use 0, stragglers 0x5354).
REUSE_STREAM = 0x5245
#: ``auto`` keeps ``full`` up to this many packets a round: ~1.5 s of ns-3 a round on the 10 Gb/s star (~140k
#: packets/s), 20-70 s on the leaf-spine with 40% tenants' load, measured here (docs/fidelity.md): a packet
#: count cannot tell a fabric's cost in advance, so the budget is the star's. 16 ResNet-20 workers (23,520)
#: and 16 or 32 tiny GPTs (89,280; 184,512) stay exact; 16 10M GPTs (929,760: ~7 s a round on the star) do not.
FULL_BUDGET_PACKETS = 200_000
#: Rounds ``reuse`` simulates when ``auto`` picks it.
REUSE_ROUNDS = 64


@dataclass(frozen=True)
class Fidelity:
    """How a run's rounds are decided: ``mode`` ``full`` or ``reuse`` (of ``rounds`` simulated rounds);
    ``reason``: why ``auto`` chose it ("" when the user did)."""

    mode: str = "full"
    rounds: int = REUSE_ROUNDS
    reason: str = ""

    def source_round(self, seed: int, round_index: int) -> int:
        """The simulated round whose outcome round ``round_index`` is served: itself under ``full`` and for the
        first ``rounds`` rounds, else ``u(seed, round) mod rounds``."""
        if self.mode == "full" or round_index < self.rounds:
            return round_index
        return int(round_rng(seed, round_index, REUSE_STREAM).integers(self.rounds))

    def summary(self) -> dict:
        """What a run's summary records: ``mode``, ``rounds`` (reuse only) and ``reason``."""
        out = {"mode": self.mode, "rounds": self.rounds, "reason": self.reason}
        if self.mode == "full":
            del out["rounds"]
        return out

    def describe(self) -> str:
        what = "full" if self.mode == "full" else f"reuse of {self.rounds} simulated rounds"
        return f"{what} ({self.reason})" if self.reason else what


def check_settings(mode: str, rounds: object, budget: object) -> None:
    """One line for a bad ``fidelity``, ``fidelity_rounds`` or ``fidelity_budget_packets``."""
    if mode not in MODES:
        raise ValueError(f"fidelity must be one of {', '.join(MODES)} (docs/fidelity.md), got {mode!r}")
    for name, value in (("fidelity_rounds", rounds), ("fidelity_budget_packets", budget)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def rounds_differ(spec: RoundSpec, link_failures: bool) -> str:
    """Why round ``r``'s shape depends on ``r`` (so another round's outcome is not a draw of its own), or ""."""
    if spec.has_stragglers:
        return "stragglers start each round's uplink at other times"
    if spec.worker_failures:
        return "worker failures take workers down in some rounds"
    if link_failures:
        return "link failures cut links in some rounds"
    return ""


def choose(mode: str, rounds: int, budget: int, packets: int, differ: str) -> Fidelity:
    """The fidelity of a run whose rounds have ``packets`` training packets (``differ``: :func:`rounds_differ`).
    ``reuse`` asked for with rounds that differ is refused; ``auto`` falls back to ``full`` then, saying why."""
    if mode == "reuse":
        if differ:
            raise ValueError(f"fidelity=reuse serves a round another round's outcome, so every round must be alike, but "
                             f"{differ}: use fidelity=full")
        return Fidelity("reuse", rounds)
    if mode == "full":
        return Fidelity("full")
    if packets <= budget:
        return Fidelity("full", reason=f"auto: {packets:,} packets a round, within fidelity_budget_packets={budget:,}")
    if differ:
        return Fidelity("full", reason=f"auto: {packets:,} packets a round is over {budget:,}, but {differ}, so reuse does not apply")
    return Fidelity("reuse", rounds, reason=f"auto: {packets:,} packets a round is over fidelity_budget_packets={budget:,}")


class ReusedRounds:
    """The simulated rounds ``reuse`` serves again, kept in memory as packed bits (1/8 of a bool mask: 64 rounds
    of 16 GPT-2 workers, 7.4M packets each, are ~60 MB), so a run without an outcome store simulates each once.
    A round is kept under its index and its deadline (an adaptive deadline changes it from round to round):
    what a round is simulated with, besides its index, is the same in every round (see :func:`rounds_differ`)."""

    def __init__(self) -> None:
        self._kept: dict[tuple[int, Optional[float]], tuple] = {}

    def keep(self, round_index: int, deadline_s: Optional[float], outcome: RoundOutcome) -> None:
        self._kept[round_index, deadline_s] = (np.packbits(outcome.up), outcome.up.shape, np.packbits(outcome.down), outcome.down.shape,
                                   outcome.up_time_s, outcome.down_time_s, dict(outcome.stats))

    def __contains__(self, key: tuple[int, Optional[float]]) -> bool:
        return key in self._kept

    def get(self, round_index: int, deadline_s: Optional[float]) -> Optional[RoundOutcome]:
        """Round ``round_index``'s outcome under ``deadline_s`` (fresh arrays), or None when not kept."""
        kept = self._kept.get((round_index, deadline_s))
        if kept is None:
            return None
        up, up_shape, down, down_shape, up_t, down_t, stats = kept
        unpack = lambda bits, shape: np.unpackbits(bits, count=math.prod(shape)).view(np.bool_).reshape(shape)  # noqa: E731
        return RoundOutcome(unpack(up, up_shape), unpack(down, down_shape), up_t, down_t, dict(stats))

    def clear(self) -> None:
        self._kept.clear()

