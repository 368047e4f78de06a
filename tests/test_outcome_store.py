"""The outcome store: simulated rounds kept in SQLite and replayed, never wrong, shared by concurrent runs."""

import logging
import multiprocessing
import sqlite3

import numpy as np

from pl_lossy.network import RoundOutcome
from pl_lossy.network.outcome_store import OutcomeStore, decode, encode, round_key


def _outcome(seed, shape=(3, 3, 5)):
    rng = np.random.default_rng(seed)
    return RoundOutcome(rng.random(shape) > 0.3, rng.random(shape) > 0.3, 1e-3 * seed, 2e-3, {"drops_queue": float(seed)})


def _same(a, b):
    return (np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down) and a.up_time_s == b.up_time_s
            and a.down_time_s == b.down_time_s and a.stats == b.stats)


def test_an_outcome_round_trips_through_its_bytes_and_the_store(tmp_path):
    out = _outcome(7, (4, 2, 13))
    assert _same(decode(encode(out)), out)
    store = OutcomeStore(tmp_path / "s.sqlite")
    assert store.get("k") is None
    store.put("k", out)
    assert _same(store.get("k"), out)
    assert (store.counts.hits, store.counts.misses, store.counts.written) == (1, 1, 1)
    assert store.size()["rounds"] == 1 and store.size()["bytes"] > 0
    store.close()
    assert _same(OutcomeStore(tmp_path / "s.sqlite").get("k"), out)  # persists


def test_the_key_changes_with_every_setting_the_shape_the_round_and_the_simulator():
    base = dict(settings={"loss_rate": 0.1, "seed": 0}, shape={"n_workers": 2}, round_index=3, simulator="ns3 3.44; sim a")
    key = round_key(**base)
    assert round_key(**base) == key
    for change in ({"settings": {"loss_rate": 0.2, "seed": 0}}, {"settings": {"loss_rate": 0.1, "seed": 1}},
                   {"shape": {"n_workers": 4}}, {"round_index": 4}, {"simulator": "ns3 3.44; sim b"}):
        assert round_key(**{**base, **change}) != key, change


def test_a_damaged_entry_is_simulated_again_never_served(tmp_path, caplog):
    store = OutcomeStore(tmp_path / "s.sqlite")
    store.put("a", _outcome(1))
    store.put("b", _outcome(2))
    db = sqlite3.connect(tmp_path / "s.sqlite")
    payload = db.execute("SELECT payload FROM outcomes WHERE key = 'a'").fetchone()[0]
    db.execute("UPDATE outcomes SET payload = ? WHERE key = 'a'", (payload[:-3],))  # truncated, checksum kept
    flipped = bytearray(db.execute("SELECT payload FROM outcomes WHERE key = 'b'").fetchone()[0])
    flipped[-1] ^= 0x10
    db.execute("UPDATE outcomes SET payload = ? WHERE key = 'b'", (bytes(flipped),))  # one mask bit flipped
    db.commit()
    db.close()
    with caplog.at_level(logging.WARNING):
        assert store.get("a") is None and store.get("b") is None
    assert store.counts.damaged == 2 and store.counts.misses == 2
    assert "damaged entry" in caplog.text
    assert not store.contains("a") and not store.contains("b")  # deleted: the next put stores a good one


