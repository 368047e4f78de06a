"""ns-3 in the loop: background tenants and the learning-traffic class on a shared leaf-spine fabric."""

import numpy as np

from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape

from ns3_fixtures import in_order_and_reversed_elsewhere, simulate

# 4 training hosts + 4 tenant hosts, 2 per rack, one 1 Gb/s spine link per rack (2:1), web-search
# flows at 1/100 of their bytes offering 40% of every host link
DATACENTER = dict(topology="leaf_spine", hosts_per_leaf=2, n_spines=1, link_rate="1Gbps", background_load=0.4,
                  background_size_scale=0.01, background_hosts=4, seed=1)
CLASS = dict(learning_class=True, learning_queue_packets=20)


def rounds(transport, n=3):
    return [RoundShape(r, 4, 4, 50, 1400, transport=transport) for r in range(1, n + 1)]


def mean_fct(outcomes):
    """Flow-weighted mean completion time of every background flow of these rounds."""
    flows = sum(o.stats["background_flows"] for o in outcomes)
    return sum(o.stats["background_fct_mean_s"] * o.stats["background_flows"] for o in outcomes) / flows


def test_background_flows_finish_sooner_with_the_learning_class_than_with_reliable_learning_traffic(bridge):
    alone = simulate(bridge, NetworkConfig(**DATACENTER), rounds("none"))
    lossy = simulate(bridge, NetworkConfig(**DATACENTER, **CLASS), rounds("udp"))
    lossy_unclassed = simulate(bridge, NetworkConfig(**DATACENTER), rounds("udp"))
    reliable = simulate(bridge, NetworkConfig(**DATACENTER), rounds("tcp"))

    flows = [o.stats["background_flows"] for o in alone]
    assert min(flows) > 20
    for way in (lossy, lossy_unclassed, reliable):  # the same tenants' flows every way, all completed
        assert [o.stats["background_flows"] for o in way] == flows
        assert all(o.stats["background_unfinished"] == 0 for o in way)
    assert all(o.up.all() and o.down.all() and o.up_time_s == o.down_time_s == 0 for o in alone)
    assert all(o.up.all() and o.down.all() for o in reliable)
    learning_drop = 1 - np.mean([(o.up.mean() + o.down.mean()) / 2 for o in lossy])
    assert learning_drop > 0.02  # the class makes training packets the ones dropped

    f_alone, f_lossy, f_unclassed, f_reliable = map(mean_fct, (alone, lossy, lossy_unclassed, reliable))
    assert f_lossy < f_reliable and f_lossy < f_unclassed
    # the class removes most of the harm training traffic does to the tenants
    assert f_lossy - f_alone < 0.25 * (f_reliable - f_alone)


def test_same_seed_same_drops_and_background_completion_times(bridge, tmp_path):
    config = NetworkConfig(**{**DATACENTER, "n_spines": 2, "fabric_link_rate": "500Mbps"}, **CLASS)  # ECMP too
    shapes = rounds("udp") + rounds("tcp", 1)
    forward, backward = in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes)
    for a, b in zip(forward, backward):
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down)
        assert a.up_time_s == b.up_time_s and a.down_time_s == b.down_time_s and a.stats == b.stats
    assert sum(o.stats["drops_queue"] for o in forward) > 0
    (reseeded,) = simulate(bridge, NetworkConfig(**{**config.to_dict(), "seed": 2}), shapes[:1])
    assert reseeded.stats["background_fct_mean_s"] != forward[0].stats["background_fct_mean_s"]


# the paper's network experiment in small: 8 hosts on a 1 Gb/s star, 100 KB messages at 10,000 a second
WEB_SERVICE = dict(link_rate="1Gbps", background_flows_per_s=10000.0, background_flow_bytes=100_000, background_window="2ms", seed=3)


def test_the_web_service_finishes_sooner_as_senders_drop_more_learning_packets(bridge):
    shapes = [RoundShape(r, 8, 8, 20, 1400) for r in range(1, 4)]
    by_p = {p: simulate(bridge, NetworkConfig(**WEB_SERVICE, source_drop_rate=p), shapes) for p in (0.0, 0.5, 1.0)}
    flows = [o.stats["background_flows"] for o in by_p[0.0]]
    assert min(flows) >= 10
    for p, outcomes in by_p.items():  # the same messages, all of exactly 100 KB, completed, whatever p is
        assert [o.stats["background_flows"] for o in outcomes] == flows
        assert all(o.stats["background_unfinished"] == 0 for o in outcomes)
        sent = sum(o.stats["packets_sent"] for o in outcomes)
        dropped = sum(o.stats["drops_source"] for o in outcomes)
        assert abs(dropped / (sent + dropped) - p) < 0.06  # the senders drop about p of the learning packets
    remote = ~np.eye(8, dtype=bool)
    assert all(not o.up[remote].any() and not o.down[remote].any() for o in by_p[1.0])  # only own blocks arrive
    fct = {p: mean_fct(outcomes) for p, outcomes in by_p.items()}
    assert fct[1.0] < fct[0.5] < fct[0.0]
