"""Rank 0's masks for every process, and the check that every process applied the same ones."""

from __future__ import annotations

import zlib
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..network import NetworkModel, RoundOutcome, RoundSpec


def mask_hash(outcome: RoundOutcome) -> float:
    """A 24-bit hash of a round's masks (exact as an fp32 side value), to check every process applies the same."""
    return float(zlib.crc32(np.packbits(outcome.down), zlib.crc32(np.packbits(outcome.up))) & 0xFFFFFF)


def broadcast_outcome(network: NetworkModel, spec: RoundSpec, is_global_zero: bool, device: torch.device) -> RoundOutcome:
    """Rank 0 asks ``network`` for round ``spec`` and broadcasts it as packed bits (one collective); every
    rank returns the same masks and phase times. If rank 0 fails, every rank raises with rank 0's reason
    (instead of the others hanging in the next collective)."""
    n_up = int(np.prod(spec.up_shape))
    n_packed = 2 * ((n_up + 7) // 8)
    payload = np.zeros(17 + n_packed, dtype=np.uint8)  # [ok flag][2 x float64 times][up bits][down bits]
    error: Optional[BaseException] = None
    outcome: Optional[RoundOutcome] = None
    if is_global_zero:
        try:
            outcome = network.outcome(spec).check(spec)
            payload[0] = 1
            payload[1:17] = np.frombuffer(np.asarray([outcome.up_time_s, outcome.down_time_s]).tobytes(), np.uint8)
            payload[17:] = np.concatenate([np.packbits(outcome.up.ravel()), np.packbits(outcome.down.ravel())])
        except BaseException as exc:  # still broadcast, so the other ranks fail instead of hanging
            error = exc
    buf = torch.from_numpy(payload).to(device)
    dist.broadcast(buf, src=0)
    payload = buf.cpu().numpy()
    if payload[0] != 1:
        reason = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(reason, src=0)  # so every rank fails with rank 0's reason
        if error is not None and not isinstance(error, Exception):
            raise error  # KeyboardInterrupt and friends stay what they are
        raise RuntimeError(f"rank 0 could not obtain round {spec.round} from the network {network.describe()}: {reason[0]}") from error
    if outcome is not None:
        return outcome
    times = np.frombuffer(payload[1:17].tobytes(), dtype=np.float64)
    half = n_packed // 2
    up = np.unpackbits(payload[17 : 17 + half], count=n_up).astype(bool).reshape(spec.up_shape)
    down = np.unpackbits(payload[17 + half :], count=n_up).astype(bool).reshape(spec.down_shape)
    return RoundOutcome(up, down, float(times[0]), float(times[1]))


class MaskAgreement:
    """Checks that every process applied the same masks in a round (their hashes ride in the round's
    all_reduce). On CPU at once; on CUDA one round later, from a non-blocking copy, so that a round
    never waits for the device to check it."""

    def __init__(self) -> None:
        self._pending: Optional[tuple[int, Tensor, float, Any]] = None

    def submit(self, round_index: int, hashes: Tensor, own: float) -> None:
        self.flush()
        if hashes.numel() < 2:
            return
        if hashes.device.type != "cuda":
            self._verify(round_index, hashes, own)
            return
        copy = torch.empty(hashes.shape, dtype=hashes.dtype, pin_memory=True)
        copy.copy_(hashes, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (round_index, copy, own, event)

    def flush(self) -> None:
        if self._pending is not None:
            round_index, copy, own, event = self._pending
            self._pending = None
            event.synchronize()
            self._verify(round_index, copy, own)

    @staticmethod
    def _verify(round_index: int, hashes: Tensor, own: float) -> None:
        values = hashes.tolist()
        if any(v != own for v in values):
            raise RuntimeError(
                f"round {round_index}: the processes applied different masks (hashes by process: {[int(v) for v in values]}); "
                "a network model with same_on_every_rank=True must give every process the same outcome for a round"
            )
