"""Record a run's round outcomes to a file and replay them exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .base import NetworkModel, RoundOutcome, RoundSpec

_SPEC_KEYS = ("n_workers", "n_servers", "packets_per_block", "packet_bytes", "transport", "colocated_servers")


def _spec_key(spec: RoundSpec) -> dict:
    key = {k: getattr(spec, k) for k in _SPEC_KEYS}
    if spec.deadline_s is not None:  # only then: traces recorded before deadlines existed still match
        key["deadline_s"] = spec.deadline_s
    return key


class TraceRecorder(NetworkModel):
    """Wraps a network model and remembers every outcome it gives; ``close()`` writes them to ``path``.

    The file is an ``.npz``: ``rounds`` [R], packed ``up``/``down`` bits [R, bytes], ``up_time_s``,
    ``down_time_s`` [R], the round sizes as JSON (``spec``) and the network's ``seed``. Stats are not recorded.
    """

    def __init__(self, network: NetworkModel, path: str | os.PathLike) -> None:
        self.network = network
        self.seed = network.seed
        self.path = Path(path)
        self.same_on_every_rank = network.same_on_every_rank
        self.transport = network.transport
        self._spec: dict | None = None
        self._rounds: dict[int, RoundOutcome] = {}

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        out = self.network.outcome(spec)
        key = _spec_key(spec)
        if self._spec is None:
            self._spec = key
        elif key != self._spec:
            raise ValueError(f"a trace holds rounds of one size; got {key} after {self._spec}")
        self._rounds[spec.round] = out
        return out

    def check_round(self, spec: RoundSpec) -> None:
        self.network.check_round(spec)

    def check_run(self, spec: RoundSpec, n_rounds: int) -> None:
        self.network.check_run(spec, n_rounds)

    def prefetch(self, specs) -> None:
        self.network.prefetch(specs)

    def save(self) -> Path | None:
        if not self._rounds:
            return None
        rounds = sorted(self._rounds)
        outs = [self._rounds[r] for r in rounds]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            self.path,
            rounds=np.asarray(rounds, dtype=np.int64),
            up=np.stack([np.packbits(o.up.ravel()) for o in outs]),
            down=np.stack([np.packbits(o.down.ravel()) for o in outs]),
            up_time_s=np.asarray([o.up_time_s for o in outs]),
            down_time_s=np.asarray([o.down_time_s for o in outs]),
            spec=np.asarray(json.dumps(self._spec)),
            seed=np.asarray(self.seed, dtype=np.int64),  # what stragglers' compute times were drawn from
        )
        return self.path

    def close(self) -> None:
        self.save()
        self.network.close()

    def describe(self) -> str:
        return f"{self.network.describe()} recorded to {self.path}"


class TraceNetwork(NetworkModel):
    """Replays the outcomes a :class:`TraceRecorder` saved; asking for a round it lacks is an error."""

    same_on_every_rank = True

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._data: dict | None = None

    def _load(self) -> dict:
        if self._data is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"trace file {self.path} does not exist (record one with record_trace=...)")
            with np.load(self.path) as z:
                self._data = {k: z[k] for k in z.files}
            self._data["spec"] = json.loads(str(self._data["spec"]))
            self._data["index"] = {int(r): i for i, r in enumerate(self._data["rounds"])}
        return self._data

    @property
    def transport(self) -> str:  # the recorded run's
        return self._load()["spec"]["transport"]

    @property
    def seed(self) -> int:  # the recorded run's network seed (stragglers' compute times are drawn from it); 0 in older traces
        return int(self._load().get("seed", 0))

    @property
    def rounds(self) -> np.ndarray:
        return self._load()["rounds"]

    def check_round(self, spec: RoundSpec) -> None:
        data = self._load()
        if _spec_key(spec) != data["spec"]:
            raise ValueError(f"trace {self.path} was recorded for rounds of {data['spec']}, asked for {_spec_key(spec)}")

    def check_run(self, spec: RoundSpec, n_rounds: int) -> None:
        self.check_round(spec)
        missing = sorted(set(range(n_rounds)) - set(self._load()["index"]))
        if missing:
            r = self.rounds
            raise ValueError(
                f"trace {self.path} holds rounds {r.min()}..{r.max()} ({len(r)} in all) but this fit runs {n_rounds} rounds: "
                f"round {missing[0]} is missing (record a longer run, or shorten this one with trainer.max_steps={len(r)})"
            )

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        data = self._load()
        self.check_round(spec)
        i = data["index"].get(spec.round)
        if i is None:
            r = data["rounds"]
            raise ValueError(f"trace {self.path} has no round {spec.round} (it holds rounds {r.min()}..{r.max()}, {len(r)} in all)")
        n_up = int(np.prod(spec.up_shape))
        up = np.unpackbits(data["up"][i], count=n_up).astype(bool).reshape(spec.up_shape)
        down = np.unpackbits(data["down"][i], count=n_up).astype(bool).reshape(spec.down_shape)
        return RoundOutcome(up, down, float(data["up_time_s"][i]), float(data["down_time_s"][i]))

    def describe(self) -> str:
        return f"Trace({self.path})"
