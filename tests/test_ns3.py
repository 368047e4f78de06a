"""ns-3 in the loop: the real bridge server driving the real simulator."""

import contextlib
import os
import signal
import time
from collections import Counter

import numpy as np
import pytest
import torch
import zmq

from ns3_bridge import protocol
from ns3_bridge.client import BridgeClient, BridgeError
from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape

from ns3_fixtures import RunningBridge, in_order_and_reversed_elsewhere, simulate


def remote(shape, up):
    mask = np.ones((shape.n_workers, shape.n_servers), bool)
    if shape.colocated_servers:
        mask[range(shape.n_servers), range(shape.n_servers)] = False
    return up[mask]


def test_measured_loss_matches_the_configured_rate(bridge):
    shape = RoundShape(0, 4, 4, 3000, 1400)
    (out,) = simulate(bridge, NetworkConfig(loss_rate=0.05, seed=1), [shape])
    for mask in (out.up, out.down.transpose(1, 0, 2)):
        sent = remote(shape, mask)
        lost = sent.size - sent.sum()
        assert abs(lost - 0.05 * sent.size) < 5 * np.sqrt(sent.size * 0.05 * 0.95)
    assert out.stats["drops_link_error"] == (~remote(shape, out.up)).sum() + (~remote(shape, out.down.transpose(1, 0, 2))).sum()
    assert out.stats["drops_queue"] == 0
    assert out.up[0, 0].all() and out.down[1, 1].all()  # co-located: never on the network


def test_same_seed_same_outcomes_in_any_order_and_process(bridge, tmp_path):
    config = NetworkConfig(loss_rate=0.1, seed=3)
    shapes = [RoundShape(r, 3, 3, 400, 1000) for r in range(5)]
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    for a, b in zip(forward, backward):
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down)
        assert a.up_time_s == b.up_time_s and a.stats == b.stats
    assert not np.array_equal(forward[0].up, forward[1].up)
    (reseeded,) = simulate(bridge, NetworkConfig(loss_rate=0.1, seed=4), shapes[:1])
    assert not np.array_equal(reseeded.up, forward[0].up)


def test_lossless_completion_time_is_bytes_over_rate_plus_delays(bridge):
    rate, delay, P, payload = 1e9, 100e-6, 1000, 1400
    (out,) = simulate(bridge, NetworkConfig(link_rate=rate, link_delay=delay), [RoundShape(0, 2, 2, P, payload)])
    wire = (payload + 30) * 8 / rate  # UDP + IPv4 + PPP headers
    expected = P * wire + 2 * delay + wire  # serialize the block, cross two links, forward the last packet
    assert out.up.all() and out.down.all()
    assert out.up_time_s == pytest.approx(expected, rel=0.002)
    assert out.down_time_s == pytest.approx(expected, rel=0.002)


def test_incast_drops_at_a_small_queue_and_not_at_a_large_one(bridge):
    shape = RoundShape(0, 8, 1, 500, 1400)  # 7 workers send to one server at line rate
    (small,) = simulate(bridge, NetworkConfig(queue_packets=10), [shape])
    (large,) = simulate(bridge, NetworkConfig(queue_packets=10_000), [shape])
    assert small.stats["drops_queue"] > 1000 and small.stats["drops_link_error"] == 0
    assert remote(shape, small.up).mean() < 0.5
    assert large.stats["drops_queue"] == 0 and large.up.all()
    assert large.up_time_s > 6.5 * 500 * 1430 * 8 / 10e9  # the server's port drains 7 blocks


def test_queue_disc_fifo_drops_under_incast_too(bridge):
    shape = RoundShape(0, 8, 1, 500, 1400)
    (out,) = simulate(bridge, NetworkConfig(queue_packets=10, queue_disc="fifo"), [shape])
    assert out.stats["drops_queue"] > 1000


def _runs(rows):
    lengths = []
    for row in rows:
        edges = np.diff(np.concatenate([[0], (~row).astype(int), [0]]))
        lengths.extend(np.nonzero(edges == -1)[0] - np.nonzero(edges == 1)[0])
    return np.asarray(lengths)


def test_gilbert_elliott_gives_bursts_with_the_configured_mean(bridge):
    config = NetworkConfig(error_model="gilbert_elliott", ge_p_good_to_bad=0.01, ge_p_bad_to_good=0.2, seed=2)
    shapes = [RoundShape(r, 2, 2, 20000, 200) for r in range(3)]  # one sender per receiver: runs are the chain's
    rows = [m for out in simulate(bridge, config, shapes) for m in (out.up[0, 1], out.up[1, 0], out.down[0, 1], out.down[1, 0])]
    lost = np.mean([(~r).mean() for r in rows])
    assert lost == pytest.approx(config.mean_loss_rate, rel=0.15)  # 0.01 / 0.21 = 4.8%
    assert _runs(rows).mean() == pytest.approx(5.0, rel=0.15)  # 1 / ge_p_bad_to_good
    (iid,) = simulate(bridge, NetworkConfig(loss_rate=config.mean_loss_rate, seed=2), shapes[:1])
    assert _runs([iid.up[0, 1], iid.up[1, 0]]).mean() < 1.2


def test_burst_error_model_matches_its_mean_loss(bridge):
    config = NetworkConfig(error_model="burst", burst_rate=0.005, burst_packets=8, seed=5)
    shapes = [RoundShape(r, 2, 2, 20000, 200) for r in range(2)]
    rows = [m for out in simulate(bridge, config, shapes) for m in (out.up[0, 1], out.up[1, 0], out.down[0, 1], out.down[1, 0])]
    lost = np.mean([(~r).mean() for r in rows])
    assert lost == pytest.approx(config.mean_loss_rate, rel=0.15)  # ~3.9%
    assert _runs(rows).mean() > 5  # losses come in bursts


