"""Simulate once, train many: simulated rounds kept in an SQLite file, keyed by everything that decides them.

A round's outcome is a pure function of the network's settings, the round's shape, its index and the
simulator itself. :class:`OutcomeStore` keeps outcomes under a key hashing all of these (see
:func:`round_key`), so a run replays the rounds an earlier run simulated (another learning rate, model of
the same size, optimizer seed, a rerun, a resumed run) and asks ns-3 only for the missing ones.

- **Where**: ``$PL_LOSSY_STORE`` if set (a path, or ``off``), else ``outcomes.sqlite`` in the user cache
  (``$PL_LOSSY_CACHE``, default ``~/.cache/pl-lossy``). ``Ns3Network(store=...)`` overrides both.
- **Concurrent runs** (a sweep's jobs): WAL mode, one short transaction per round, writers wait for each
  other (``busy timeout``); identical keys hold identical outcomes, so the last writer wins harmlessly.
- **Never wrong**: every entry carries a CRC-32 of its bytes; a damaged or truncated one is deleted and
  the round simulated again. A store that cannot be opened or written (read-only, disk full) is left
  alone after one warning: the run simulates as if there were none.
- **Invalidation**: the key holds the identity of the simulator that simulated the round (the ns-3 version
  and a hash of the bridge's simulation sources, C++ engines included), as that bridge reports it, so a
  changed engine, or a bridge at ``endpoint`` running another one, never serves or receives another's round.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sqlite3
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..cache import cache_dir
from .base import RoundOutcome

log = logging.getLogger(__name__)

#: Bytes per entry besides the packed masks: header length, then a JSON header.
_HEADER = struct.Struct("<I")
SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    key TEXT PRIMARY KEY,      -- round_key(): sha256 of settings, shape, round and simulator
    payload BLOB NOT NULL,     -- encode(): JSON header (shapes, phase times, stats) + packed mask bits
    crc INTEGER NOT NULL,      -- zlib.crc32(payload): a damaged entry is re-simulated, never served
    created REAL NOT NULL,     -- unix time written
    used REAL NOT NULL         -- unix time last served (prune by age)
)"""


def default_path() -> Optional[Path]:
    """``$PL_LOSSY_STORE`` (``off`` turns the store off), else ``outcomes.sqlite`` in the user cache."""
    env = os.environ.get("PL_LOSSY_STORE")
    if env is not None:
        return None if env.strip().lower() in ("off", "none", "") else Path(env).expanduser()
    return cache_dir() / "outcomes.sqlite"


def resolve_path(store: Union[str, os.PathLike, bool, None]) -> Optional[Path]:
    """What ``Ns3Network(store=...)`` means: ``"auto"`` (or True) the default place, ``None``/``"off"``/False
    no store (YAML reads a bare ``off`` as False), else a path."""
    if store is None or store is False or (isinstance(store, str) and store.strip().lower() in ("off", "none", "false", "")):
        return None
    if store is True or (isinstance(store, str) and store.strip().lower() == "auto"):
        return default_path()
    return Path(store).expanduser()


@functools.lru_cache(maxsize=1)
def simulator_identity() -> str:
    """The identity a bridge started from this installation reports (:func:`ns3_bridge.server.simulator_identity`:
    the ns-3 version and a hash of the simulation sources, Python and C++).

    The version is the installed ``ns3`` wheel's, or, where ns-3 is not installed (a GPU machine
    replaying rounds simulated elsewhere), the one this package pins: the same on both machines.
    Rounds of a bridge at another ``endpoint`` are keyed with the identity that bridge reports instead."""
    try:
        version = importlib.metadata.version("ns3")
    except importlib.metadata.PackageNotFoundError:
        version = _pinned_ns3_version()
    from ns3_bridge.server import simulator_identity as bridge_identity

    return bridge_identity(version)


def _pinned_ns3_version() -> str:
    """The ns3 version this package pins: from its installed metadata, else its pyproject.toml (a checkout on
    ``PYTHONPATH``, as on the GPU machine)."""
    try:
        requirements = importlib.metadata.requires("pl-lossy") or []
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        requirements = re.findall(r'"(ns3\s*==[^"]+)"', pyproject.read_text()) if pyproject.is_file() else []
    pins = [r.replace(" ", "") for r in requirements if r.replace(" ", "").startswith("ns3==")]
    return pins[0].split("==", 1)[1].split(";")[0] if pins else "unknown"


