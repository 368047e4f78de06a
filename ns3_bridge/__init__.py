"""The ns-3 side of pl-lossy: a ZeroMQ service that simulates rounds packet by packet.

Not built yet: this package will hold the protocol, the client, the server and the ns-3 topologies
(see the ns-3 issue). Until then the networks in :mod:`pl_lossy.network` are analytic.
"""