def test_malformed_messages_get_error_replies_and_the_bridge_keeps_serving(bridge):
    bridge.client.configure(NetworkConfig())  # round shapes are checked once the bridge is configured
    bad = [
        (b"not json", "not a JSON object"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"v": 99, "type": "ping"}', "version 99 is not supported"),
        (b'{"v": 1}', "no string 'type'"),
        (b'{"v": 1, "type": "dance"}', "unknown request type 'dance'"),
        (b'{"v": 1, "type": "configure", "network": {"loss_rate": 3}}', "loss_rate must be a probability"),
        (b'{"v": 1, "type": "configure", "network": {"colour": "red"}}', "unknown network settings ['colour']"),
        (b'{"v": 1, "type": "outcome", "rounds": []}', "non-empty list"),
        (b'{"v": 1, "type": "outcome", "rounds": [{"round": -1, "n_workers": 2, "n_servers": 2, "packets_per_block": 3, "packet_bytes": 100}]}', "'round' must be in"),
        (b'{"v": 1, "type": "outcome", "rounds": [{"round": 0, "n_workers": 2, "n_servers": 3, "packets_per_block": 3, "packet_bytes": 100}]}', "co-located servers need"),
        (b'{"v": 1, "type": "outcome", "rounds": [{"round": 0, "n_workers": "2", "n_servers": 2, "packets_per_block": 3, "packet_bytes": 100}]}', "'n_workers' must be an integer"),
        (b'{"v": 1, "type": "outcome", "rounds": [{"round": 0, "n_workers": 2, "n_servers": 2, "packets_per_block": 3, "packet_bytes": 100, "transport": "quic"}]}', "'transport' must be one of ('udp', 'tcp', 'none')"),
    ]
    with _raw_socket(bridge) as ask:
        for message, expected in bad:
            reply = ask(message)
            assert reply["type"] == "error" and expected in reply["message"], (message, reply)
        assert ask(b'{"v": 1, "type": "ping"}')["type"] == "pong"


def test_fuzzed_requests_each_get_an_error_and_leave_a_valid_round_unchanged(bridge):
    """Bounded fuzzing (seeded, ~2,000 requests, seconds): random bytes, broken JSON, wrong versions,
    types and ranges, extra frames, oversized lists and rounds over the packet budget."""
    import json

    rng = np.random.default_rng(2026)
    config = NetworkConfig(loss_rate=0.2, seed=9)
    shape = RoundShape(3, 3, 3, 40, 200)
    before = simulate(bridge, config, [shape])[0]
    valid = {"round": 0, "n_workers": 3, "n_servers": 3, "packets_per_block": 40, "packet_bytes": 200}
    wrong = {key: [-1, 2**40, "3", 3.5, None, True, [], {}] for key in valid}  # every one invalid for its key
    wrong.update(colocated_servers=[None, 1, "yes", []], transport=["quic", 3, None, ""], colour=["red"])

    def broken_round():
        key = str(rng.choice(list(wrong)))
        return {**valid, key: wrong[key][rng.integers(len(wrong[key]))]}

    def message():
        kind = rng.integers(8)
        if kind == 0:
            return [rng.bytes(int(rng.integers(0, 300)))]
        if kind == 1:
            text = json.dumps({"v": 1, "type": "outcome", "rounds": [valid]})
            return [text[: int(rng.integers(1, len(text) - 1))].encode()]
        if kind == 2:
            return [json.dumps({"v": [0, 2, 99, -1, "1", None, 1.5][rng.integers(7)], "type": "ping"}).encode()]
        if kind == 3:
            return [json.dumps({"v": 1, "type": str(rng.choice(["", "Ping", "outcomes", "rm -rf", "x" * 1000]))}).encode()]
        if kind == 4:
            return [json.dumps({"v": 1, "type": str(rng.choice(["outcome", "prefetch"])), "rounds": [broken_round()]}).encode()]
        if kind == 5:
            return [json.dumps({"v": 1, "type": "configure", "network": {"loss_rate": float(rng.uniform(1.01, 9))}}).encode()]
        if kind == 6:
            return [json.dumps({"v": 1, "type": "outcome", "rounds": [valid] * 5000}).encode(), *[rng.bytes(10)] * 3]
        huge = {**valid, "n_workers": 64, "n_servers": 64, "packets_per_block": 20_000}  # 161M packets: over the budget
        return [json.dumps({"v": 1, "type": str(rng.choice(["outcome", "prefetch"])), "rounds": [huge]}).encode()]

    seen = Counter()
    with _raw_socket(bridge) as ask:
        for _ in range(2000):
            reply = ask(*message())
            assert reply["type"] == "error", reply
            seen[reply["message"][:30]] += 1
        huge = {**valid, "n_workers": 64, "n_servers": 64, "packets_per_block": 20_000}
        refused = ask(*protocol.encode({"type": "outcome", "rounds": [huge]}))
    assert "161,280,000 packets, over this bridge's budget" in refused["message"] and "--max-round-packets" in refused["message"]
    assert len(seen) > 8 and bridge.client.ping()["type"] == "pong"
    after = simulate(bridge, config, [shape])[0]
    assert np.array_equal(after.up, before.up) and np.array_equal(after.down, before.down)


