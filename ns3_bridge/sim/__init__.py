"""The simulation side: network settings, the ns-3 loader, topologies and the C++ round engine.

Only :mod:`.config` is importable without ns-3; the rest runs in the bridge's simulation process.
"""

from .config import NetworkConfig, parse_rate, parse_time

__all__ = ["NetworkConfig", "parse_rate", "parse_time"]
