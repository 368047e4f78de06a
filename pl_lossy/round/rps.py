"""The RPS exchange as pure tensor functions (no Lightning, no torch.distributed).

Notation (Yu, Tang et al., *Distributed Learning over Unreliable Networks*, ICML 2019): ``W`` workers,
``S`` parameter servers; the flat model ``v_i`` of worker ``i`` is cut into ``S`` blocks, block ``j``
belonging to server ``j``, each block sent as ``P`` packets of ``E`` elements::

    blocks_i  = v_i laid out as [S, P, E]
    up[i,j,p]   packet p of block j from worker i reached server j
    down[j,i,p] packet p of server j's averaged block reached worker i

One round, for every block j and packet p:

    c[j,p]       = sum_i up[i,j,p]                            (every rank knows all masks)
    avg[j,p]     = sum_i up[i,j,p] * blocks_i[j,p] / c[j,p]   if c[j,p] > 0
                 = server j's previous block                  if c[j,p] = 0 (dedicated servers only)
    blocks_i[j,p] <- avg[j,p] if down[j,i,p] else blocks_i[j,p]   (a worker that misses keeps its own)

In a distributed run each rank computes its own term ``blocks_i * (up[i] / c)`` and one all_reduce
sums them: that is :func:`uplink_weights` + :func:`scale_blocks_`, then the sum, then
:func:`copy_packets` for silent servers and lost downlinks. :func:`rps_round` runs the same steps for all
workers in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: Bytes per element on the wire: packets carry fp32 whatever the training precision.
WIRE_BYTES_PER_ELEM = 4


@dataclass(frozen=True)
class PacketLayout:
    """How a flat model of ``numel`` elements is cut into ``[n_servers, packets_per_block, elems_per_packet]``.

    ``packets_per_block`` is the fewest packets of at most ``packet_bytes`` that hold a block of
    ``ceil(numel / n_servers)`` elements; then ``elems_per_packet`` is shrunk to the fewest elements
    that still hold the model, so every packet has the same size and padding is under ``S * P``.

    With ``power_of_two_blocks`` (for the Hadamard transform of :mod:`pl_lossy.round.aggregation`) a block is
    ``2^m >= ceil(numel / n_servers)`` elements in ``2^a`` packets of ``2^b`` elements, the largest power
    of two that fits ``packet_bytes``: up to twice the elements, in smaller packets.
    """

    numel: int
    n_servers: int
    packets_per_block: int
    elems_per_packet: int

    @classmethod
    def for_model(cls, numel: int, n_servers: int, packet_bytes: int = 1400, power_of_two_blocks: bool = False) -> "PacketLayout":
        if numel < 1:
            raise ValueError(f"the model has no elements to exchange (numel={numel})")
        if n_servers < 1:
            raise ValueError(f"n_servers must be >= 1, got {n_servers}")
        max_elems = packet_bytes // WIRE_BYTES_PER_ELEM
        if max_elems < 1:
            raise ValueError(f"packet_bytes must be at least {WIRE_BYTES_PER_ELEM}, got {packet_bytes}")
        block = math.ceil(numel / n_servers)
        if power_of_two_blocks:
            block = 1 << (block - 1).bit_length()
            elems = min(block, 1 << (max_elems.bit_length() - 1))
            return cls(numel, n_servers, block // elems, elems)
        packets = math.ceil(block / max_elems)
        elems = math.ceil(numel / (n_servers * packets))
        return cls(numel, n_servers, packets, elems)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n_servers, self.packets_per_block, self.elems_per_packet)

    @property
    def padded_numel(self) -> int:
        return self.n_servers * self.packets_per_block * self.elems_per_packet

    @property
    def packet_bytes(self) -> int:
        """Payload bytes of every packet on the wire."""
        return self.elems_per_packet * WIRE_BYTES_PER_ELEM


def server_counts(up: Tensor) -> Tensor:
    """``c[j, p] = sum_i up[i, j, p]``: how many workers' copies of packet p reached server j. ``[S, P]``."""
    return up.sum(dim=0, dtype=torch.int32)


def uplink_weights(up_row: Tensor, counts: Tensor, out: Tensor) -> Tensor:
    """``w[j, p] = up[i, j, p] / c[j, p]`` for one worker's row ``up_row = up[i]``; 0 where not delivered.

    Summing ``w_i * blocks_i`` over workers gives each server the mean of the packets it received.
    """
    out.copy_(counts).reciprocal_()  # c == 0 gives inf, masked out below: up is False there
    return out.masked_fill_(~up_row, 0.0)


def scale_blocks_(blocks: Tensor, weights: Tensor) -> Tensor:
    """``blocks[j, p, :] *= w[j, p]``: the round's one dense pass, in place (about half the cost of a copy)."""
    return blocks.mul_(weights.unsqueeze(-1))


def copy_packets(dst: Tensor, src: Tensor, packets: Tensor) -> Tensor:
    """``dst[j, p] = src[j, p]`` for the flat packet indices ``j * P + p`` in ``packets``. In place, sparse."""
    if packets.numel():
        e = dst.shape[-1]
        dst.view(-1, e).index_copy_(0, packets, src.view(-1, e).index_select(0, packets))
    return dst


def silent_packets(counts: Tensor) -> Tensor:
    """Flat packet indices where ``c[j, p] == 0``: no worker reached server j with packet p.

    Only dedicated servers can be silent (a co-located server always holds its own copy); a silent
    server sends its previous block instead of an average.
    """
    return torch.nonzero(counts.reshape(-1) == 0).squeeze(1)


def lost_packets(down_row: Tensor) -> Tensor:
    """Flat packet indices ``j * P + p`` where ``down[j, i, p]`` is False, for ``down_row = down[:, i]``.

    At those packets worker i keeps its own values (:func:`copy_packets` from its pre-round blocks).
    """
    return torch.nonzero(~down_row.reshape(-1)).squeeze(1)


def rps_round(blocks: Tensor, up: Tensor, down: Tensor, server_blocks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One RPS round for all workers in one process (the sum over workers stands in for all_reduce).

    ``blocks``: ``[W, S, P, E]``; ``up``: bool ``[W, S, P]``; ``down``: bool ``[S, W, P]``;
    ``server_blocks``: ``[S, P, E]``, the dedicated servers' previous blocks (None: co-located, where
    every server always holds its own copy). Returns ``(new_blocks, sent)`` where ``sent`` is what
    each server sent down (its average, or its previous block where silent).
    """
    counts = server_counts(up)
    weights = torch.empty(counts.shape, dtype=blocks.dtype)
    sent = torch.zeros_like(blocks[0])
    for i in range(blocks.shape[0]):
        sent += scale_blocks_(blocks[i].clone(), uplink_weights(up[i], counts, weights))
    if server_blocks is not None:
        copy_packets(sent, server_blocks, silent_packets(counts))
    new = sent.expand_as(blocks).clone()
    for i in range(blocks.shape[0]):
        copy_packets(new[i], blocks[i], lost_packets(down[:, i]))
    return new, sent