@contextlib.contextmanager
def _raw_socket(bridge):
    """``ask(*frames) -> reply header`` over a socket of our own (no client-side checks)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(bridge.endpoint)

    def ask(*parts):
        sock.send_multipart(list(parts))
        return protocol.decode(sock.recv_multipart())[0]

    try:
        yield ask
    finally:
        sock.close(0)


def test_outcome_before_configure_is_an_error(tmp_path):
    fresh = RunningBridge(tmp_path)
    try:
        with pytest.raises(BridgeError, match="not configured"):
            fresh.client.outcomes([RoundShape(0, 2, 2, 10, 100)])
        assert fresh.client.ping()["configured"] is False
    finally:
        fresh.stop()


def test_a_killed_simulator_is_restarted_and_its_round_is_unchanged(bridge):
    config = NetworkConfig(loss_rate=0.2, seed=9)
    shapes = [RoundShape(r, 2, 2, 300, 500) for r in (0, 1)]
    before = simulate(bridge, config, shapes[:1])[0]
    pong = bridge.client.ping()
    os.kill(pong["simulator_pids"][0], signal.SIGKILL)
    time.sleep(0.2)
    after = bridge.client.outcomes(shapes)  # round 1 needs the (restarted) simulator
    assert np.array_equal(after[0].up, before.up)
    assert bridge.client.ping()["simulator_restarts"] == pong["simulator_restarts"] + 1
    bridge.client.configure(NetworkConfig(loss_rate=0.3, seed=9))  # drop the cache: simulate round 1 again
    bridge.client.configure(config)
    again = bridge.client.outcomes(shapes[1:])[0]
    assert np.array_equal(again.up, after[1].up) and np.array_equal(again.down, after[1].down)


def test_a_dead_bridge_is_reported_by_name_within_the_timeout(tmp_path):
    fresh = RunningBridge(tmp_path)
    fresh.client.configure(NetworkConfig())
    fresh.process.kill()
    fresh.process.wait()
    start = time.monotonic()
    with pytest.raises(BridgeError, match=f"bridge at {fresh.endpoint}"):
        fresh.client.outcomes([RoundShape(0, 2, 2, 10, 100)])
    assert time.monotonic() - start < 5
    from ns3_bridge.client import BridgeClient

    orphan = BridgeClient(fresh.endpoint, timeout_s=1.0)  # no process to watch: the timeout catches it
    with pytest.raises(BridgeError, match="did not answer 'ping' within 1 s"):
        orphan.ping()


def test_config_validation_names_the_setting():
    for kwargs, message in [
        (dict(link_rate="fast"), "link_rate must be"),
        (dict(link_delay="-1ms"), "link_delay must be >= 0"),
        (dict(queue_packets=0), "queue_packets must be an integer >= 1"),
        (dict(error_model="gauss"), "error_model must be one of"),
        (dict(topology="ring"), "topology must be one of"),
        (dict(placement="random"), "placement must be one of"),
        (dict(placement=[0, -1]), r"list of each host's leaf \(integers >= 0\)"),
        (dict(placement=[0, 0, 0], hosts_per_leaf=2), "more than hosts_per_leaf=2 hosts on leaf 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            NetworkConfig(**kwargs)
    assert NetworkConfig(link_rate="25Gbps", link_delay="5us").link_rate == 25e9


def test_rate_units_mean_what_they_say_in_ns3_notation():
    """Case matters, as in ns-3's DataRate: b is bits, B is bytes (10GBps = 80 Gb/s)."""
    from ns3_bridge.sim.config import parse_rate

    assert parse_rate("10Gbps") == parse_rate("10Gb/s") == 10e9
    assert parse_rate("10GBps") == parse_rate("10GB/s") == 80e9
    assert parse_rate("100Mbps") == 1e8 and parse_rate("100MBps") == 8e8
    assert parse_rate("5Kbps") == parse_rate("5kbps") == 5e3 and parse_rate("5KBps") == 4e4
    assert parse_rate("64bps") == 64 and parse_rate("8Bps") == 64
    assert parse_rate("2.5e9") == parse_rate(2.5e9) == 2.5e9
    with pytest.raises(ValueError, match="case-sensitive, as in ns-3: Gbps/Mbps/Kbps/bps are bits per second, GBps"):
        parse_rate("10gbps")


# ---------------------------------------------------------------- training over ns-3


def test_fit_over_ns3_on_two_processes(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import digits_model, fit, steps_per_epoch, trace_masks

    model, dm = digits_model()
    network = Ns3Network(loss_rate=0.1, link_rate="1Gbps", seed=0)
    strategy = LossyPSStrategy(network=network, start_method="fork", record_trace=str(tmp_path / "trace.npz"))
    trainer = fit(strategy, model, dm, max_epochs=2, logger=CSVLogger(tmp_path, name="m"), log_every_n_steps=1)
    assert float(trainer.callback_metrics["val_acc"]) > 0.8
    z = trace_masks(tmp_path / "trace.npz")
    assert len(z["rounds"]) == 2 * steps_per_epoch(dm) and z["up_time_s"].min() > 0
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")) if r.get("net/delivered_up")]
    delivered = np.mean([float(r["net/delivered_up"]) for r in rows])
    assert delivered == pytest.approx(0.9, abs=0.03)
    drops = sum(float(r["net/drops_link_error"]) for r in rows)
    assert drops > 0 and all(float(r["net/drops_queue"]) == 0 for r in rows)


class _KillBridge:
    """On rank 0, SIGKILLs the bridge process after a few rounds."""

    def __init__(self, after_rounds=5):
        import pytorch_lightning as pl

        class Callback(pl.Callback):
            def on_train_batch_end(cb, trainer, *args):
                net = trainer.strategy.network
                if trainer.is_global_zero and trainer.strategy.round == after_rounds and net.bridge_pid:
                    os.kill(net.bridge_pid, signal.SIGKILL)

        self.callback = Callback()


def test_killing_the_bridge_mid_fit_fails_the_fit_with_a_clear_error():
    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import digits_model, fit

    model, dm = digits_model()
    strategy = LossyPSStrategy(network=Ns3Network(loss_rate=0.01, timeout_s=30), start_method="fork")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"ns-3 bridge at ipc://\S+ exited"):
        fit(strategy, model, dm, max_epochs=3, callbacks=[_KillBridge().callback])
    assert time.monotonic() - start < 60


