"""The ns-3 side of pl-lossy: a ZeroMQ service that simulates RPS rounds packet by packet.

- :mod:`ns3_bridge.protocol`: the versioned wire format (JSON headers, raw frames).
- :mod:`ns3_bridge.client`: :class:`~ns3_bridge.client.BridgeClient`, timeouts and clear errors.
- :mod:`ns3_bridge.server`: ``python -m ns3_bridge.server --endpoint ipc:///tmp/bridge.ipc``.
- :mod:`ns3_bridge.sim`: settings, the ns-3 loader, topologies and the C++ round engine.

Only the simulation process imports ns-3.
"""
