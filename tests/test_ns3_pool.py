"""The simulation pool and run-ahead: faster, never different."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import torch

from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape

from ns3_fixtures import RunningBridge

CONFIG = NetworkConfig(loss_rate=0.1, queue_packets=20, seed=6)


def same(a, b):
    return all(np.array_equal(x.up, y.up) and np.array_equal(x.down, y.down) and x.up_time_s == y.up_time_s
               for x, y in zip(a, b))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    running = RunningBridge(tmp_path_factory.mktemp("pool"), workers=2)
    running.client.configure(CONFIG)
    yield running
    running.stop()


def test_two_simulation_workers_give_the_same_outcomes_as_one(pool, tmp_path):
    shapes = [RoundShape(r, 4, 2, 300, 1400) for r in range(6)]  # incast on 2 servers: queue drops too
    pooled = pool.client.outcomes(shapes)
    assert len({pid for pid in pool.client.ping()["simulator_pids"]}) == 2
    single = RunningBridge(tmp_path)
    try:
        single.client.configure(CONFIG)
        one_by_one = [single.client.outcomes([s])[0] for s in reversed(shapes)][::-1]
    finally:
        single.stop()
    assert same(pooled, one_by_one)
    assert sum(o.stats["drops_queue"] for o in pooled) > 0 and sum(o.stats["drops_link_error"] for o in pooled) > 0


def test_prefetched_rounds_are_simulated_in_the_background(pool):
    shapes = [RoundShape(r, 3, 3, 200, 1000) for r in range(100, 104)]
    assert pool.client.prefetch(shapes) == 4
    assert pool.client.prefetch(shapes) == 0  # already queued or done
    deadline = time.monotonic() + 60
    while pool.client.ping()["queued"] and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    start = time.monotonic()
    ahead = pool.client.outcomes(shapes)
    assert time.monotonic() - start < 0.5  # served from what was simulated ahead
    pool.client.configure(NetworkConfig(loss_rate=0.2))  # a configure drops every outcome
    pool.client.configure(CONFIG)
    assert same(ahead, pool.client.outcomes(shapes))


def test_a_worker_killed_mid_round_is_restarted_and_the_round_is_unchanged(pool, tmp_path):
    shape = RoundShape(7, 4, 4, 2500, 1400)  # ~60,000 packets: about a second of simulation
    single = RunningBridge(tmp_path)
    try:
        single.client.configure(CONFIG)
        pids = single.client.ping()["simulator_pids"]
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("out", single.client.outcomes([shape])))
        thread.start()
        time.sleep(0.4)
        os.kill(pids[0], signal.SIGKILL)
        thread.join(120)
        assert single.client.ping()["simulator_restarts"] == 1
    finally:
        single.stop()
    assert same(result["out"], pool.client.outcomes([shape]))


def test_run_ahead_and_a_pool_train_exactly_like_on_demand(tmp_path):
    from pl_lossy import LossyPSStrategy, Ns3Network

    from fits import digits_model, fit, flat_params, trace_masks

    results = []
    for kwargs in (dict(), dict(run_ahead=4, sim_workers=2)):
        model, dm = digits_model()
        network = Ns3Network(loss_rate=0.2, seed=1, **kwargs)
        fit(LossyPSStrategy(network=network, start_method="fork", record_trace=str(tmp_path / f"{len(results)}.npz")),
            model, dm)
        results.append(flat_params(model))
    assert torch.equal(results[0], results[1])
    a, b = (trace_masks(tmp_path / f"{i}.npz") for i in range(2))
    assert np.array_equal(a["up"], b["up"]) and np.array_equal(a["down"], b["down"])


def test_pool_settings_are_checked_early():
    from pl_lossy import Ns3Network

    with pytest.raises(ValueError, match="sim_workers must be an integer >= 1"):
        Ns3Network(sim_workers=0)
    with pytest.raises(ValueError, match="run_ahead must be an integer >= 0"):
        Ns3Network(run_ahead=-1)


def test_auto_sizes_the_pool_to_the_cores_training_leaves_free(monkeypatch):
    from pl_lossy import Ns3Network

    for cores, training, pool, ahead in ((16, 2, 14, 14), (2, 1, 1, 1), (2, 2, 1, 0), (2, 4, 1, 0)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cores: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(training))
        network = Ns3Network(sim_workers="auto", run_ahead="auto", store="off")
        network._size_pool()
        assert (network.sim_workers, network.run_ahead) == (pool, ahead), (cores, training)
    explicit = Ns3Network(sim_workers=3, run_ahead="auto", store="off")
    explicit._size_pool()
    assert (explicit.sim_workers, explicit.run_ahead) == (3, 0)  # 2 cores, 4 training processes: none spare
    for bad in ({"sim_workers": "many"}, {"sim_workers": 0}, {"run_ahead": -1}, {"run_ahead": "soon"}):
        with pytest.raises(ValueError, match="must be an integer"):
            Ns3Network(**bad)
