"""Background traffic and learning-class settings, without ns-3: which flows a round has, and validation."""

import numpy as np
import pytest

from ns3_bridge.sim.background import (
    WEB_SEARCH_CDF,
    background_flows,
    background_window_s,
    flow_sizes,
    ideal_exchange_s,
    mean_flow_bytes,
)
from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape

SHAPE = RoundShape(3, 4, 4, 50, 1400)


def test_no_load_no_flows():
    assert len(background_flows(NetworkConfig(), SHAPE, 8)) == 0


def test_flows_are_a_pure_function_of_seed_and_round():
    cfg = NetworkConfig(background_load=0.5, background_window="10ms", link_rate="1Gbps", background_size_scale=0.01)
    a, b = background_flows(cfg, SHAPE, 8), background_flows(cfg, SHAPE, 8)
    for x, y in zip((a.start_ns, a.src, a.dst, a.size_bytes), (b.start_ns, b.src, b.dst, b.size_bytes)):
        assert np.array_equal(x, y)
    other_round = background_flows(cfg, RoundShape(4, 4, 4, 50, 1400), 8)
    other_seed = background_flows(NetworkConfig(**{**cfg.to_dict(), "seed": 1}), SHAPE, 8)
    assert not np.array_equal(a.start_ns[:5], other_round.start_ns[:5])
    assert not np.array_equal(a.start_ns[:5], other_seed.start_ns[:5])


def test_arrivals_offer_the_configured_load_between_distinct_hosts():
    load, hosts, rate, window = 0.3, 8, 1e9, 0.5
    cfg = NetworkConfig(background_load=load, background_window=window, link_rate=rate, background_size_scale=0.01)
    flows = background_flows(cfg, SHAPE, hosts)
    expected = load * hosts * rate / (8 * mean_flow_bytes(cfg)) * window
    assert abs(len(flows) - expected) < 5 * np.sqrt(expected)
    assert np.all(np.diff(flows.start_ns) >= 0) and flows.start_ns[-1] < window * 1e9
    assert np.all(flows.src != flows.dst) and set(flows.src) == set(flows.dst) == set(range(hosts))
    offered = flows.size_bytes.sum() * 8 / window / (hosts * rate)
    assert abs(offered - load) < 0.25 * load  # heavy-tailed sizes: a loose bound


def test_web_search_sizes_follow_their_cdf():
    cfg = NetworkConfig(background_load=0.1)
    sizes = flow_sizes(cfg, np.random.default_rng(0).random(200_000))
    for size, p in WEB_SEARCH_CDF[1:-1]:
        assert abs((sizes <= size).mean() - p) < 0.01
    assert abs(sizes.mean() - mean_flow_bytes(cfg)) < 0.03 * mean_flow_bytes(cfg)
    assert 1.5e6 < mean_flow_bytes(cfg) < 1.8e6  # DCTCP's web search: about 1.6 MB
    scaled = NetworkConfig(background_load=0.1, background_size_scale=0.01)
    assert mean_flow_bytes(scaled) == pytest.approx(mean_flow_bytes(cfg) / 100)


def test_the_default_window_is_the_ideal_exchange_time():
    cfg = NetworkConfig(link_rate="1Gbps")
    # co-located 4x4: each worker sends 3 blocks up, each server 3 blocks down, 50 packets of 1430 B on the wire
    assert ideal_exchange_s(cfg, SHAPE) == pytest.approx(6 * 50 * 1430 * 8 / 1e9)
    assert background_window_s(cfg, SHAPE) == ideal_exchange_s(cfg, SHAPE)
    assert background_window_s(NetworkConfig(background_window="2ms"), SHAPE) == pytest.approx(2e-3)
    assert ideal_exchange_s(cfg, RoundShape(0, 1, 1, 10, 1400)) == 0.0  # nothing crosses the network


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("background_load", 1.0, "background_load must be in [0, 1)"),
        ("background_load", "lots", "background_load must be a number"),
        ("background_flow_sizes", "uniform", "background_flow_sizes must be one of"),
        ("background_size_scale", 0, "background_size_scale must be a number > 0"),
        ("background_hosts", -1, "background_hosts must be an integer >= 0"),
        ("background_window", "0ms", "background_window must be > 0"),
        ("background_window", "soon", "background_window must be a number of seconds"),
        ("learning_class", "yes", "learning_class must be true or false"),
        ("learning_queue_packets", 0, "learning_queue_packets must be an integer >= 1"),
    ],
)
def test_bad_settings_name_what_is_wrong(setting, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        NetworkConfig(**{setting: value})


def test_fixed_size_messages_at_a_rate_in_messages_per_second():
    cfg = NetworkConfig(background_flows_per_s=5000, background_flow_bytes=100_000, background_window="0.5s")
    flows = background_flows(cfg, SHAPE, 16)
    assert abs(len(flows) - 2500) < 5 * np.sqrt(2500)  # 5,000 a second over half a second
    assert set(flows.size_bytes) == {100_000} and mean_flow_bytes(cfg) == 100_000
    assert np.all(flows.src != flows.dst)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(background_flows_per_s=-1), "background_flows_per_s must be a number >= 0"),
        (dict(background_flows_per_s="many"), "background_flows_per_s must be a number >= 0"),
        (dict(background_flows_per_s=10, background_load=0.2), "not both"),
        (dict(background_flow_bytes=0), "background_flow_bytes must be an integer >= 1"),
        (dict(background_flow_bytes=1.5), "background_flow_bytes must be an integer >= 1"),
        (dict(source_drop_rate=1.5), "source_drop_rate must be a probability in \\[0, 1\\]"),
    ],
)
def test_message_and_source_drop_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        NetworkConfig(**settings)
