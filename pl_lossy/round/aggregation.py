"""Loss-tolerant aggregation rules as pure tensor functions: what a round makes of the packets that arrived.

The packet notation is :mod:`pl_lossy.round.rps`'s: ``W`` workers, ``S`` servers, every worker's flat vector
``x_i`` laid out as ``[S, P, E]`` (block ``j`` is server ``j``'s, ``P`` packets of ``E`` elements),
``up[i, j, p]`` and ``down[j, i, p]`` the delivered packets, ``c[j, p] = sum_i up[i, j, p]``.

``rps`` (the paper, :func:`pl_lossy.round.rps.rps_round`) exchanges *models* after every local step. The rules
here exchange *gradients* after the backward pass, before the optimizer steps, so that momentum and
Adam see the aggregated gradient as under DDP; with no drops each equals DDP:

``gradient`` (the paper's ablation)::

    avg[j, p]    = sum_i up[i, j, p] * g_i[j, p] / c[j, p]      (mean of the copies that arrived)
    g_i[j, p]   <- avg[j, p] if down[j, i, p] and c[j, p] > 0 else g_i[j, p]   (a miss keeps its own)

``zero_fill`` (MLT, NSDI'24: a lost packet counts as zeros)::

    sum[j, p]    = sum_i up[i, j, p] * g_i[j, p] / W            (biased towards 0 by the losses)
    g_i[j, p]   <- sum[j, p] if down[j, i, p] else 0

``hadamard`` (OptiReduce, NSDI'25: spread every block before sending): ``zero_fill`` applied to the
blocks in a randomized Hadamard basis, then transformed back::

    T(b)   = H D b / sqrt(n)     D = diag(+-1 signs drawn from (seed, round)), H the n x n Walsh-Hadamard matrix
    T^-1(y) = D H y / sqrt(n)    (H H = n I, D D = I: T is orthogonal)
    g_i   <- T^-1( zero_fill( T(g_1), ..., T(g_W) )_i )          per block of n = P * E = 2^m elements

A lost packet's ``E`` coordinates are zero in the spread basis; back in the gradient's basis its error
``T^-1`` of them is small noise over the whole block instead of a hole of ``E`` zeros (same squared norm,
since ``T`` is orthogonal). Blocks must be powers of two: see ``PacketLayout.for_model(...,
power_of_two_blocks=True)``, whose padding is what this rule costs on the wire.

:func:`gradient_round`, :func:`zero_fill_round` and :func:`hadamard_round` run a rule for all workers in
one process; :class:`~pl_lossy.round.gradient_exchange.GradientExchange` is one process's side of it in a
distributed run (one all_reduce per round, as RPS).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import rps

#: Every rule ``LossyPSStrategy(aggregation=...)`` accepts; the first is the default.
AGGREGATIONS = ("rps", "gradient", "zero_fill", "hadamard")
#: The rules that exchange gradients before the optimizer step (the others exchange models after it).
GRADIENT_RULES = ("gradient", "zero_fill", "hadamard")


def check_aggregation(name: object) -> str:
    """``name`` if it is a known rule; otherwise ValueError in one line."""
    if name not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {name!r}")
    return name  # type: ignore[return-value]


def zero_fill_weights(up_row: Tensor, n_workers: int, out: Tensor) -> Tensor:
    """``w[j, p] = up[i, j, p] / W`` for one worker's row: summing ``w_i * g_i`` gives MLT's server sum."""
    out.copy_(up_row)
    return out.div_(n_workers)


def missed_packets(down_rows: Tensor, counts: Tensor | None = None) -> Tensor:
    """Flat indices ``i * S * P + j * P + p`` (``i`` a row of ``down_rows = down[:, workers].T``, ``[k, S, P]``)
    where worker ``i`` does not get server ``j``'s aggregate of packet ``p``: its downlink was lost, or,
    with ``counts``, no copy reached the server (``c[j, p] = 0``: a silent server has nothing to send)."""
    missed = ~down_rows
    if counts is not None:
        missed = missed | (counts == 0).unsqueeze(0)
    return torch.nonzero(missed.reshape(-1)).squeeze(1)


def gradient_round(grads: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """The ``gradient`` rule for all workers: ``grads`` ``[W, S, P, E]``, ``up`` ``[W, S, P]``, ``down`` ``[S, W, P]``."""
    counts = rps.server_counts(up)
    weights = torch.empty(counts.shape, dtype=grads.dtype)
    avg = sum(rps.scale_blocks_(grads[i].clone(), rps.uplink_weights(up[i], counts, weights)) for i in range(grads.shape[0]))
    out = avg.expand_as(grads).clone()
    E = grads.shape[-1]
    keep = missed_packets(down.transpose(0, 1), counts)
    out.view(-1, E)[keep] = grads.reshape(-1, E)[keep]
    return out


def zero_fill_round(grads: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """The ``zero_fill`` rule for all workers (shapes as :func:`gradient_round`)."""
    W = grads.shape[0]
    weights = torch.empty(up.shape[1:], dtype=grads.dtype)
    total = sum(rps.scale_blocks_(grads[i].clone(), zero_fill_weights(up[i], W, weights)) for i in range(W))
    out = total.expand_as(grads).clone()
    out.view(-1, grads.shape[-1])[missed_packets(down.transpose(0, 1))] = 0
    return out


def hadamard_round(grads: Tensor, up: Tensor, down: Tensor, signs: Tensor) -> Tensor:
    """The ``hadamard`` rule for all workers; ``signs`` ``[S, P * E]`` holds ``+-1 / sqrt(P * E)`` (see :func:`round_signs`)."""
    shape = grads.shape
    flat = grads.reshape(shape[0], shape[1], -1)
    spread = spread_(flat.clone(), signs, torch.empty_like(flat))
    out = zero_fill_round(spread.view(shape), up, down).reshape(flat.shape)
    return unspread_(out, signs, torch.empty_like(flat)).view(shape)


# ---------------------------------------------------------------------- the randomized Hadamard transform


#: Levels of the transform done per pass over memory: one batched product with the 16 x 16 Hadamard matrix
#: (twice as fast as 2 x 2 butterflies on a CPU, where the passes are memory-bound).
RADIX = 16
_small_hadamards: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The ``n x n`` Sylvester Walsh-Hadamard matrix ``H[a, b] = (-1)^popcount(a & b)`` (cached: it is small)."""
    key = (n, dtype, torch.device(device))
    if key not in _small_hadamards:
        bits = torch.arange(n)
        parity = torch.zeros(n, n, dtype=torch.int64)
        both = bits.unsqueeze(1) & bits.unsqueeze(0)
        while bool(both.any()):
            parity ^= both & 1
            both = both >> 1
        _small_hadamards[key] = (1 - 2 * parity).to(dtype=dtype, device=device)
    return _small_hadamards[key]