def test_a_store_that_cannot_be_written_warns_once_and_keeps_nothing(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    store = OutcomeStore(blocker / "outcomes.sqlite")  # its folder cannot be made, even by root
    with caplog.at_level(logging.WARNING):
        assert store.get("k") is None
        store.put("k", _outcome(1))
        assert store.get("k") is None
    assert not store.usable and store.counts.written == 0
    assert caplog.text.count("simulating every round instead") == 1
    assert "unusable" in store.summary()


def _writer(path, first, count, barrier):
    store = OutcomeStore(path)
    barrier.wait()
    for i in range(first, first + count):
        store.put(f"k{i}", _outcome(i))
    store.close()


def test_two_processes_create_and_write_one_store_at_once(tmp_path):
    """Five fresh stores, each created and written by two processes at the same moment (creating one
    raced: SQLite refuses a second process switching a new file to WAL without waiting)."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(5):
        path = tmp_path / f"s{trial}.sqlite"
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_writer, args=(path, first, 60, barrier)) for first in (0, 40)]  # 20 keys in common
        [p.start() for p in procs]
        [p.join(120) for p in procs]
        assert [p.exitcode for p in procs] == [0, 0]
        store = OutcomeStore(path)
        assert store.size()["rounds"] == 100, trial
        for i in range(100):
            assert _same(store.get(f"k{i}"), _outcome(i))
        assert store.counts.damaged == 0


def test_prune_removes_entries_not_used_lately(tmp_path):
    store = OutcomeStore(tmp_path / "s.sqlite")
    for i in range(3):
        store.put(f"k{i}", _outcome(i))
    assert store.prune(older_than_s=3600) == 0
    assert store.prune() == 3 and store.size()["rounds"] == 0


# ---------------------------------------------------------------------- on the real simulator


def _fit(bridge, store, lr, trace, loss_rate=0.1):
    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import digits_model, fit_in_process

    network = Ns3Network(endpoint=bridge.endpoint, loss_rate=loss_rate, seed=4, store=str(store))
    strategy = LossyPSStrategy(network=network, workers_per_device=2, record_trace=str(trace))
    model, dm = digits_model(lr=lr)
    fit_in_process(strategy, model, dm, limit_train_batches=6, limit_val_batches=1, max_epochs=1)
    return network.store_summary()


def test_a_second_run_with_another_learning_rate_replays_every_round_and_sees_the_same_masks(bridge, tmp_path):
    from fits import trace_masks

    store = tmp_path / "outcomes.sqlite"
    first = _fit(bridge, store, 0.1, tmp_path / "first.npz")
    assert (first["hits"], first["misses"], first["written"], first["rounds"]) == (0, 6, 6, 6)
    second = _fit(bridge, store, 0.05, tmp_path / "second.npz")
    assert (second["hits"], second["misses"], second["written"]) == (6, 0, 0)  # no round simulated: the bridge was only asked its identity
    a, b = trace_masks(tmp_path / "first.npz"), trace_masks(tmp_path / "second.npz")
    assert np.array_equal(a["up"], b["up"]) and np.array_equal(a["down"], b["down"])
    assert np.array_equal(a["up_time_s"], b["up_time_s"])
    other = _fit(bridge, store, 0.1, tmp_path / "other.npz", loss_rate=0.2)  # another network: simulated
    assert (other["hits"], other["misses"], other["rounds"]) == (0, 6, 12)


def test_a_store_that_cannot_be_written_still_trains_exactly_as_without_one(bridge, tmp_path, caplog):
    from fits import trace_masks

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        report = _fit(bridge, blocker / "outcomes.sqlite", 0.1, tmp_path / "unwritable.npz")
    assert "unusable" in report and (report["misses"], report["written"]) == (6, 0)
    assert caplog.text.count("simulating every round instead") == 1
    _fit(bridge, "off", 0.1, tmp_path / "none.npz")
    a, b = trace_masks(tmp_path / "unwritable.npz"), trace_masks(tmp_path / "none.npz")
    assert np.array_equal(a["up"], b["up"]) and np.array_equal(a["down"], b["down"])


def test_the_simulator_identity_is_the_same_where_neither_ns3_nor_this_package_is_installed(monkeypatch):
    """The GPU machine runs a checkout on PYTHONPATH without the ns3 wheel: its keys must match this machine's."""
    import importlib.metadata

    from pl_lossy.network import outcome_store

    here = outcome_store.simulator_identity.__wrapped__()

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    monkeypatch.setattr(importlib.metadata, "requires", absent)
    assert outcome_store.simulator_identity.__wrapped__() == here
    assert "unknown" not in here


# ---------------------------------------------------------------------- whose simulator keys a round


class _FakeBridge:
    """A bridge without ns-3 (a thread): its pong reports ``simulator`` (or none, as bridges before the
    field did) and every round it simulates has masks all ``fill``, so a test sees which bridge made a
    round it is served."""

    def __init__(self, tmp_path, simulator, fill):
        import threading
        import uuid

        import zmq

        self.endpoint = f"ipc://{tmp_path}/fake-{uuid.uuid4().hex[:8]}.ipc"
        self.simulator, self.fill = simulator, fill
        self.simulated = 0  # rounds asked for by 'outcome'
        self._sock = zmq.Context.instance().socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)  # the socket is used by this thread only
        self._thread.start()

    def _serve(self):
        from ns3_bridge import protocol

        while not self._stop.is_set():
            if self._sock.poll(50):
                header, _ = protocol.decode(self._sock.recv_multipart())
                self._sock.send_multipart(self._reply(header))
        self._sock.close(0)

    def _reply(self, header):
        from ns3_bridge import protocol
        from ns3_bridge.sim.round import SimulatedRound

        if header["type"] == "ping":
            extra = {} if self.simulator is None else {"simulator": self.simulator}
            return protocol.encode({"type": "pong", "configured": True, **extra})
        if header["type"] != "outcome":
            return protocol.encode({"type": "ok", "queued": 0})
        metas, frames = [], []
        for s in protocol.parse_rounds(header):
            self.simulated += 1
            up = np.full((s.n_workers, s.n_servers, s.packets_per_block), self.fill)
            down = np.full((s.n_servers, s.n_workers, s.packets_per_block), self.fill)
            meta, masks = protocol.encode_round(SimulatedRound(up, down, 1e-3, 1e-3, {}), s.round)
            metas.append(meta)
            frames.extend(masks)
        return protocol.encode({"type": "outcome", "rounds": metas}, frames)

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def _spec(round_index=0):
    from pl_lossy.network import RoundSpec

    return RoundSpec(round=round_index, n_workers=2, n_servers=2, packets_per_block=5, packet_bytes=100)