def _gone(pid, within_s=10.0):
    """True once ``pid`` has exited (a zombie awaiting its reaper counts as exited) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def test_a_stopped_bridge_fails_the_fit_within_its_timeout_and_is_not_left_behind(tmp_path):
    """SIGSTOP (hung, not dead): the fit fails naming the bridge; the launcher ends rank 0 before it can
    stop the bridge, and the kernel kills the bridge with its parent (no process, no socket file left)."""
    import pytorch_lightning as pl

    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import digits_model, fit

    class StopBridge(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            net = trainer.strategy.network
            if trainer.is_global_zero and trainer.strategy.round == 3 and net.bridge_pid:
                (tmp_path / "bridge.pid").write_text(str(net.bridge_pid))
                (tmp_path / "endpoint").write_text(net._client.endpoint)
                os.kill(net.bridge_pid, signal.SIGSTOP)

    model, dm = digits_model()
    strategy = LossyPSStrategy(network=Ns3Network(loss_rate=0.01, timeout_s=8), start_method="fork")
    start = time.monotonic()
    with pytest.raises(Exception, match=r"ns-3 bridge at ipc://\S+ did not answer"):
        fit(strategy, model, dm, max_epochs=3, callbacks=[StopBridge()])
    assert time.monotonic() - start < 60
    pid = int((tmp_path / "bridge.pid").read_text())
    assert _gone(pid), f"the stopped bridge {pid} is still there"
    endpoint = (tmp_path / "endpoint").read_text()
    assert endpoint.startswith("ipc://@")  # abstract: no socket file to leave behind


def test_missing_ns3_is_one_clear_error(monkeypatch):
    import importlib.util

    from ns3_bridge.sim import loader

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(loader.Ns3Unavailable, match="pip install ns3"):
        loader._ns3_prefix()
    with pytest.raises(loader.Ns3Unavailable, match="'no-such-dist' package is missing"):
        loader._version("no-such-dist")


def test_tcp_delivers_everything_and_is_slower_than_lossy_udp(bridge):
    config = NetworkConfig(loss_rate=0.02, seed=4)
    udp_shape = RoundShape(0, 4, 4, 500, 1400)
    tcp_shape = RoundShape(0, 4, 4, 500, 1400, transport="tcp")
    udp, tcp = simulate(bridge, config, [udp_shape, tcp_shape])
    assert tcp.up.all() and tcp.down.all() and tcp.stats["failed_connections"] == 0
    assert tcp.stats["bytes_received"] == 2 * 12 * 500 * 1400
    assert tcp.stats["drops_link_error"] > 0  # it met losses and recovered
    assert not udp.up.all()
    assert tcp.up_time_s > udp.up_time_s and tcp.down_time_s > udp.down_time_s
    (lossless,) = simulate(bridge, NetworkConfig(seed=4), [tcp_shape])
    assert lossless.up.all() and lossless.stats["drops_link_error"] == 0


def test_tcp_rounds_are_the_same_in_any_order(bridge, tmp_path):
    config = NetworkConfig(loss_rate=0.05, seed=8)
    shapes = [RoundShape(r, 3, 3, 300, 1400, transport="tcp") for r in range(3)]
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    assert [(o.up_time_s, o.down_time_s) for o in forward] == [(o.up_time_s, o.down_time_s) for o in backward]
    assert forward[0].up_time_s != forward[1].up_time_s  # rounds differ by their losses


def test_the_server_refuses_non_loopback_addresses_unless_asked():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ns3_bridge.server", "--endpoint", "tcp://0.0.0.0:5999"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "neither ipc:// nor loopback" in proc.stderr and "--allow-remote" in proc.stderr


def test_removing_a_bridges_ipc_file_keeps_connected_clients_served_and_new_ones_fail_by_name(tmp_path):
    """A bridge you run on a file endpoint: its socket file deleted under it. Connected clients (a training run)
    continue; a new client gets the usual clear error within its timeout."""
    own = RunningBridge(tmp_path)
    try:
        path = own.endpoint[len("ipc://"):]
        os.unlink(path)
        assert own.client.ping()["type"] == "pong"
        newcomer = BridgeClient(own.endpoint, timeout_s=2)
        with pytest.raises(BridgeError, match=r"ns-3 bridge at ipc://\S+ did not answer 'ping' within 2 s"):
            newcomer.ping()
        newcomer.close()
    finally:
        own.stop()


def test_a_remote_bridge_needs_curve_keys_and_answers_only_clients_it_knows(tmp_path):
    """CURVE on a loopback tcp endpoint: the right keys get answers; no keys, or a key the bridge does not
    hold, get nothing (the request times out); --allow-remote without keys refuses to start."""
    import socket
    import subprocess
    import sys

    from ns3_bridge.keys import make_keys

    proc = subprocess.run([sys.executable, "-m", "ns3_bridge.server", "--endpoint", "tcp://0.0.0.0:5999", "--allow-remote"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "needs --curve-keys DIR" in proc.stderr
    made = subprocess.run([sys.executable, "-m", "ns3_bridge.keys", str(tmp_path / "keys")], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0 and "keys made in" in made.stdout, made.stderr
    keys, stranger = tmp_path / "keys", make_keys(tmp_path / "stranger")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    server = subprocess.Popen([sys.executable, "-m", "ns3_bridge.server", "--endpoint", endpoint, "--curve-keys", str(keys),
                               "--parent-pid", str(os.getpid())], stdin=subprocess.DEVNULL)
    try:
        from pl_lossy import Ns3Network
        from pl_lossy.network import RoundSpec

        with Ns3Network(endpoint=endpoint, curve_keys=str(keys), loss_rate=0.2, seed=1, startup_timeout_s=120) as network:
            outcome = network.outcome(RoundSpec(0, 3, 3, 50))
        assert 0.7 < outcome.delivered_fractions(RoundSpec(0, 3, 3, 50))[0] < 0.9
        for client in (BridgeClient(endpoint, timeout_s=3), BridgeClient(endpoint, timeout_s=3, curve_keys=str(stranger))):
            with pytest.raises(BridgeError, match="did not answer"):
                client.ping()
            client.close()
    finally:
        server.terminate()
        server.wait(20)


# ---------------------------------------------------------------- leaf-spine


def _spine_packets(bridge_config, shape):
    """In-process: simulate one round and count packets each spine received (its ports' queues)."""
    from ns3_bridge.sim.simulator import RoundSimulator

    sim = RoundSimulator(bridge_config)
    out = sim.simulate(shape)
    ns = sim.ns
    per_spine = [sum(ns.DynamicCast[ns.PointToPointNetDevice](d).GetQueue().GetTotalReceivedPackets() for d in ports)
                 for ports in sim.topology.spine_ports]
    placement = list(sim.topology.leaf_of_host)
    sim.close()
    return out, per_spine, placement


def test_leaf_spine_oversubscription_drops_where_non_blocking_does_not(bridge):
    shape = RoundShape(0, 8, 8, 400, 1400)  # all-to-all between two racks of 4
    blocking = NetworkConfig(topology="leaf_spine", hosts_per_leaf=4, n_spines=1)  # 4:1
    non_blocking = NetworkConfig(topology="leaf_spine", hosts_per_leaf=4, n_spines=2, fabric_link_rate="20Gbps",
                                 fabric_queue_packets=1000)  # 1:1
    assert blocking.oversubscription == 4.0 and non_blocking.oversubscription == 1.0
    (dropped,) = simulate(bridge, blocking, [shape])
    (clean,) = simulate(bridge, non_blocking, [shape])
    assert dropped.stats["drops_queue"] > 1000 and dropped.stats["drops_link_error"] == 0
    assert clean.stats["drops_queue"] == 0 and clean.up.all() and clean.down.all()


def test_ecmp_spreads_packets_over_the_spines_and_placement_puts_hosts_where_it_says():
    shape = RoundShape(0, 8, 8, 300, 1400)
    cfg = NetworkConfig(topology="leaf_spine", hosts_per_leaf=4, n_spines=3, queue_packets=10_000, fabric_queue_packets=10_000)
    out, per_spine, packed = _spine_packets(cfg, shape)
    cross_rack = 2 * (2 * 4 * 4) * 300  # both phases: each of 16 ordered cross-rack pairs, both directions
    assert sum(per_spine) == cross_rack and min(per_spine) > 0.25 * cross_rack  # ~1/3 each
    assert packed == [0, 0, 0, 0, 1, 1, 1, 1]
    spread_cfg = NetworkConfig(topology="leaf_spine", hosts_per_leaf=4, n_spines=3, placement="spread")
    _, _, spread = _spine_packets(spread_cfg, RoundShape(0, 6, 6, 10, 1400))
    assert spread == [0, 1, 0, 1, 0, 1]
    # explicit: workers, then tenant-only hosts; leaf 1 left empty still exists
    explicit_cfg = NetworkConfig(topology="leaf_spine", hosts_per_leaf=2, n_spines=1, placement=[2, 0, 2, 0, 3],
                                 background_hosts=1)
    out, _, explicit = _spine_packets(explicit_cfg, RoundShape(0, 4, 4, 10, 1400))
    assert explicit == [2, 0, 2, 0, 3] and out.up.all()
    too_few = NetworkConfig(topology="leaf_spine", hosts_per_leaf=2, placement=[0, 1])
    with pytest.raises(ValueError, match="placement lists 2 hosts' leaves, but this fabric has 4 hosts"):
        _spine_packets(too_few, RoundShape(0, 4, 4, 10, 1400))


def test_leaf_spine_rounds_are_the_same_in_any_order(bridge, tmp_path):
    config = NetworkConfig(topology="leaf_spine", hosts_per_leaf=2, n_spines=2, fabric_queue_packets=20, seed=3)
    shapes = [RoundShape(r, 6, 3, 200, 1400) for r in range(3)]
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    for a, b in zip(forward, backward):
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down) and a.stats == b.stats
    assert sum(o.stats["drops_queue"] for o in forward) > 0