def round_key(settings: dict[str, Any], shape: dict[str, Any], round_index: int, simulator: str) -> str:
    """sha256 over the network's settings, the round's shape (without its index), the index and the simulator."""
    blob = json.dumps({"settings": settings, "shape": shape, "round": int(round_index), "simulator": simulator},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def config_settings(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-ready dict (the part of a key that is the network)."""
    return json.loads(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str))


def encode(outcome: RoundOutcome) -> bytes:
    header = json.dumps({
        "up": list(outcome.up.shape), "down": list(outcome.down.shape),
        "up_time_s": outcome.up_time_s, "down_time_s": outcome.down_time_s, "stats": outcome.stats,
    }).encode()
    return _HEADER.pack(len(header)) + header + np.packbits(outcome.up.ravel()).tobytes() + np.packbits(outcome.down.ravel()).tobytes()


def decode(payload: bytes) -> RoundOutcome:
    """Inverse of :func:`encode`; ValueError if the bytes do not hold a whole outcome."""
    (n,) = _HEADER.unpack_from(payload)
    header = json.loads(payload[_HEADER.size : _HEADER.size + n])
    bits = np.frombuffer(payload, dtype=np.uint8, offset=_HEADER.size + n)
    n_up, n_down = int(np.prod(header["up"])), int(np.prod(header["down"]))
    up_bytes = (n_up + 7) // 8
    if bits.size != up_bytes + (n_down + 7) // 8:
        raise ValueError(f"an entry of {bits.size} mask bytes cannot hold masks {header['up']} and {header['down']}")
    up = np.unpackbits(bits[:up_bytes], count=n_up).astype(bool).reshape(header["up"])
    down = np.unpackbits(bits[up_bytes:], count=n_down).astype(bool).reshape(header["down"])
    return RoundOutcome(up, down, float(header["up_time_s"]), float(header["down_time_s"]), dict(header["stats"]))


@dataclasses.dataclass
class StoreCounts:
    hits: int = 0          # rounds served from the store
    misses: int = 0        # rounds simulated (not stored, or damaged)
    damaged: int = 0       # entries that failed their checksum (deleted, re-simulated)
    written: int = 0       # rounds stored by this run


class OutcomeStore:
    """One SQLite file of simulated rounds; see the module docstring. Never raises on I/O trouble:
    after one warning it behaves as a store that holds nothing and keeps nothing."""

    def __init__(self, path: Union[str, os.PathLike], busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.counts = StoreCounts()
        self._db: Optional[sqlite3.Connection] = None
        self._broken: Optional[str] = None
        self._busy_timeout_s = busy_timeout_s

    @property
    def usable(self) -> bool:
        return self._broken is None

    def _disable(self, what: str, error: BaseException) -> None:
        if self._broken is None:
            self._broken = f"{what}: {error}"
            log.warning("outcome store %s %s: %s; simulating every round instead (set network.store=off to silence this)",
                        self.path, what, error)
        self.close()

    def _connection(self) -> Optional[sqlite3.Connection]:
        if self._db is None and self._broken is None:
            deadline = time.monotonic() + self._busy_timeout_s
            while True:
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=NORMAL")
                    db.execute(SCHEMA)
                    self._db = db
                    break
                except sqlite3.OperationalError as error:
                    # two runs creating the store at once: switching a new file to WAL can be refused
                    # at once (SQLite's deadlock avoidance skips the busy wait): try again
                    if "locked" in str(error) and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    self._disable("cannot be opened", error)
                    break
                except (OSError, sqlite3.Error) as error:
                    self._disable("cannot be opened", error)
                    break
        return self._db

    def get(self, key: str) -> Optional[RoundOutcome]:
        """The stored outcome, or None (not stored, damaged, or no usable store). Counts a hit or a miss."""
        db = self._connection()
        row = None
        if db is not None:
            try:
                row = db.execute("SELECT payload, crc FROM outcomes WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as error:
                self._disable("cannot be read", error)
        if row is not None:
            payload, crc = bytes(row[0]), row[1]
            try:
                if zlib.crc32(payload) != crc:
                    raise ValueError("checksum mismatch")
                outcome = decode(payload)
            except (ValueError, KeyError, struct.error, json.JSONDecodeError) as error:
                self.counts.damaged += 1
                log.warning("outcome store %s: a damaged entry (%s) is simulated again", self.path, error)
                self._execute("DELETE FROM outcomes WHERE key = ?", (key,))
            else:
                self.counts.hits += 1
                self._execute("UPDATE outcomes SET used = ? WHERE key = ?", (time.time(), key))
                return outcome
        self.counts.misses += 1
        return None

    def contains(self, key: str) -> bool:
        db = self._connection()
        if db is None:
            return False
        try:
            return db.execute("SELECT 1 FROM outcomes WHERE key = ?", (key,)).fetchone() is not None
        except sqlite3.Error as error:
            self._disable("cannot be read", error)
            return False

    def put(self, key: str, outcome: RoundOutcome) -> None:
        payload = encode(outcome)
        now = time.time()
        if self._execute("INSERT OR REPLACE INTO outcomes (key, payload, crc, created, used) VALUES (?, ?, ?, ?, ?)",
                         (key, payload, zlib.crc32(payload), now, now)):
            self.counts.written += 1

    def _execute(self, sql: str, args: tuple) -> bool:
        db = self._connection()
        if db is None:
            return False
        try:
            db.execute(sql, args)
            return True
        except sqlite3.Error as error:
            self._disable("cannot be written", error)
            return False

    def summary(self) -> dict[str, Any]:
        """What this run did with the store, and the store's size (for logs and summary.json)."""
        out: dict[str, Any] = {"path": str(self.path), **dataclasses.asdict(self.counts)}
        if self._broken:
            out["unusable"] = self._broken
        else:
            out.update(self.size())
        return out

    def size(self) -> dict[str, int]:
        """``rounds`` stored, ``bytes`` they take (payloads and keys: the same for the same contents, 0 with no
        rounds), and ``file``, the bytes on disk (database and write-ahead log: free pages and an unmerged log
        make it vary, so it is reported apart)."""
        size = {"rounds": 0, "bytes": 0}
        db = self._connection()
        if db is not None:
            try:
                size = self._measure(db, float("inf"))
            except sqlite3.Error:
                pass
        files = [self.path, self.path.with_name(self.path.name + "-wal")]
        return {**size, "file": sum(f.stat().st_size for f in files if f.exists())}

    @staticmethod
    def _measure(db: sqlite3.Connection, cutoff: float) -> dict[str, int]:
        """Rounds last served before ``cutoff`` (unix time) and their bytes (payload plus key)."""
        rounds, size = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + LENGTH(key)), 0) FROM outcomes "
                                  "WHERE used < ?", (cutoff,)).fetchone()
        return {"rounds": int(rounds), "bytes": int(size)}

    def prune(self, older_than_s: Optional[float] = None) -> int:
        """Delete entries not served for ``older_than_s`` seconds (all with None); returns how many went."""
        return self.prune_rounds(older_than_s)["rounds"]

    def prune_rounds(self, older_than_s: Optional[float] = None) -> dict[str, int]:
        """:meth:`prune`, returning the ``rounds`` deleted and the ``bytes`` they took (see :meth:`size`),
        counted in the same transaction as the deletion. The file shrinks too (checkpoint, VACUUM)."""
        db = self._connection()
        if db is None:
            return {"rounds": 0, "bytes": 0}
        cutoff = time.time() - older_than_s if older_than_s is not None else float("inf")
        db.execute("BEGIN IMMEDIATE")  # no writer slips a round in between counting and deleting
        try:
            gone = self._measure(db, cutoff)
            db.execute("DELETE FROM outcomes WHERE used < ?", (cutoff,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        return gone

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass

    def describe(self) -> str:
        c = self.counts
        size = self.size() if self.usable else {"rounds": 0, "bytes": 0}
        state = f" (unusable: {self._broken})" if self._broken else ""
        return (f"outcome store {self.path}{state}: {c.hits} rounds replayed, {c.misses} simulated, {c.written} written, "
                f"{c.damaged} damaged; it holds {size['rounds']:,} rounds ({_human(size['bytes'])})")


def _human(n_bytes: int) -> str:
    if n_bytes < 1e3:
        return f"{n_bytes:,} B"
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"


def _held(size: dict[str, int]) -> str:
    """``22 rounds, 218 kB``: what the rounds take (see :meth:`OutcomeStore.size`)."""
    return f"{size['rounds']:,} rounds, {_human(size['bytes'])}"


PRUNE_NEEDS = "prune needs --older-than DAYS (rounds not used for that many days) or --all (every round); nothing deleted"


def _import_trace(trace_path: Path, path: Path) -> int:
    """Every round of a trace into the store at ``path`` (an entry already there under its key stays as it is)."""
    from .trace import TraceNetwork

    if not trace_path.is_file():
        print(f"error: no trace at {trace_path} (record one with strategy.record_trace=PATH)", file=sys.stderr)
        return 2
    from .trace import ANALYTIC_KEY

    try:
        entries = list(TraceNetwork(trace_path).store_entries())
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if any(key.startswith(ANALYTIC_KEY) for key, _ in entries):
        print(f"error: {trace_path} records an analytic network (no store serves its rounds: it computes them); "
              "only traces of ns-3 runs are imported", file=sys.stderr)
        return 2
    store = OutcomeStore(path)
    distinct = dict(entries)  # a fidelity=reuse run's trace holds each simulated round many times, under its key
    new = [(key, out) for key, out in distinct.items() if not store.contains(key)]
    for key, out in new:
        store.put(key, out)
    size = store.size()
    store.close()
    repeated = f" ({len(entries):,} rounds in the trace)" if len(distinct) < len(entries) else ""
    print(f"imported {len(new):,} of {len(distinct):,} rounds from {trace_path}{repeated} ({len(distinct) - len(new):,} were there); "
          f"{path}: {_held(size)}")
    return 0 if store.usable else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``pl-lossy store [show|prune|import TRACE] [--path P] [--older-than DAYS | --all]``. ``prune`` deletes nothing
    unless told what (exit 2 with one line saying what to add), then prints what it deleted and what is left;
    ``import`` puts a trace's rounds (store entries, ``record_trace=``) into the store under their own keys."""
    p = argparse.ArgumentParser(prog="pl-lossy store", description="The outcome store of simulated ns-3 rounds.")
    p.add_argument("action", nargs="?", choices=("show", "prune", "import"), default="show")
    p.add_argument("trace", nargs="?", type=Path, help="import: a trace recorded with strategy.record_trace")
    p.add_argument("--path", type=Path, help="the store (default: $PL_LOSSY_STORE, else the user cache's outcomes.sqlite)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--older-than", type=float, metavar="DAYS", help="prune: the rounds not used for this many days")
    which.add_argument("--all", action="store_true", help="prune: every round")
    args = p.parse_args(argv)
    chosen = args.all or args.older_than is not None
    if args.action == "prune" and not chosen:
        print(f"error: {PRUNE_NEEDS}", file=sys.stderr)
        return 2
    if args.action == "show" and chosen:
        print("error: --older-than and --all choose what `pl-lossy store prune` deletes; `show` takes neither", file=sys.stderr)
        return 2
    if (args.action == "import") != (args.trace is not None):
        print("error: `pl-lossy store import TRACE` takes the path of a trace (strategy.record_trace=...); "
              "show and prune take none", file=sys.stderr)
        return 2
    if args.older_than is not None and not args.older_than >= 0:
        print(f"error: --older-than must be >= 0 days, got {args.older_than}", file=sys.stderr)
        return 2
    path = args.path or default_path()
    if path is None:
        print("the outcome store is off (PL_LOSSY_STORE=off)")
        return 0
    if args.action == "import":
        return _import_trace(args.trace, path)
    if not path.exists():
        print(f"no outcome store at {path} (runs create it when they simulate a round)")
        return 0
    store = OutcomeStore(path)
    if args.action == "prune":
        gone = store.prune_rounds(None if args.all else args.older_than * 86400)
        which_rounds = "" if args.all else f" not used for {args.older_than:g} day{'' if args.older_than == 1 else 's'}"
        print(f"deleted {gone['rounds']:,} rounds ({_human(gone['bytes'])}){which_rounds}")
    size = store.size()
    print(f"{path}: {_held(size)} (file {_human(size['file'])}); simulator now: {simulator_identity()}")
    store.close()
    return 0 if store.usable else 1