def _on(bridge, store):
    from pl_lossy import Ns3Network

    return Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=4, store=str(store), timeout_s=10)


def test_a_round_is_keyed_by_the_bridge_that_simulated_it_and_not_served_to_another(tmp_path):
    """A bridge of another ns-3 or engine fills the store; a run on a bridge of this identity must not
    replay those rounds (it simulates its own), while a run on the first bridge again does."""
    a = _FakeBridge(tmp_path, "ns3 3.44; sim aaaaaaaaaaaaaaaa", fill=True)
    b = _FakeBridge(tmp_path, "ns3 3.45; sim bbbbbbbbbbbbbbbb", fill=False)
    store = tmp_path / "s.sqlite"
    try:
        on_a, on_b = _on(a, store), _on(b, store)
        assert on_a.outcome(_spec()).up.all() and a.simulated == 1
        second = on_b.outcome(_spec())
        assert not second.up.any() and b.simulated == 1  # simulated by b, not a's stored round
        assert on_a._key(_spec(), 0) != on_b._key(_spec(), 0)
        assert on_b.store_summary()["hits"] == 0
        again = _on(a, store)
        assert again.outcome(_spec()).up.all() and a.simulated == 1  # the same bridge identity: replayed
        assert again.store_summary()["hits"] == 1
        for network in (on_a, on_b, again):
            network.close()
    finally:
        a.stop()
        b.stop()


def test_a_bridge_that_reports_no_identity_gets_no_stored_rounds_and_stores_none(tmp_path, caplog):
    old = _FakeBridge(tmp_path, None, fill=True)
    store = tmp_path / "s.sqlite"
    try:
        network = _on(old, store)
        with caplog.at_level(logging.WARNING):
            network.outcome(_spec())
            network.outcome(_spec())
        assert old.simulated == 2  # nothing kept, nothing replayed
        assert caplog.text.count("reports no simulator identity") == 1
        network.close()
        assert not store.exists() or OutcomeStore(store).size()["rounds"] == 0
    finally:
        old.stop()


def test_a_run_with_its_own_bridge_replays_stored_rounds_without_starting_it(tmp_path):
    """Its bridge would run this installation's engine: the key is predicted here, no bridge is started."""
    from pl_lossy import Ns3Network

    network = Ns3Network(loss_rate=0.1, seed=4, store=str(tmp_path / "s.sqlite"))
    network.store.put(network._key(_spec(), 0), _outcome(1, (2, 2, 5)))
    assert _same(network.outcome(_spec()), _outcome(1, (2, 2, 5)))
    assert network.bridge_pid is None
    network.close()


def test_a_malformed_simulator_identity_is_a_clear_bridge_error(tmp_path):
    import pytest

    from ns3_bridge.client import BridgeError

    odd = _FakeBridge(tmp_path, 42, fill=True)
    try:
        network = _on(odd, tmp_path / "s.sqlite")
        with pytest.raises(BridgeError, match=f"bridge at {odd.endpoint} sent a malformed reply: pong field 'simulator'"):
            network.outcome(_spec())
        assert odd.simulated == 0  # refused before any round
        network.close()
    finally:
        odd.stop()


# ---------------------------------------------------------------------- `pl-lossy store`: prune asks, sizes are the rounds'


def _filled_store(path, n=3, used=None):
    store = OutcomeStore(path)
    for i in range(n):
        store.put(f"k{i}", _outcome(i))
    if used is not None:  # back-date every entry: not served for a while
        store._connection().execute("UPDATE outcomes SET used = ?", (used,))
    store.close()
    return path


def _rounds(path):
    store = OutcomeStore(path)
    try:
        return store.size()["rounds"]
    finally:
        store.close()


