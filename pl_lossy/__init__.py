"""pl-lossy: PyTorch Lightning data-parallel training with RPS over a simulated unreliable network."""

from pytorch_lightning.strategies import StrategyRegistry

from .callbacks import LossyPSMetrics, RunSummary
from .network import (
    BernoulliNetwork,
    GilbertElliottNetwork,
    NetworkModel,
    Ns3Network,
    ReliableNetwork,
    RoundOutcome,
    RoundSpec,
    TraceNetwork,
    TraceRecorder,
)
from .strategy import LossyPSStrategy

LossyPSStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0"
__all__ = [
    "BernoulliNetwork",
    "GilbertElliottNetwork",
    "LossyPSMetrics",
    "LossyPSStrategy",
    "NetworkModel",
    "Ns3Network",
    "ReliableNetwork",
    "RoundOutcome",
    "RoundSpec",
    "RunSummary",
    "TraceNetwork",
    "TraceRecorder",
]
