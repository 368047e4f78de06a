"""Network models: where a round's outcome comes from."""

from .base import NetworkModel, RoundOutcome, RoundSpec, round_rng
from .bernoulli import BernoulliNetwork
from .gilbert_elliott import GilbertElliottNetwork
from .ns3 import Ns3Network
from .reliable import ReliableNetwork
from .trace import TraceNetwork, TraceRecorder

__all__ = [
    "BernoulliNetwork",
    "GilbertElliottNetwork",
    "NetworkModel",
    "Ns3Network",
    "ReliableNetwork",
    "RoundOutcome",
    "RoundSpec",
    "TraceNetwork",
    "TraceRecorder",
    "round_rng",
]