def test_store_prune_without_an_option_refuses_and_deletes_nothing(tmp_path, capsys):
    from pl_lossy.experiment.cli import main

    path = _filled_store(tmp_path / "s.sqlite")
    assert main(["store", "prune", "--path", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--older-than DAYS" in err[0] and "--all" in err[0], err
    assert _rounds(path) == 3


def test_store_prune_all_deletes_every_round_and_says_how_much(tmp_path, capsys):
    from pl_lossy.network.outcome_store import main

    path = _filled_store(tmp_path / "s.sqlite")
    store = OutcomeStore(path)
    held = store.size()["bytes"]
    store.close()
    assert main(["prune", "--all", "--path", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"deleted 3 rounds ({held:,} B" in out or f"deleted 3 rounds ({held / 1e3:.0f} kB" in out, out
    assert _rounds(path) == 0 and "0 rounds, 0 B" in out


def test_store_prune_older_than_keeps_rounds_used_lately(tmp_path, capsys):
    import time

    from pl_lossy.network.outcome_store import main

    path = _filled_store(tmp_path / "s.sqlite", used=time.time() - 10 * 86400)  # 3 rounds, unused 10 days
    store = OutcomeStore(path)
    store.put("fresh", _outcome(9))
    store.close()
    assert main(["prune", "--older-than", "30", "--path", str(path)]) == 0
    assert _rounds(path) == 4 and "deleted 0 rounds" in capsys.readouterr().out
    assert main(["prune", "--older-than", "7", "--path", str(path)]) == 0
    assert _rounds(path) == 1 and "deleted 3 rounds" in capsys.readouterr().out


def test_the_store_size_is_its_rounds_bytes_whatever_the_file_holds(tmp_path):
    store = OutcomeStore(tmp_path / "s.sqlite")
    assert store.size()["rounds"] == 0 and store.size()["bytes"] == 0  # an empty store holds nothing, whatever its file
    outcomes = {f"k{i}": _outcome(i, (4, 4, 40)) for i in range(22)}
    for key, out in outcomes.items():
        store.put(key, out)
    expected = sum(len(encode(out)) + len(key) for key, out in outcomes.items())  # payload + key bytes
    before = store.size()
    store._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    after_checkpoint = store.size()
    store._connection().execute("VACUUM")
    assert before["bytes"] == after_checkpoint["bytes"] == store.size()["bytes"] == expected
    assert store.size()["file"] > 0  # the file, reported apart
    store.prune()
    assert store.size()["rounds"] == 0 and store.size()["bytes"] == 0


def test_a_trace_holds_store_entries_that_a_store_imports_and_a_run_then_replays(bridge, tmp_path, capsys):
    """One persistence scheme: a trace of an ns-3 run is its rounds as store entries under the store's own keys;
    put into a store, a run of the same network is served them (no round simulated) with the same masks and stats."""
    from pl_lossy.network import Ns3Network, RoundSpec, TraceNetwork, TraceRecorder

    specs = [RoundSpec(r, 3, 3, 5) for r in range(3)]
    recorder = TraceRecorder(Ns3Network(endpoint=bridge.endpoint, loss_rate=0.2, seed=5, store="off"), tmp_path / "t.npz")
    recorded = [recorder.outcome(s) for s in specs]
    recorder.close()
    trace = TraceNetwork(tmp_path / "t.npz")
    assert all(_same(trace.outcome(s), out) for s, out in zip(specs, recorded))  # stats too: the store's encoding
    from pl_lossy.network.outcome_store import main

    assert main(["import", str(tmp_path / "t.npz"), "--path", str(tmp_path / "s.sqlite")]) == 0
    assert main(["import", str(tmp_path / "t.npz"), "--path", str(tmp_path / "s.sqlite")]) == 0  # again: nothing new
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("imported 3 of 3 rounds") and printed[1].startswith("imported 0 of 3 rounds")
    replay = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.2, seed=5, store=str(tmp_path / "s.sqlite"))
    try:
        assert all(_same(replay.outcome(s), out) for s, out in zip(specs, recorded))
        assert replay.store_summary()["hits"] == 3 and replay.store_summary()["misses"] == 0
    finally:
        replay.close()


def test_a_damaged_trace_entry_is_refused_naming_its_round(tmp_path):
    from pl_lossy.network import BernoulliNetwork, RoundSpec, TraceNetwork, TraceRecorder

    recorder = TraceRecorder(BernoulliNetwork(0.3, seed=1), tmp_path / "t.npz")
    for r in range(3):
        recorder.outcome(RoundSpec(r, 2, 2, 9))
    recorder.close()
    with np.load(tmp_path / "t.npz") as z:
        data = {k: z[k] for k in z.files}
    data["payload"] = data["payload"].copy()
    data["payload"][data["offsets"][1] + 20] ^= 0x01  # one byte of round 1
    np.savez(tmp_path / "bad.npz", **data)
    bad = TraceNetwork(tmp_path / "bad.npz")
    assert bad.outcome(RoundSpec(0, 2, 2, 9)).up.shape == (2, 2, 9)
    import pytest

    with pytest.raises(ValueError, match=r"bad.npz is damaged at round 1 \(checksum mismatch\)"):
        bad.outcome(RoundSpec(1, 2, 2, 9))
