"""How long a round's local step takes on the simulated clock.

A round advances the clock by ``compute + up + down``; the network gives the two phase times, this
module the first. Three models, picked by the strategy's ``compute_time_s``:

- ``"flops"`` (the default): the FLOPs of one worker's step (forward and backward, counted once with
  :class:`torch.utils.flop_counter.FlopCounterMode` on the first step, matrix products and
  convolutions) divided by ``device_flops``, the sustained rate of one simulated worker's device.
  A pure function of the model, the batch shape and ``device_flops``: the same on every run.
- a number: that many seconds every round (also reproducible).
- ``"measured"``: the slowest process's wall-clock time from its first training step after a round
  to the round; changes from run to run (and on CUDA reads a value back from the device each round).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

COMPUTE_MODELS = ("flops", "measured")


class ComputeModel:
    """The simulated compute time of every round.

    Args:
        compute_time_s: ``"flops"``, ``"measured"`` (``None`` is read as ``"measured"``) or seconds (>= 0).
        device_flops: FLOP/s of one simulated worker's device, for ``"flops"``.
    """

    def __init__(self, compute_time_s: Union[float, str, None] = "flops", device_flops: float = 1e12) -> None:
        if compute_time_s is None:
            compute_time_s = "measured"
        if isinstance(compute_time_s, str) and compute_time_s not in COMPUTE_MODELS:
            try:
                compute_time_s = float(compute_time_s)
            except ValueError:
                raise ValueError(
                    f"compute_time_s must be one of {COMPUTE_MODELS} or a number of seconds, got {compute_time_s!r}"
                ) from None
        if isinstance(compute_time_s, bool) or not isinstance(compute_time_s, (str, int, float)):
            raise ValueError(f"compute_time_s must be one of {COMPUTE_MODELS} or a number of seconds, got {compute_time_s!r}")
        if not isinstance(compute_time_s, str) and not (math.isfinite(compute_time_s) and compute_time_s >= 0):
            raise ValueError(f"compute_time_s must be >= 0 seconds, got {compute_time_s}")
        if isinstance(device_flops, bool) or not isinstance(device_flops, (int, float)) or not device_flops > 0:
            raise ValueError(f"device_flops must be a positive number (FLOP/s), got {device_flops!r}")
        self.kind = compute_time_s if isinstance(compute_time_s, str) else "fixed"
        self.fixed_s = None if isinstance(compute_time_s, str) else float(compute_time_s)
        self.device_flops = float(device_flops)
        self.step_flops: Optional[float] = None  # "flops": one worker's step, once counted

    def fresh(self) -> "ComputeModel":
        """The same model with nothing counted yet: what a new fit starts from (a second fit may train another model)."""
        kind = self.fixed_s if self.kind == "fixed" else self.kind
        return ComputeModel(kind, self.device_flops)

    @property
    def counting(self) -> bool:
        """Whether the next step must be counted (``"flops"``, not counted yet)."""
        return self.kind == "flops" and self.step_flops is None

    def round_time_s(self, measured_s: Callable[[], float]) -> float:
        """This round's compute time; ``measured_s`` is only called by ``"measured"``."""
        if self.kind == "fixed":
            return self.fixed_s
        if self.kind == "flops":
            if self.step_flops is None:
                raise RuntimeError("compute_time_s='flops': no step was counted before the round (a round with no optimizer step?)")
            return self.step_flops / self.device_flops
        return measured_s()

    def describe(self) -> dict[str, Any]:
        """For summary.json and checkpoints."""
        out: dict[str, Any] = {"model": self.kind}
        if self.kind == "fixed":
            out["per_round_s"] = self.fixed_s
        if self.kind == "flops":
            out.update(device_flops=self.device_flops, step_flops=self.step_flops)
            out["per_round_s"] = None if self.step_flops is None else self.step_flops / self.device_flops
        return out


def check_stragglers(compute_jitter: Any, slow_workers: Any, compute: "ComputeModel") -> tuple[float, tuple[tuple[int, float], ...]]:
    """``compute_jitter`` and ``slow_workers`` checked (worker indices against the worker count at setup)."""
    if isinstance(compute_jitter, bool) or not isinstance(compute_jitter, (int, float)) or not compute_jitter >= 0:
        raise ValueError(f"compute_jitter must be a number >= 0 (the lognormal sigma of each worker's compute time), got {compute_jitter!r}")
    slow = dict(slow_workers or {})
    for worker, factor in slow.items():
        if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
            raise ValueError(f"slow_workers maps worker indices (integers >= 0) to factors, got worker {worker!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"slow_workers[{worker}] must be a factor > 0 on its compute time, got {factor!r}")
    if (compute_jitter > 0 or slow) and compute.kind == "measured":
        raise ValueError("stragglers (compute_jitter, slow_workers) need a reproducible compute time: compute_time_s='flops' or seconds")
    return float(compute_jitter), tuple(sorted((int(w), float(f)) for w, f in slow.items()))
