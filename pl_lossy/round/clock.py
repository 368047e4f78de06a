"""The simulated clock of one fit, and the record of its last round."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..network import RoundOutcome


@dataclass
class RoundRecord:
    """What one round did, for loggers (see :class:`~pl_lossy.callbacks.LossyPSMetrics`)."""

    round: int
    delivered_up: float
    delivered_down: float
    up_time_s: float
    down_time_s: float
    compute_time_s: float
    sim_time_s: float
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def comm_time_s(self) -> float:
        return self.up_time_s + self.down_time_s


@dataclass
class SimClock:
    """Simulated time: ``sim_time += compute + up + down`` per round."""

    rounds: int = 0
    sim_time_s: float = 0.0
    comm_time_s: float = 0.0
    compute_time_s: float = 0.0
    delivered_up_sum: float = 0.0
    delivered_down_sum: float = 0.0
    deadline_s: Optional[float] = None  # an adaptive deadline's value for the next round (None: not adapting)

    def advance(self, compute_s: float, outcome: RoundOutcome, delivered: tuple[float, float]) -> None:
        self.rounds += 1
        self.compute_time_s += compute_s
        self.comm_time_s += outcome.comm_time_s
        self.sim_time_s += compute_s + outcome.comm_time_s
        self.delivered_up_sum += delivered[0]
        self.delivered_down_sum += delivered[1]

    @property
    def delivered_up(self) -> float:
        return self.delivered_up_sum / self.rounds if self.rounds else 1.0

    @property
    def delivered_down(self) -> float:
        return self.delivered_down_sum / self.rounds if self.rounds else 1.0
