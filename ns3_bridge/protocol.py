"""The bridge's wire format, shared by client and server. No pickle: JSON headers and raw frames.

A message is a ZeroMQ multipart message: frame 0 is a UTF-8 JSON object with ``"v"`` (the protocol
version) and ``"type"``; any further frames are raw bytes described by the header.

Requests                                          Replies
``ping``                                          ``pong`` {pid, configured, workers, simulator_pids,
                                                  simulator_restarts, queued, cached, simulator}
``configure`` {network: NetworkConfig fields}     ``ok``
``outcome`` {rounds: [shape, ...]}                ``outcome`` {rounds: [{round, up_time_s, down_time_s,
                                                  stats}, ...]} + 2 frames per round: the packed bits
                                                  (numpy.packbits, C order) of ``up`` [W,S,P] and ``down`` [S,W,P]
``prefetch`` {rounds: [shape, ...]}                ``ok`` {queued}: simulated in the background, kept
                                                  for a later ``outcome`` (run-ahead)
``shutdown``                                      ``ok``
any malformed or failing request                  ``error`` {message}

A round shape is ``{round, n_workers, n_servers, packets_per_block, packet_bytes, colocated_servers,
transport}`` (the fields of ``pl_lossy.network.RoundSpec``).

``simulator`` is the bridge's simulator identity (its ns-3 version and a hash of the engine sources it
runs, see :func:`ns3_bridge.server.simulator_identity`): clients key stored rounds with it. It was added
to version 1 without a version bump (that would make every running bridge refuse every client); a pong
without it comes from an older bridge, whose engine is unknown (:func:`parse_simulator` returns None).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .sim.round import TRANSPORTS, RoundShape, SimulatedRound

VERSION = 1
REQUESTS = ("ping", "configure", "outcome", "prefetch", "shutdown")
MAX_ROUNDS_PER_REQUEST = 4096
MAX_HOSTS = 4096
MAX_PACKETS_PER_BLOCK = 10_000_000


class ProtocolError(ValueError):
    """A message that does not follow this protocol; its text says which field and why."""


def encode(header: dict[str, Any], frames: list[bytes] | tuple = ()) -> list[bytes]:
    return [json.dumps({"v": VERSION, **header}).encode(), *frames]


def decode(parts: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    if not parts:
        raise ProtocolError("empty message")
    try:
        header = json.loads(parts[0].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"frame 0 is not a JSON object: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"frame 0 must be a JSON object, got {type(header).__name__}")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} is not supported (this side speaks {VERSION})")
    if not isinstance(header.get("type"), str):
        raise ProtocolError("the header has no string 'type'")
    return header, list(parts[1:])


MAX_SIMULATOR_CHARS = 200


def parse_simulator(pong: dict[str, Any]) -> str | None:
    """The ``simulator`` identity of a ``pong``: a printable one-line string, or None when the bridge
    predates the field. ProtocolError for anything else (a store keyed with junk would be worse than none)."""
    if "simulator" not in pong:
        return None
    value = pong["simulator"]
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_SIMULATOR_CHARS or not value.isprintable()
            or value != value.strip()):
        raise ProtocolError(f"pong field 'simulator' must be a printable string of 1 to {MAX_SIMULATOR_CHARS} "
                            f"characters without surrounding spaces, got {str(value)[:60]!r}")
    return value


def _int_field(d: dict, name: str, lo: int, hi: int) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"round field {name!r} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ProtocolError(f"round field {name!r} must be in [{lo}, {hi}], got {value}")
    return value


def parse_shape(d: Any) -> RoundShape:
    if not isinstance(d, dict):
        raise ProtocolError(f"a round must be a JSON object, got {type(d).__name__}")
    allowed = {"round", "n_workers", "n_servers", "packets_per_block", "packet_bytes", "colocated_servers", "transport", "deadline_s",
               "start_offsets_ns", "down_workers"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ProtocolError(f"unknown round fields {unknown}")
    transport = d.get("transport", "udp")
    if transport not in TRANSPORTS:
        raise ProtocolError(f"round field 'transport' must be one of {TRANSPORTS}, got {transport!r}")
    colocated = d.get("colocated_servers", True)
    if not isinstance(colocated, bool):
        raise ProtocolError(f"round field 'colocated_servers' must be true or false, got {colocated!r}")
    deadline = d.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not 0 < deadline < 3600):
        raise ProtocolError(f"round field 'deadline_s' must be a number of seconds in (0, 3600) or absent, got {deadline!r}")
    if deadline is not None and transport != "udp":
        raise ProtocolError("round field 'deadline_s' applies to transport 'udp' only")
    offsets = d.get("start_offsets_ns")
    if offsets is not None:
        if (not isinstance(offsets, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 3600 * 10**9 for x in offsets)):
            raise ProtocolError("round field 'start_offsets_ns' must be a list of integers in [0, 3.6e12) (one per worker) or absent")
        if transport == "none":
            raise ProtocolError("round field 'start_offsets_ns' needs training traffic (transport 'udp' or 'tcp')")
        offsets = tuple(offsets)
    down = d.get("down_workers")
    if down is not None:
        if not isinstance(down, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < MAX_HOSTS for x in down):
            raise ProtocolError("round field 'down_workers' must be a list of worker indices or absent")
        down = tuple(sorted(set(down)))
    shape = RoundShape(
        round=_int_field(d, "round", 0, 2**32 - 1),
        n_workers=_int_field(d, "n_workers", 1, MAX_HOSTS),
        n_servers=_int_field(d, "n_servers", 1, MAX_HOSTS),
        packets_per_block=_int_field(d, "packets_per_block", 1, MAX_PACKETS_PER_BLOCK),
        packet_bytes=_int_field(d, "packet_bytes", 16, 9_000),  # the links' MTU is 9,216 (jumbo frames)
        colocated_servers=colocated,
        transport=transport,
        deadline_s=None if deadline is None else float(deadline),
        start_offsets_ns=offsets,
        down_workers=down,
    )
    if down is not None and down[-1] >= shape.n_workers:
        raise ProtocolError(f"round field 'down_workers' names worker {down[-1]}; there are {shape.n_workers}")
    if offsets is not None and len(offsets) != shape.n_workers:
        raise ProtocolError(f"round field 'start_offsets_ns' must have one entry per worker ({shape.n_workers}), got {len(offsets)}")
    if colocated and shape.n_servers > shape.n_workers:
        raise ProtocolError(f"{shape.n_servers} co-located servers need as many workers, got {shape.n_workers}")
    if shape.n_hosts > MAX_HOSTS:
        raise ProtocolError(f"{shape.n_hosts} hosts is more than the {MAX_HOSTS} this bridge simulates")
    return shape


def shape_to_dict(shape: RoundShape) -> dict[str, Any]:
    return {
        "round": shape.round,
        "n_workers": shape.n_workers,
        "n_servers": shape.n_servers,
        "packets_per_block": shape.packets_per_block,
        "packet_bytes": shape.packet_bytes,
        "colocated_servers": shape.colocated_servers,
        "transport": shape.transport,
        **({} if shape.deadline_s is None else {"deadline_s": shape.deadline_s}),
        **({} if shape.start_offsets_ns is None else {"start_offsets_ns": list(shape.start_offsets_ns)}),
        **({} if shape.down_workers is None else {"down_workers": list(shape.down_workers)}),
    }


def parse_rounds(header: dict[str, Any]) -> list[RoundShape]:
    rounds = header.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise ProtocolError("'rounds' must be a non-empty list of round shapes")
    if len(rounds) > MAX_ROUNDS_PER_REQUEST:
        raise ProtocolError(f"at most {MAX_ROUNDS_PER_REQUEST} rounds per request, got {len(rounds)}")
    return [parse_shape(r) for r in rounds]


def encode_round(result: SimulatedRound, round_index: int) -> tuple[dict[str, Any], list[bytes]]:
    meta = {
        "round": round_index,
        "up_time_s": result.up_time_s,
        "down_time_s": result.down_time_s,
        "stats": result.stats,
    }
    return meta, [np.packbits(result.up.ravel()).tobytes(), np.packbits(result.down.ravel()).tobytes()]


def decode_rounds(header: dict[str, Any], frames: list[bytes], shapes: list[RoundShape]) -> list[SimulatedRound]:
    metas = header.get("rounds")
    if not isinstance(metas, list) or len(metas) != len(shapes) or len(frames) != 2 * len(shapes):
        raise ProtocolError(f"an outcome reply for {len(shapes)} rounds needs {len(shapes)} entries and {2 * len(shapes)} frames")
    out = []
    for k, (meta, shape) in enumerate(zip(metas, shapes)):
        if meta.get("round") != shape.round:
            raise ProtocolError(f"reply entry {k} is round {meta.get('round')}, expected {shape.round}")
        W, S, P = shape.n_workers, shape.n_servers, shape.packets_per_block
        n = W * S * P
        up_bits, down_bits = (np.frombuffer(f, dtype=np.uint8) for f in frames[2 * k : 2 * k + 2])
        if up_bits.size != (n + 7) // 8 or down_bits.size != (n + 7) // 8:
            raise ProtocolError(f"round {shape.round}: mask frames of {up_bits.size}/{down_bits.size} bytes, expected {(n + 7) // 8}")
        up = np.unpackbits(up_bits, count=n).astype(bool).reshape(W, S, P)
        down = np.unpackbits(down_bits, count=n).astype(bool).reshape(S, W, P)
        out.append(SimulatedRound(up, down, float(meta["up_time_s"]), float(meta["down_time_s"]), dict(meta.get("stats", {}))))
    return out
