"""Record a run's round outcomes to a file and replay them exactly.

A trace is a run's rounds as outcome-store entries (:mod:`pl_lossy.network.outcome_store`): each round's
outcome in the store's encoding (masks as bits, phase times, stats) with its CRC-32 and its store key. For a
network that keys a store (ns-3) that key is the one its store uses, so ``pl-lossy store import TRACE`` puts a
trace's rounds into a store and a later run of that network replays them from there; every round also keeps
its full spec (sizes, deadline, stragglers, failures), which replay checks field by field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from .base import NetworkModel, RoundOutcome, RoundSpec
from .outcome_store import decode, encode

#: The trace file's format: 3 holds store entries; 2 (packed masks and times, per-round specs) and 1 (the same with
#: one spec for every round) are read for replay.
TRACE_FORMAT = 3
#: How a round's key starts when its network keys no store (an analytic model): no store lookup asks for it.
ANALYTIC_KEY = "trace:"

#: Fields that may differ from one round of a run to the next: an adaptive deadline, the stragglers' nominal
#: compute time (measured or modelled). Every other field is the run's (the same in every round).
_PER_ROUND = ("deadline_s", "compute_s")


def _round_key(spec: RoundSpec) -> dict:
    """Every field of ``spec`` but its index, as JSON gives it back (tuples as lists): what decides its outcome
    besides the network itself."""
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "round"}
    return json.loads(json.dumps(fields))


def _old_round_key(spec: dict) -> dict:
    """A round's key in a trace from before per-round keys (whose ``spec`` held the sizes, and ``deadline_s``
    where it had one): those, and no stragglers or failures, which such a trace did not record (so it
    replays only into rounds without them)."""
    return {**spec, "deadline_s": spec.get("deadline_s"), "compute_jitter": 0.0, "slow_workers": [], "worker_failures": []}


def _run_fields(key: dict) -> dict:
    """The fields of a round's key that are the run's: all but :data:`_PER_ROUND`."""
    return {k: v for k, v in key.items() if k not in _PER_ROUND}


def _differences(recorded: dict, asked: dict) -> tuple[str, str] | None:
    """The fields of ``recorded`` that ``asked`` differs in, as (recorded values, asked values) one line each;
    None where they agree (fields ``recorded`` lacks are not compared)."""
    names = [k for k in recorded if asked.get(k) != recorded[k]]
    if not names:
        return None
    return ", ".join(f"{k}={recorded[k]}" for k in names), ", ".join(f"{k}={asked.get(k)}" for k in names)


class TraceRecorder(NetworkModel):
    """Wraps a network model and remembers every outcome it gives; ``close()`` writes them to ``path``.

    The file is an ``.npz``: ``rounds`` [R]; the rounds as store entries: ``payload`` (their
    :func:`~pl_lossy.network.outcome_store.encode` bytes, one after another), ``offsets`` [R + 1], ``crc`` [R]
    and ``store_keys`` (JSON: each round's store key, the network's own where it has one: ``store_key(spec)``);
    each round's full spec (every :class:`RoundSpec` field but ``round``: sizes, deadline, stragglers, failures)
    as ``round_keys`` (JSON list of the distinct ones) and ``round_key_index`` [R]; the fields common to every
    round as JSON (``spec``); the network's ``seed`` and ``describe()`` (``network``); ``format``. The rounds
    must be of one run: only ``deadline_s`` and ``compute_s`` may vary.
    """

    def __init__(self, network: NetworkModel, path: str | os.PathLike) -> None:
        self.network = network
        self.seed = network.seed
        self.path = Path(path)
        self.same_on_every_rank = network.same_on_every_rank
        self.transport = network.transport
        self._run: dict | None = None  # the run's fields, from the first round
        self._rounds: dict[int, tuple[RoundOutcome, dict, str]] = {}

    def outcome(self, spec: RoundSpec) -> RoundOutcome:
        out = self.network.outcome(spec)
        key = _round_key(spec)
        if self._run is None:
            self._run = _run_fields(key)
        elif (differ := _differences(self._run, _run_fields(key))) is not None:
            raise ValueError(f"a trace holds the rounds of one run; round {spec.round} has {differ[1]} after {differ[0]}")
        self._rounds[spec.round] = (out, key, self._store_key(spec, key))
        return out

    def _store_key(self, spec: RoundSpec, key: dict) -> str:
        """The round's key in an outcome store: the network's own (ns-3's, with its settings and simulator), else a
        hash of what decides an analytic network's outcome (its description, seed, the spec and the round): a key
        no store lookup asks for, which keeps the entry's format the same."""
        own = getattr(self.network, "store_key", None)
        own_key = own(spec) if callable(own) else None
        if own_key is not None:
            return own_key
        blob = json.dumps({"network": self.network.describe(), "seed": self.seed, "spec": key, "round": spec.round}, sort_keys=True)
        return ANALYTIC_KEY + hashlib.sha256(blob.encode()).hexdigest()

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
        outs = [self._rounds[r][0] for r in rounds]
        keys = [self._rounds[r][1] for r in rounds]
        payloads = [encode(o) for o in outs]
        texts = [json.dumps(k, sort_keys=True) for k in keys]
        distinct = sorted(set(texts))  # one per round with an adaptive deadline, else one or two
        where = {text: i for i, text in enumerate(distinct)}
        common = {k: v for k, v in keys[0].items() if all(key[k] == v for key in keys)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            self.path,
            format=np.asarray(TRACE_FORMAT, dtype=np.int64),
            rounds=np.asarray(rounds, dtype=np.int64),
            payload=np.frombuffer(b"".join(payloads), dtype=np.uint8),
            offsets=np.cumsum([0, *map(len, payloads)], dtype=np.int64),
            crc=np.asarray([zlib.crc32(p) for p in payloads], dtype=np.uint32),
            store_keys=np.asarray(json.dumps([self._rounds[r][2] for r in rounds])),
            spec=np.asarray(json.dumps(common)),  # the fields every round shares: what check_round compares
            round_keys=np.asarray(json.dumps([json.loads(text) for text in distinct])),
            round_key_index=np.asarray([where[text] for text in texts], dtype=np.int64),
            seed=np.asarray(self.seed, dtype=np.int64),  # what stragglers' compute times were drawn from
            network=np.asarray(self.network.describe()),
        )
        return self.path

    def close(self) -> None:
        try:
            self.save()
        finally:  # a trace that cannot be written still releases the network (no bridge left behind)
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
            try:
                with np.load(self.path) as z:
                    data = {k: z[k] for k in z.files}
                data["rounds"]
            except (OSError, ValueError, TypeError, AttributeError, KeyError, zipfile.BadZipFile) as exc:
                raise ValueError(f"{self.path} is not a trace (record one with strategy.record_trace=PATH): {type(exc).__name__}") from None
            data["spec"] = json.loads(str(data["spec"]))
            data["index"] = {int(r): i for i, r in enumerate(data["rounds"])}
            if "round_keys" in data:
                distinct = json.loads(str(data["round_keys"]))
                data["keys"] = [distinct[i] for i in data["round_key_index"]]
                data["run"] = {k: v for k, v in data["spec"].items() if k != "compute_s"}  # the setup's spec has none yet
            else:  # a trace from before per-round keys: one key for every round
                old = _old_round_key(data["spec"])
                data["keys"] = [old] * len(data["rounds"])
                data["run"] = old
            self._data = data
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
        """Raise ValueError unless ``spec`` agrees with the recorded run on the fields that do not vary per round
        (all but ``compute_s``, and ``deadline_s`` where it varied, as an adaptive deadline does)."""
        differ = _differences(self._load()["run"], _round_key(spec))
        if differ is not None:
            raise ValueError(f"trace {self.path} was recorded for rounds of {differ[0]}, asked for {differ[1]}")

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
        """Round ``spec.round`` as recorded; ValueError if the trace lacks it or recorded it for another spec
        (a replay into other sizes, deadline, stragglers or failures would give the wrong masks and times)."""
        data = self._load()
        i = data["index"].get(spec.round)
        if i is None:
            r = data["rounds"]
            raise ValueError(f"trace {self.path} has no round {spec.round} (it holds rounds {r.min()}..{r.max()}, {len(r)} in all)")
        differ = _differences(data["keys"][i], _round_key(spec))
        if differ is not None:
            raise ValueError(f"trace {self.path} was recorded for rounds of {differ[0]}, but round {spec.round} asks for {differ[1]}")
        return self._entry(data, i)

    def _entry(self, data: dict, i: int) -> RoundOutcome:
        """The i-th recorded round (a store entry, its CRC checked; or, in older traces, packed masks and times)."""
        if "payload" in data:
            payload = data["payload"][data["offsets"][i] : data["offsets"][i + 1]].tobytes()
            if zlib.crc32(payload) != int(data["crc"][i]):
                raise ValueError(f"trace {self.path} is damaged at round {int(data['rounds'][i])} (checksum mismatch): record it again")
            return decode(payload)
        key = data["keys"][i]
        shape = (key["n_workers"], key["n_servers"], key["packets_per_block"])
        n = int(np.prod(shape))
        up = np.unpackbits(data["up"][i], count=n).astype(bool).reshape(shape)
        down = np.unpackbits(data["down"][i], count=n).astype(bool).reshape(shape[1], shape[0], shape[2])
        return RoundOutcome(up, down, float(data["up_time_s"][i]), float(data["down_time_s"][i]))

    def recorded(self) -> Iterator[tuple[int, RoundOutcome]]:
        """Every recorded round as (round index, outcome), in the order recorded."""
        data = self._load()
        for i, r in enumerate(data["rounds"]):
            yield int(r), self._entry(data, i)

    def store_entries(self) -> Iterator[tuple[str, RoundOutcome]]:
        """Every recorded round as (store key, outcome): what ``pl-lossy store import`` puts into a store.
        ValueError for a trace from before traces held store entries (record it again)."""
        data = self._load()
        if "store_keys" not in data:
            raise ValueError(f"trace {self.path} is of an older format without store keys: record it again to import it")
        for i, key in enumerate(json.loads(str(data["store_keys"]))):
            yield key, self._entry(data, i)

    @property
    def recorded_network(self) -> str:
        """The recorded network's ``describe()`` ("" in older traces)."""
        return str(self._load().get("network", ""))

    def describe(self) -> str:
        return f"Trace({self.path})"
