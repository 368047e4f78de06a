"""Network models: where a round's outcome comes from."""

from .base import NetworkModel, RoundOutcome, RoundSpec, round_rng
from .bernoulli import BernoulliNetwork
from .gilbert_elliott import GilbertElliottNetwork
from .reliable import ReliableNetwork
from .trace import TraceNetwork, TraceRecorder

__all__ = [
    "BernoulliNetwork",
    "GilbertElliottNetwork",
    "NetworkModel",
    "ReliableNetwork",
    "RoundOutcome",
    "RoundSpec",
    "TraceNetwork",
    "TraceRecorder",
    "round_rng",
]