@pytest.mark.parametrize("processes, k", [(2, 1), (1, 2)])
def test_resume_over_ns3_continues_the_drop_sequence_and_equals_the_uninterrupted_fit(bridge, tmp_path, processes, k):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import SaveWorkers, digits_model, fit, trace_masks

    def strategy(trace):
        network = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, link_rate="1Gbps", seed=3)
        return LossyPSStrategy(network=network, workers_per_device=k, start_method="fork", record_trace=str(tmp_path / trace))

    kw = dict(devices=processes, limit_train_batches=4, limit_val_batches=1)
    for name in ("full", "resumed"):
        (tmp_path / name).mkdir()
    model, dm = digits_model(momentum=0.9, hidden=(256,))  # 35 packets a block: replicas end apart
    full = SaveWorkers(tmp_path / "full")
    fit(strategy("full.npz"), model, dm, max_epochs=2, callbacks=[full], **kw)
    model, dm = digits_model(momentum=0.9, hidden=(256,))
    fit(strategy("first.npz"), model, dm, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        enable_checkpointing=True, **kw)
    model, dm = digits_model(momentum=0.9, hidden=(256,))
    resumed = SaveWorkers(tmp_path / "resumed")
    fit(strategy("resumed.npz"), model, dm, max_epochs=2, callbacks=[resumed], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **kw)
    a, b = trace_masks(tmp_path / "full.npz"), trace_masks(tmp_path / "resumed.npz")
    assert b["rounds"].tolist() == a["rounds"][4:].tolist() == [4, 5, 6, 7]
    assert np.array_equal(b["up"], a["up"][4:]) and not np.unpackbits(a["up"]).all()  # the same drops, and there were drops
    full_params, _ = full.load(processes)
    resumed_params, _ = resumed.load(processes)
    assert (full_params[0] - full_params[1]).abs().max() > 1e-4
    torch.testing.assert_close(resumed_params, full_params, rtol=0, atol=0)


