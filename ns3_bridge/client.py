"""BridgeClient: talks to an ns-3 bridge over ZeroMQ, with a timeout on every call."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import zmq

from .keys import client_keys

from . import protocol
from .sim.config import NetworkConfig
from .sim.round import RoundShape, SimulatedRound


class BridgeError(RuntimeError):
    """The bridge is gone, hung, or answered with an error; the message names its endpoint."""


class BridgeClient:
    """A REQ socket per conversation; after a timeout the socket is replaced (the lazy-pirate pattern).

    ``alive``, if given, is polled while waiting so that a bridge process that died is reported at
    once instead of after the whole timeout. ``simulator`` is the bridge's simulator identity from its
    last pong (see :meth:`ping`).
    """

    def __init__(self, endpoint: str, timeout_s: float = 120.0, alive: Optional[Callable[[], bool]] = None,
                 curve_keys: Optional[str] = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.alive = alive
        # CURVE (see ns3_bridge.keys): encrypted, and answered only if the bridge holds our public key
        self._curve = client_keys(curve_keys) if curve_keys else None
        self._ctx = zmq.Context.instance()
        self._sock: Optional[zmq.Socket] = None
        self.simulator: Optional[str] = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._sock.curve_publickey, self._sock.curve_secretkey, self._sock.curve_serverkey = self._curve
            self._sock.connect(self.endpoint)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def request(self, header: dict[str, Any], frames=(), timeout_s: Optional[float] = None) -> tuple[dict, list[bytes]]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        sock = self._socket()
        sock.send_multipart(protocol.encode(header, frames))
        deadline = time.monotonic() + timeout
        while True:
            if sock.poll(200):
                break
            if self.alive is not None and not self.alive():
                self._reset()
                raise BridgeError(f"the ns-3 bridge at {self.endpoint} exited while handling {header['type']!r}")
            if time.monotonic() > deadline:
                self._reset()
                raise BridgeError(
                    f"the ns-3 bridge at {self.endpoint} did not answer {header['type']!r} within {timeout:g} s "
                    "(is it running? raise timeout_s for very large rounds)"
                )
        try:
            reply, reply_frames = protocol.decode(sock.recv_multipart())
        except protocol.ProtocolError as exc:
            raise BridgeError(f"the ns-3 bridge at {self.endpoint} sent a malformed reply: {exc}") from None
        if reply["type"] == "error":
            raise BridgeError(f"the ns-3 bridge at {self.endpoint}: {reply.get('message')}")
        return reply, reply_frames

    def ping(self, timeout_s: Optional[float] = None) -> dict:
        """The bridge's state (see :mod:`ns3_bridge.protocol`); sets :attr:`simulator` to the identity it
        reports (None: a bridge older than the field). A malformed identity is a BridgeError."""
        pong = self.request({"type": "ping"}, timeout_s=timeout_s)[0]
        try:
            self.simulator = protocol.parse_simulator(pong)
        except protocol.ProtocolError as exc:
            raise BridgeError(f"the ns-3 bridge at {self.endpoint} sent a malformed reply: {exc}") from None
        return pong

    def configure(self, config: NetworkConfig, timeout_s: Optional[float] = None) -> None:
        self.request({"type": "configure", "network": config.to_dict()}, timeout_s=timeout_s)

    def outcomes(self, shapes: list[RoundShape], timeout_s: Optional[float] = None) -> list[SimulatedRound]:
        header, frames = self.request(
            {"type": "outcome", "rounds": [protocol.shape_to_dict(s) for s in shapes]}, timeout_s=timeout_s
        )
        try:
            return protocol.decode_rounds(header, frames, shapes)
        except protocol.ProtocolError as exc:
            raise BridgeError(f"the ns-3 bridge at {self.endpoint} sent a malformed outcome: {exc}") from None

    def prefetch(self, shapes: list[RoundShape], timeout_s: Optional[float] = None) -> int:
        """Ask the bridge to simulate these rounds in the background; returns how many it queued."""
        header, _ = self.request(
            {"type": "prefetch", "rounds": [protocol.shape_to_dict(s) for s in shapes]}, timeout_s=timeout_s
        )
        return int(header.get("queued", 0))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.request({"type": "shutdown"}, timeout_s=timeout_s)

    def close(self) -> None:
        self._reset()