def fwht(x: Tensor, scratch: Tensor) -> Tensor:
    """``H x`` along the last dimension (``n = 2^m``; ``H`` the Sylvester-ordered Walsh-Hadamard matrix,
    ``H[a, b] = (-1)^popcount(a & b)``, unnormalized) in ``ceil(m / 4)`` passes between ``x`` and
    ``scratch`` (same shape; both are overwritten): ``H_n = H_r (x) ... (x) H_r``, so each pass applies
    ``H_16`` along one group of 4 bits of the index. Returns whichever of the two holds the result."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    src, dst, h = x, scratch, 1
    while h < n:
        r = min(RADIX, n // h)
        H = hadamard_matrix(r, x.dtype, x.device)
        if h == 1:  # the lowest bits: rows of r contiguous elements times H (symmetric)
            torch.matmul(src.view(*lead, n // r, r), H, out=dst.view(*lead, n // r, r))
        else:
            torch.matmul(H, src.view(*lead, n // (r * h), r, h), out=dst.view(*lead, n // (r * h), r, h))
        src, dst, h = dst, src, h * r
    return src


def spread_(x: Tensor, signs: Tensor, scratch: Tensor) -> Tensor:
    """``x <- H D x / sqrt(n)`` in place (``signs`` holds the diagonal of ``D / sqrt(n)``, broadcast over ``x``)."""
    x.mul_(signs)
    result = fwht(x, scratch)
    if result is not x:
        x.copy_(result)
    return x


def unspread_(y: Tensor, signs: Tensor, scratch: Tensor) -> Tensor:
    """``y <- D H y / sqrt(n)`` in place: the inverse of :func:`spread_` with the same ``signs``."""
    return torch.mul(fwht(y, scratch), signs, out=y)


def round_seed(seed: int, round_index: int) -> int:
    """A 63-bit generator seed every rank derives from ``(seed, round)`` alone."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, round_index]).generate_state(1, np.uint64)[0]) >> 1


def round_signs(seed: int, round_index: int, out: Tensor, generator: torch.Generator) -> Tensor:
    """Fill ``out`` (``[..., n]``) with ``+-1 / sqrt(n)``, each sign a fair coin drawn from ``(seed, round)``,
    in place on ``out``'s device (``generator`` must live there): the same on every rank of a run."""
    n = out.shape[-1]
    generator.manual_seed(round_seed(seed, round_index))
    out.uniform_(generator=generator).ge_(0.5)  # 1.0 or 0.0; five times faster than bernoulli_ on CPU
    return out.mul_(2.0 / math.sqrt(n)).sub_(1.0 / math.sqrt(n))