def test_a_training_rank_killed_mid_fit_fails_the_fit_and_leaves_no_bridge(tmp_path):
    """The other rank must not wait forever in a collective, and rank 0's bridge dies with rank 0."""
    import pytorch_lightning as pl

    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import digits_model, fit

    class KillRankOne(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.is_global_zero and trainer.strategy.round == 2:
                (tmp_path / "bridge.pid").write_text(str(trainer.strategy.network.bridge_pid))
            if trainer.global_rank == 1 and trainer.strategy.round == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    model, dm = digits_model()
    strategy = LossyPSStrategy(network=Ns3Network(loss_rate=0.01, timeout_s=30), start_method="fork")
    start = time.monotonic()
    with pytest.raises(Exception, match="SIGKILL"):
        fit(strategy, model, dm, max_epochs=3, callbacks=[KillRankOne()])
    assert time.monotonic() - start < 60
    assert _gone(int((tmp_path / "bridge.pid").read_text()))


@pytest.mark.parametrize("rule", ["zero_fill", "hadamard"])
def test_gradient_rules_over_bursty_ns3_loss_train_the_same_workers_in_any_layout(bridge, tmp_path, rule):
    """Gilbert-Elliott bursts on the real simulator: the rule applies ns-3's drops to the gradients, and
    2 processes x 1 worker and 1 x 2 end with the same workers (Hadamard signs agree across processes)."""
    from pl_lossy import LossyPSStrategy, Ns3Network, TraceNetwork

    from fits import SaveWorkers, digits_model, fit

    runs = {}
    for processes, k in ((2, 1), (1, 2)):
        name = f"{processes}x{k}"
        (tmp_path / name).mkdir()
        network = Ns3Network(endpoint=bridge.endpoint, error_model="gilbert_elliott", ge_p_good_to_bad=0.02, ge_p_bad_to_good=0.2, seed=5)
        strategy = LossyPSStrategy(network=network, aggregation=rule, workers_per_device=k, start_method="fork",
                                   record_trace=str(tmp_path / f"{name}.npz"))
        model, dm = digits_model(momentum=0.9)
        saver = SaveWorkers(tmp_path / name)
        fit(strategy, model, dm, devices=processes, limit_train_batches=5, limit_val_batches=1, callbacks=[saver])
        runs[name] = saver.load(processes)[0]
    delivered = np.stack([out.up for _, out in TraceNetwork(tmp_path / "2x1.npz").recorded()])
    assert 0.5 < delivered.mean() < 1.0  # bursts dropped packets
    assert (runs["2x1"][0] - runs["2x1"][1]).abs().max() > 1e-4  # and the workers' gradients differed
    torch.testing.assert_close(runs["1x2"], runs["2x1"], rtol=0, atol=1e-6)


def test_a_deadline_below_the_rounds_natural_time_drops_the_late_packets_and_caps_the_phases(bridge, tmp_path):
    config = NetworkConfig(link_rate="1Gbps", link_delay="10us", seed=2)
    natural, bounded = [RoundShape(1, 8, 8, 20, 1400, deadline_s=d) for d in (None, 0.8e-3)]
    (free,) = simulate(bridge, config, [natural])
    (cut,) = simulate(bridge, config, [bounded])
    assert free.up.all() and free.down.all() and free.up_time_s > 1.5e-3 and free.stats["packets_late"] == 0
    assert cut.up_time_s == pytest.approx(0.8e-3) and cut.down_time_s == pytest.approx(0.8e-3)
    lost_up = remote(bounded, ~cut.up).sum()
    assert 0 < lost_up < remote(bounded, cut.up).size
    # nothing else drops here: every packet the deadline cut arrived later (the senders still sent it)
    assert cut.stats["packets_sent"] == free.stats["packets_sent"] and cut.stats["drops_queue"] == 0
    assert cut.stats["packets_late"] == lost_up + remote(bounded, ~cut.down.transpose(1, 0, 2)).sum()
    assert 0 < cut.stats["up_t50_s"] < 0.8e-3 and 0 < cut.stats["down_t50_s"] < 0.8e-3  # what an adaptive deadline reads
    assert "up_t50_s" not in free.stats
    # a sender paces its flows round-robin: what is late is each flow's tail, never a packet before an arrived one
    for flow in remote(bounded, cut.up):
        assert not (np.diff(flow.astype(int)) > 0).any()
    (loose,) = simulate(bridge, config, [RoundShape(1, 8, 8, 20, 1400, deadline_s=1.0)])  # never reached
    assert loose.up.all() and loose.up_time_s == free.up_time_s
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, [RoundShape(r, 8, 8, 20, 1400, deadline_s=0.8e-3)
                                                                                   for r in range(3)])
    for a, b in zip(forward, backward):
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down) and a.stats == b.stats


def test_the_wire_carries_a_deadline_only_when_there_is_one_and_checks_it():
    plain = RoundShape(0, 4, 4, 10, 1400)
    assert "deadline_s" not in protocol.shape_to_dict(plain)  # rounds without one are keyed as before
    bounded = RoundShape(0, 4, 4, 10, 1400, deadline_s=0.002)
    assert protocol.parse_shape(protocol.shape_to_dict(bounded)) == bounded
    for bad, message in ((-1, "must be a number of seconds"), ("soon", "must be a number of seconds"), (True, "must be a number")):
        with pytest.raises(protocol.ProtocolError, match=message):
            protocol.parse_shape({**protocol.shape_to_dict(plain), "deadline_s": bad})
    with pytest.raises(protocol.ProtocolError, match="applies to transport 'udp' only"):
        protocol.parse_shape({**protocol.shape_to_dict(plain), "transport": "tcp", "deadline_s": 0.001})


def test_a_stragglers_uplink_starts_late_and_with_a_deadline_only_it_loses_packets(bridge):
    config = NetworkConfig(link_rate="1Gbps", link_delay="10us", queue_packets=1000, seed=2)
    late = (0, 0, 0, 2_000_000, 0, 0, 0, 0)  # worker 3 computes 2 ms longer than the others
    free, straggling, bounded = simulate(bridge, config, [
        RoundShape(1, 8, 8, 20, 1400), RoundShape(1, 8, 8, 20, 1400, start_offsets_ns=late),
        RoundShape(1, 8, 8, 20, 1400, start_offsets_ns=late, deadline_s=2.5e-3)])
    assert straggling.up.all() and straggling.up_time_s > free.up_time_s + 1.5e-3  # the round waited for it
    others = [w for w in range(8) if w != 3]
    assert bounded.up[others].all() and bounded.up_time_s == pytest.approx(2.5e-3)
    assert 0 < bounded.up[3, others].sum() < bounded.up[3, others].size  # the straggler's tail missed the deadline


def test_a_down_worker_sends_and_receives_nothing_in_its_window_and_rejoins_after(bridge, tmp_path):
    """Worker 2 down in rounds 1 and 2: no flow from or to it (nor its server) crosses the fabric; round 3 is whole again."""
    config = NetworkConfig(link_rate="1Gbps", link_delay="10us", queue_packets=1000, loss_rate=0.0, seed=4)
    shapes = [RoundShape(r, 6, 6, 10, 1400, down_workers=(2,) if r in (1, 2) else None) for r in range(4)]
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    others = [w for w in range(6) if w != 2]
    for r in (1, 2):
        out = forward[r]
        assert not out.up[2, others].any() and not out.up[others, 2].any()  # it sends nothing; its server gets nothing
        assert not out.down[2, others].any() and not out.down[others, 2].any()
        assert out.up[2, 2].all() and out.down[2, 2].all()  # its own block stays its own
        assert out.up[others][:, others].all() and out.down[others][:, others].all()  # the rest is untouched (no loss here)
        # 5 hosts exchange among themselves: 5 x 4 flows a phase instead of 6 x 5
        assert out.stats["packets_sent"] == 2 * 5 * 4 * 10
    for r in (0, 3):
        assert forward[r].up.all() and forward[r].down.all() and forward[r].stats["packets_sent"] == 2 * 6 * 5 * 10
    for a, b in zip(forward, backward):  # the same whatever the order and the process
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down) and a.up_time_s == b.up_time_s


def test_down_workers_cross_the_wire_only_when_set_and_are_checked():
    plain = RoundShape(0, 4, 4, 2, 1400)
    assert "down_workers" not in protocol.shape_to_dict(plain)
    failed = RoundShape(0, 4, 4, 2, 1400, down_workers=(1, 3))
    assert protocol.parse_shape(protocol.shape_to_dict(failed)) == failed
    with pytest.raises(protocol.ProtocolError, match="names worker 4"):
        protocol.parse_shape({**protocol.shape_to_dict(plain), "down_workers": [4]})


def test_a_cut_host_link_loses_everything_it_carries_in_its_window_and_carries_again_after(bridge, tmp_path):
    config = NetworkConfig(link_rate="1Gbps", link_delay="10us", queue_packets=1000, seed=5, link_failures=[["host:2", 1, 3]])
    shapes = [RoundShape(r, 5, 5, 8, 1400) for r in range(4)]
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    others = [0, 1, 3, 4]
    for r in (1, 2):
        out = forward[r]
        assert not out.up[2, others].any() and not out.up[others, 2].any()  # sent, and lost on the cut link
        assert not out.down[2, others].any() and not out.down[others, 2].any()
        assert out.up[np.ix_(others, others)].all() and out.down[np.ix_(others, others)].all()
        assert out.stats["packets_sent"] == forward[0].stats["packets_sent"]  # the senders do not know
        assert out.stats["drops_link_error"] == 2 * 2 * 4 * 8  # both phases, both directions, 4 peers, 8 packets
    for r in (0, 3):
        assert forward[r].up.all() and forward[r].down.all() and forward[r].stats["drops_link_error"] == 0
    for a, b in zip(forward, backward):
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down) and a.up_time_s == b.up_time_s


def test_a_cut_leaf_spine_link_loses_the_packets_ecmp_sends_over_it_and_no_others(bridge):
    config = NetworkConfig(topology="leaf_spine", hosts_per_leaf=2, n_spines=2, link_rate="1Gbps", link_delay="5us",
                           queue_packets=1000, seed=6, link_failures=[["leaf:0-spine:1", 1, 2]])
    whole, cut = simulate(bridge, config, [RoundShape(0, 4, 4, 40, 1400), RoundShape(1, 4, 4, 40, 1400)])
    assert whole.up.all() and whole.down.all()
    rack = {0: 0, 1: 0, 2: 1, 3: 1}
    for i in range(4):
        for j in range(4):
            if rack[i] == rack[j]:  # within a rack: no spine on the way
                assert cut.up[i, j].all() and cut.down[j, i].all()
            else:  # across: every packet sprayed over spine 1 on leaf 0's side is lost, about half
                assert 0.25 < cut.up[i, j].mean() < 0.75 and 0.25 < cut.down[j, i].mean() < 0.75


def test_link_failures_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="link_failures must be a list of \\[link, first_round, last_round\\]"):
        NetworkConfig(link_failures=[["leaf:0-spine:0", 0, 2]])  # a star has no spines
    from ns3_bridge.sim.topology import link_ends

    with pytest.raises(ValueError, match="no link 'host:7': this fabric has hosts 0..3"):
        link_ends(NetworkConfig(link_failures=[["host:7", 0, 2]]), 4, "host:7")
    leaf_spine = NetworkConfig(topology="leaf_spine", hosts_per_leaf=2, n_spines=2)
    with pytest.raises(ValueError, match="leaves 0..1 and spines 0..1"):
        link_ends(leaf_spine, 4, "leaf:0-spine:2")
    from pl_lossy.network import Ns3Network, RoundSpec

    network = Ns3Network(link_failures=[["host:2", 3, 5]], store="off")  # the store key: only the rounds it cuts differ
    spec = RoundSpec(0, 4, 4, 2)
    assert network._key(spec, 2) == Ns3Network(store="off")._key(spec, 2) != network._key(spec, 3)
    with pytest.raises(ValueError, match="no link 'host:4'"):
        Ns3Network(link_failures=[["host:4", 3, 5]]).check_round(spec)


def test_a_cut_leaf_spine_link_with_rerouting_loses_nothing_the_other_spine_carries_it_and_slower(bridge, tmp_path):
    config = NetworkConfig(topology="leaf_spine", hosts_per_leaf=2, n_spines=2, link_rate="1Gbps", link_delay="5us",
                           queue_packets=1000, seed=6, link_failures=[["leaf:0-spine:1", 1, 2]], link_failure_reroute=True)
    shapes = [RoundShape(r, 4, 4, 40, 1400) for r in range(3)]
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    whole, rerouted, after = forward
    assert all(out.up.all() and out.down.all() and out.stats["drops_link_error"] == 0 for out in forward)
    assert rerouted.up_time_s > 1.2 * whole.up_time_s  # leaf 0's traffic shares one spine
    assert after.up_time_s == pytest.approx(whole.up_time_s, rel=0.02)  # the routes are back
    for a, b in zip(forward, backward):
        assert a.up_time_s == b.up_time_s and a.down_time_s == b.down_time_s


def test_the_pongs_simulator_identity_is_checked_and_absent_only_from_older_bridges():
    assert protocol.parse_simulator({"type": "pong", "simulator": "ns3 3.44; sim 0123456789abcdef"}) == "ns3 3.44; sim 0123456789abcdef"
    assert protocol.parse_simulator({"type": "pong"}) is None  # a bridge from before the field
    for wrong in (None, 42, True, "", " ns3 3.44", "ns3\n3.44", "x" * 300, ["ns3"], {"v": 1}):
        with pytest.raises(protocol.ProtocolError, match="'simulator'"):
            protocol.parse_simulator({"type": "pong", "simulator": wrong})


def test_the_bridge_reports_the_identity_of_the_engine_it_runs(bridge):
    """The same notion as the outcome store's: a bridge of this installation reports this machine's identity."""
    from ns3_bridge.server import simulator_identity as bridge_identity
    from pl_lossy.network.outcome_store import simulator_identity

    assert bridge.client.ping()["simulator"] == simulator_identity() == bridge_identity()
    assert bridge.client.simulator == simulator_identity()
    assert bridge_identity("9.99") != bridge_identity()  # another ns-3, another identity
