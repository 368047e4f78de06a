"""Analytic network models: rates, determinism, timing, trace record/replay."""

import json

import numpy as np
import pytest

from pl_lossy.network import (
    BernoulliNetwork,
    GilbertElliottNetwork,
    ReliableNetwork,
    RoundOutcome,
    RoundSpec,
    TraceNetwork,
    TraceRecorder,
)


def spec(r=0, W=4, S=4, P=5000, **kw):
    return RoundSpec(round=r, n_workers=W, n_servers=S, packets_per_block=P, **kw)


def remote_up(out, s):
    return out.up[~s.local_pairs()]


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.5])
def test_bernoulli_delivers_the_configured_fraction(rate):
    s = spec()
    out = BernoulliNetwork(drop_rate=rate, seed=3).outcome(s)
    n = remote_up(out, s).size
    lost = n - remote_up(out, s).sum()
    # binomial: within 5 standard deviations
    assert abs(lost - n * rate) <= 5 * np.sqrt(n * rate * (1 - rate)) + 1e-9
    up, down = out.delivered_fractions(s)
    assert abs(up - (1 - rate)) < 0.01 and abs(down - (1 - rate)) < 0.01
    local = s.local_pairs()
    assert out.up[local].all() and out.down.transpose(1, 0, 2)[local].all()


def test_bernoulli_phase_rates_are_separate():
    s = spec()
    out = BernoulliNetwork(drop_rate=0.5, uplink_drop_rate=0.0, downlink_drop_rate=1.0).outcome(s)
    assert out.delivered_fractions(s) == (1.0, 0.0)


@pytest.mark.parametrize("net", [BernoulliNetwork(0.2, seed=7), GilbertElliottNetwork(0.01, 0.2, seed=7)])
def test_outcome_is_a_function_of_seed_and_round(net):
    first = [net.outcome(spec(r, P=300)) for r in range(5)]
    again = [net.outcome(spec(r, P=300)) for r in reversed(range(5))][::-1]
    for a, b in zip(first, again):
        assert np.array_equal(a.up, b.up) and np.array_equal(a.down, b.down)
    assert not np.array_equal(first[0].up, first[1].up)
    other = type(net)(**{**vars_of(net), "seed": 8}).outcome(spec(0, P=300))
    assert not np.array_equal(other.up, first[0].up)


def vars_of(net):
    if isinstance(net, BernoulliNetwork):
        return dict(drop_rate=net.drop_rate)
    return dict(p_good_to_bad=net.p_good_to_bad, p_bad_to_good=net.p_bad_to_good)


def _loss_runs(mask_rows):
    runs = []
    for row in mask_rows:
        lost = ~row
        edges = np.diff(np.concatenate([[0], lost.astype(int), [0]]))
        starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
        runs.extend(ends - starts)
    return np.asarray(runs)


def test_gilbert_elliott_mean_loss_and_bursts():
    net = GilbertElliottNetwork(p_good_to_bad=0.002, p_bad_to_good=0.1, seed=1)
    assert net.mean_loss_rate == pytest.approx(0.002 / 0.102)
    s = spec(W=6, S=6, P=20000)
    lost, total, runs = 0, 0, []
    for r in range(4):
        out = net.outcome(s.__class__(**{**s.__dict__, "round": r}))
        rows = remote_up(out, s)
        lost += (~rows).sum()
        total += rows.size
        runs.append(_loss_runs(rows))
    runs = np.concatenate(runs)
    assert lost / total == pytest.approx(net.mean_loss_rate, rel=0.15)
    assert runs.mean() == pytest.approx(10.0, rel=0.15)  # mean burst 1 / p_bad_to_good
    iid = BernoulliNetwork(drop_rate=net.mean_loss_rate, seed=1).outcome(s)
    assert _loss_runs(remote_up(iid, s)).mean() < 1.1


def test_reliable_delivers_everything_and_times_are_bytes_over_rate():
    s = spec(W=4, S=4, P=10, packet_bytes=1000)
    out = ReliableNetwork(link_rate_bps=1e9, latency_s=1e-3).outcome(s)
    assert out.up.all() and out.down.all()
    # co-located: each host sends 3 remote blocks of 10 kB and its server receives 3
    expected = 3 * 10 * 1000 * 8 / 1e9 + 1e-3
    assert out.up_time_s == pytest.approx(expected) and out.down_time_s == pytest.approx(expected)
    dedicated = spec(W=4, S=2, P=10, packet_bytes=1000, colocated_servers=False)
    out = ReliableNetwork(link_rate_bps=1e9, latency_s=0).outcome(dedicated)
    assert out.up_time_s == pytest.approx(4 * 10 * 1000 * 8 / 1e9)  # a server receives 4 blocks


def test_trace_records_and_replays_exactly(tmp_path):
    path = tmp_path / "t.npz"
    rec = TraceRecorder(BernoulliNetwork(0.3, seed=2), path)
    specs = [spec(r, P=77) for r in range(6)]
    originals = [rec.outcome(s) for s in specs]
    rec.close()
    replay = TraceNetwork(path)
    for s, o in zip(reversed(specs), reversed(originals)):
        got = replay.outcome(s)
        assert np.array_equal(got.up, o.up) and np.array_equal(got.down, o.down)
        assert got.up_time_s == o.up_time_s
    with pytest.raises(ValueError, match="has no round 6"):
        replay.outcome(spec(6, P=77))
    with pytest.raises(ValueError, match="recorded for rounds of"):
        replay.outcome(spec(0, P=78))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TraceNetwork(tmp_path / "missing.npz").outcome(specs[0])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BernoulliNetwork(drop_rate=1.5), "drop_rate must be a probability"),
        (lambda: BernoulliNetwork(drop_rate="x"), "must be a number"),
        (lambda: BernoulliNetwork(link_rate_bps=0), "link_rate_bps must be > 0"),
        (lambda: BernoulliNetwork(seed=-1), "seed must be"),
        (lambda: GilbertElliottNetwork(0, 0), "cannot both be 0"),
        (lambda: RoundSpec(0, 2, 3, 1), "co-located servers need"),
        (lambda: RoundSpec(0, 2, 2, 1, transport="quic"), "transport must be one of"),
    ],
)
def test_bad_settings_say_what_is_wrong(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_an_outcome_that_drops_a_colocated_servers_own_copy_is_refused():
    spec = RoundSpec(0, 3, 2, 4)
    up, down = np.ones(spec.up_shape, bool), np.ones(spec.down_shape, bool)
    RoundOutcome(up.copy(), down.copy(), 0.0, 0.0).check(spec)
    up[1, 1, 2] = False  # worker 1's own block for its own server never crosses the network
    with pytest.raises(ValueError, match="co-located server's own block must be delivered"):
        RoundOutcome(up, down, 0.0, 0.0).check(spec)
    remote = np.ones(spec.up_shape, bool)
    remote[2, 1, 0] = False  # a remote packet may be lost
    RoundOutcome(remote, down, 0.0, 0.0).check(spec)


def test_a_trace_of_a_tcp_run_is_labelled_tcp_and_replays(tmp_path):
    class TcpLike(ReliableNetwork):
        transport = "tcp"

    recorder = TraceRecorder(TcpLike(), tmp_path / "t.npz")
    assert recorder.transport == "tcp"
    spec = RoundSpec(0, 2, 2, 3, transport=recorder.transport)
    recorder.outcome(spec)
    recorder.close()
    replay = TraceNetwork(tmp_path / "t.npz")
    assert replay.transport == "tcp"
    assert np.array_equal(replay.outcome(spec).up, np.ones(spec.up_shape, bool))


def test_ns3_refuses_a_round_over_its_packet_budget_naming_the_setting():
    from pl_lossy import Ns3Network

    spec = RoundSpec(0, 64, 64, 20_000)  # 161 million packets: hours of simulation
    with pytest.raises(ValueError, match=r"161,280,000 packets, over max_round_packets=4,800,000 .*network.max_round_packets"):
        Ns3Network(timeout_s=120).check_round(spec)
    Ns3Network(max_round_packets=200_000_000).check_round(spec)  # a budget you set is the budget you get
    Ns3Network().check_round(RoundSpec(0, 4, 4, 100))
    with pytest.raises(ValueError, match="max_round_packets must be a positive integer or None"):
        Ns3Network(max_round_packets="abc")


def test_analytic_packet_arrivals_end_at_the_phase_time_and_a_deadline_cuts_each_flows_tail():
    net = BernoulliNetwork(0.0, link_rate_bps=1e9, latency_s=10e-6)
    for s in (spec(W=8, S=8, P=20, packet_bytes=1400), spec(W=8, S=2, P=20, packet_bytes=1400, colocated_servers=False)):
        up_at, down_at = net.timing.packet_arrivals(s)
        remote = ~s.local_pairs()
        assert (up_at[~remote] == 0).all() and (up_at[remote] > 0).all()
        up_t, down_t = net.timing.phase_times(s)
        assert up_at[remote].max() == pytest.approx(up_t) and down_at[remote.T].max() == pytest.approx(down_t)
        free = net.outcome(s)
        deadline = 0.6 * up_t
        cut = net.outcome(RoundSpec(**{**s.__dict__, "deadline_s": deadline}))
        assert free.up.all() and cut.up_time_s == deadline and cut.down_time_s == min(down_t, deadline)
        assert np.array_equal(cut.up, free.up & (up_at <= deadline)) and np.array_equal(cut.down, free.down & (down_at <= deadline))
        assert cut.stats["packets_late"] == (~cut.up).sum() + (~cut.down).sum() > 0
        assert not (np.diff(cut.up[remote].astype(int), axis=-1) > 0).any()  # each flow loses its tail


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(deadline_s=0.0), "deadline_s must be > 0"),
        (dict(deadline_s=1e-3, transport="tcp"), "a round deadline applies to lossy UDP rounds"),
    ],
)
def test_bad_deadlines_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        spec(**kw)


def test_the_adaptive_deadline_settles_below_a_straggler_and_never_above_its_cap():
    from pl_lossy.round.deadlines import next_deadline

    net = BernoulliNetwork(0.0, link_rate_bps=1e9, latency_s=10e-6, seed=1)
    cap, deadline, seen = 4e-3, 4e-3, []
    for r in range(6):  # worker 3 computes 3 ms where the others take 1: its uplink starts 2 ms late
        s = spec(r=r, W=8, S=8, P=20, packet_bytes=1400, compute_s=1e-3, slow_workers=((3, 3.0),), deadline_s=deadline)
        out = net.outcome(s)
        seen.append((deadline, out.up[3, [0, 1, 2, 4, 5, 6, 7]].mean(), out.up[[0, 1, 2, 4, 5, 6, 7]].mean()))
        deadline = next_deadline(out, cap, slack=1.25)
    free_phase = net.timing.phase_times(spec(W=8, S=8, P=20, packet_bytes=1400))[0]
    assert seen[0][0] == cap and seen[0][1] == 1.0  # round 0 waits up to the cap: the straggler makes it
    assert seen[-1][0] == pytest.approx(1.25 * free_phase, rel=0.05)  # then the median arrival sets the pace...
    assert seen[-1][1] < 0.2 and seen[-1][2] == 1.0  # ...and only the straggler's uplink is cut
    assert next_deadline(RoundOutcome(out.up, out.down, 1.0, 1.0, {"up_t50_s": 0.0, "down_t50_s": 0.1}), cap, 1.25) == cap
    assert next_deadline(RoundOutcome(out.up, out.down, 1.0, 1.0, {"up_t50_s": 1.0, "down_t50_s": 0.1}), cap, 1.25) == cap


# --- worker failures: the network owns the schedule --------------------------------------------------------------


ANALYTIC = [
    lambda: BernoulliNetwork(0.1, link_rate_bps=1e9, latency_s=10e-6, seed=4),
    lambda: GilbertElliottNetwork(0.01, 0.2, link_rate_bps=1e9, latency_s=10e-6, seed=4),
    lambda: ReliableNetwork(link_rate_bps=1e9, latency_s=10e-6, seed=4),
]


@pytest.mark.parametrize("make", ANALYTIC)
@pytest.mark.parametrize("colocated, S", [(True, 4), (False, 2)])
def test_an_analytic_network_loses_a_down_workers_packets_and_times_the_round_as_if_it_were_absent(make, colocated, S):
    net = make()
    kw = dict(P=20, packet_bytes=1400, colocated_servers=colocated)
    failed = spec(r=1, W=4, S=S, worker_failures=((3, 0, 5),), **kw)
    out = net.outcome(failed).check(failed)
    assert not out.up[3, :3].any() and not out.down[:3, 3].any()  # worker 3 sends and receives nothing...
    if colocated:  # ...nor does its server, but for its own block, which never crosses the network
        assert not out.up[:3, 3].any() and not out.down[3, :3].any() and out.up[3, 3].all() and out.down[3, 3].all()
    else:
        assert not out.up[3].any() and not out.down[:, 3].any()
    assert out.stats["workers_down"] == 1.0
    absent = spec(r=1, W=3, S=min(S, 3), **kw)  # the same round with worker 3 (and its server) not there at all
    assert (out.up_time_s, out.down_time_s) == pytest.approx(net.timing.phase_times(absent))
    up_at, down_at = net.timing.packet_arrivals(failed)
    absent_up, absent_down = net.timing.packet_arrivals(absent)
    live = min(S, 3)
    assert np.allclose(up_at[:3, :live], absent_up) and np.allclose(down_at[:live, :3], absent_down)
    assert (up_at[3] == 0).all() and (down_at[:, 3] == 0).all()
    whole = net.outcome(spec(r=1, W=4, S=S, **kw))  # the cut leaves the live workers' draws alone
    assert np.array_equal(out.up[:3, :live], whole.up[:3, :live]) and np.array_equal(out.down[:live, :3], whole.down[:live, :3])


def test_a_deadline_with_a_down_worker_cuts_as_if_it_were_absent():
    net = ReliableNetwork(link_rate_bps=1e9, latency_s=10e-6)
    absent = spec(W=3, S=3, P=20)
    deadline = 0.6 * net.timing.phase_times(absent)[0]
    cut = net.outcome(spec(W=4, S=4, P=20, deadline_s=deadline, worker_failures=((3, 0, 1),)))
    alone = net.outcome(RoundSpec(**{**absent.__dict__, "deadline_s": deadline}))
    assert np.array_equal(cut.up[:3, :3], alone.up) and np.array_equal(cut.down[:3, :3], alone.down)
    assert (cut.up_time_s, cut.down_time_s) == (alone.up_time_s, alone.down_time_s)


@pytest.mark.parametrize("make", ANALYTIC)
def test_a_down_slow_worker_does_not_lengthen_the_uplink(make):
    net = make()
    s = spec(W=4, S=4, P=1, compute_s=1e-3, slow_workers=((3, 10.0),), worker_failures=((3, 0, 1),))
    out = net.outcome(s)
    free = net.timing.phase_times(spec(W=3, S=3, P=1))[0]
    assert out.up_time_s == pytest.approx(free) and out.up_time_s < 1e-3  # not the 9 ms worker 3 would have taken
    # the fastest (down) worker does not set when the uplink starts: the slow live worker starts compute_s x (2 - 1) late
    s = spec(W=4, S=4, P=1, compute_s=1e-3, slow_workers=((1, 0.5), (2, 2.0)), worker_failures=((1, 0, 1),))
    assert s.start_offsets_s(0) == pytest.approx([0.0, 0.0, 1e-3, 0.0])
    assert net.outcome(s).up_time_s == pytest.approx(1e-3 + net.timing.phase_times(spec(W=3, S=3, P=1))[0], rel=0.05)


def test_the_fastest_compute_factor_is_over_the_workers_up():
    kw = dict(W=4, S=4, P=1, compute_s=1e-3, slow_workers=((0, 0.5), (2, 3.0)), worker_failures=((0, 0, 2),))
    assert spec(r=0, **kw).fastest_compute_factor(0) == 1.0  # worker 0 (0.5) is down
    assert spec(r=2, **kw).fastest_compute_factor(0) == 0.5  # ...and back
    assert spec(W=4, S=4, P=1).fastest_compute_factor(0) == 1.0  # no stragglers
    everyone = spec(W=2, S=2, P=1, compute_s=1e-3, slow_workers=((0, 2.0), (1, 3.0)), worker_failures=((0, 0, 1), (1, 0, 1)))
    assert everyone.fastest_compute_factor(0) == 1.0  # nobody up
    jitter = spec(r=3, W=6, S=6, P=1, compute_s=1e-3, compute_jitter=0.5, worker_failures=((1, 0, 9), (4, 2, 5)))
    factors = jitter.compute_factors(7)
    assert jitter.fastest_compute_factor(7) == factors[[0, 2, 3, 5]].min()
    offsets = jitter.start_offsets_s(7)
    assert (offsets >= 0).all() and offsets[[0, 2, 3, 5]].min() == 0.0


def test_an_outcome_delivering_a_down_workers_packets_is_refused():
    from pl_lossy.workers.failures import fail_outcome

    s = RoundSpec(0, 4, 4, 3, worker_failures=((1, 0, 1),))
    message = r"round 0: worker 1 is down \(worker_failures\) but the network delivered its packets: .*spec.down_workers"
    with pytest.raises(ValueError, match=message):
        RoundOutcome(np.ones(s.up_shape, bool), np.ones(s.down_shape, bool), 0.0, 0.0).check(s)
    up, down = np.ones(s.up_shape, bool), np.ones(s.down_shape, bool)
    fail_outcome(up, down, s.down_workers, s.colocated_servers)
    RoundOutcome(up.copy(), down.copy(), 0.0, 0.0).check(s)  # its own block [1, 1] stays delivered, as fail_outcome leaves it
    for mask, index in (("up", (0, 1, 2)), ("down", (3, 1, 0)), ("down", (1, 2, 1)), ("up", (1, 3, 0))):
        bad = {"up": up.copy(), "down": down.copy()}
        bad[mask][index] = True  # one packet to its server, to it, from its server, from it
        with pytest.raises(ValueError, match=message):
            RoundOutcome(bad["up"], bad["down"], 0.0, 0.0).check(s)
    own = up.copy()
    own[1, 1, 0] = False
    with pytest.raises(ValueError, match="co-located server's own block must be delivered"):
        RoundOutcome(own, down, 0.0, 0.0).check(s)
    dedicated = RoundSpec(0, 4, 2, 3, colocated_servers=False, worker_failures=((1, 0, 1),))
    up, down = np.ones(dedicated.up_shape, bool), np.ones(dedicated.down_shape, bool)
    up[1], down[:, 1] = False, False
    RoundOutcome(up, down, 0.0, 0.0).check(dedicated)  # server 1 is a host of its own: it is up


# --- traces key on every field of the round ------------------------------------------------------------------------


def test_a_trace_of_stragglers_and_failures_replays_only_into_the_same_rounds(tmp_path):
    path = tmp_path / "t.npz"
    kw = dict(W=4, S=4, P=20, compute_s=1e-3, slow_workers=((3, 3.0),), worker_failures=((2, 1, 3),))
    rec = TraceRecorder(BernoulliNetwork(0.1, seed=3), path)
    specs = [spec(r, **kw) for r in range(4)]
    originals = [rec.outcome(s) for s in specs]
    rec.close()
    replay = TraceNetwork(path)
    assert replay.seed == 3
    replay.check_round(RoundSpec(**{**specs[0].__dict__, "compute_s": 0.0}))  # what a strategy checks before launch
    replay.check_run(specs[0], 4)
    for s, o in zip(specs, originals):
        got = replay.outcome(s)
        assert np.array_equal(got.up, o.up) and np.array_equal(got.down, o.down)
        assert (got.up_time_s, got.down_time_s) == (o.up_time_s, o.down_time_s)
    plain = spec(1, W=4, S=4, P=20)
    with pytest.raises(ValueError, match=r"round 1 .*slow_workers.*worker_failures"):
        replay.outcome(RoundSpec(**{**plain.__dict__, "compute_s": 1e-3}))
    with pytest.raises(ValueError, match="worker_failures"):
        replay.outcome(RoundSpec(**{**specs[1].__dict__, "worker_failures": ()}))
    with pytest.raises(ValueError, match="compute_s"):
        replay.outcome(RoundSpec(**{**specs[1].__dict__, "compute_s": 2e-3}))
    with pytest.raises(ValueError, match="slow_workers"):
        replay.check_round(plain)
    with pytest.raises(ValueError, match="worker_failures"):
        replay.check_run(RoundSpec(**{**specs[0].__dict__, "worker_failures": ()}), 4)


def test_a_trace_of_rounds_with_differing_deadlines_records_and_replays(tmp_path):
    path = tmp_path / "t.npz"
    rec = TraceRecorder(BernoulliNetwork(0.0, link_rate_bps=1e9, latency_s=10e-6, seed=1), path)
    specs = [spec(r, W=4, S=4, P=20, deadline_s=4e-4 / (r + 1)) for r in range(4)]  # an adaptive deadline: one per round
    originals = [rec.outcome(s) for s in specs]
    rec.close()
    replay = TraceNetwork(path)
    replay.check_round(specs[0])
    replay.check_run(spec(0, W=4, S=4, P=20, deadline_s=1.0), 4)  # the deadline varies: not a run-level field
    for s, o in zip(reversed(specs), reversed(originals)):
        got = replay.outcome(s)
        assert np.array_equal(got.up, o.up) and np.array_equal(got.down, o.down) and got.up_time_s == o.up_time_s
    assert not originals[-1].up.all()  # the deadlines mattered
    with pytest.raises(ValueError, match=r"round 2 .*deadline_s"):
        replay.outcome(specs[1].__class__(**{**specs[2].__dict__, "deadline_s": 1e-3}))
    with pytest.raises(ValueError, match="packets_per_block"):
        replay.check_round(spec(0, W=4, S=4, P=21, deadline_s=4e-4))
    with np.load(path) as z:  # the format grew arrays; ``spec`` stays, with the fields every round shares
        assert "deadline_s" not in str(z["spec"]) and "n_workers" in str(z["spec"]) and str(z["network"]).startswith("Bernoulli")
    with pytest.raises(ValueError, match=r"a trace holds the rounds of one run; round 4 has slow_workers=\[\[1, 2.0\]\]"):
        rec.outcome(spec(4, W=4, S=4, P=20, deadline_s=1e-4, compute_s=1e-3, slow_workers=((1, 2.0),)))


def test_a_trace_in_the_old_format_still_replays(tmp_path):
    s = spec(0, W=3, S=3, P=10)
    outs = [BernoulliNetwork(0.3, seed=5).outcome(spec(r, W=3, S=3, P=10)) for r in range(3)]
    old_spec = {"n_workers": 3, "n_servers": 3, "packets_per_block": 10, "packet_bytes": 1400, "transport": "udp",
                "colocated_servers": True}
    path = tmp_path / "old.npz"
    np.savez_compressed(
        path,
        rounds=np.arange(3, dtype=np.int64),
        up=np.stack([np.packbits(o.up.ravel()) for o in outs]),
        down=np.stack([np.packbits(o.down.ravel()) for o in outs]),
        up_time_s=np.asarray([o.up_time_s for o in outs]),
        down_time_s=np.asarray([o.down_time_s for o in outs]),
        spec=np.asarray(json.dumps(old_spec)),
    )
    replay = TraceNetwork(path)
    replay.check_run(s, 3)
    assert replay.seed == 0 and replay.transport == "udp"
    for r, o in enumerate(outs):
        got = replay.outcome(spec(r, W=3, S=3, P=10))
        assert np.array_equal(got.up, o.up) and np.array_equal(got.down, o.down) and got.up_time_s == o.up_time_s
    with pytest.raises(ValueError, match="slow_workers"):
        replay.outcome(spec(0, W=3, S=3, P=10, compute_s=1e-3, slow_workers=((1, 2.0),)))
    with pytest.raises(ValueError, match="worker_failures"):
        replay.check_round(spec(0, W=3, S=3, P=10, worker_failures=((1, 0, 1),)))
    with pytest.raises(ValueError, match="deadline_s"):
        replay.outcome(spec(0, W=3, S=3, P=10, deadline_s=1e-3))
    dl = tmp_path / "old_deadline.npz"
    with np.load(path) as z:
        np.savez_compressed(dl, **{**{k: z[k] for k in z.files}, "spec": np.asarray(json.dumps({**old_spec, "deadline_s": 1e-3}))})
    TraceNetwork(dl).outcome(spec(1, W=3, S=3, P=10, deadline_s=1e-3))
    with pytest.raises(ValueError, match="deadline_s"):
        TraceNetwork(dl).outcome(spec(1, W=3, S=3, P=10))


# ---------------------------------------------------------------------- one name for the drop probability: loss_rate


def test_every_network_takes_loss_rate_and_drop_rate_as_its_alias_saying_so_once(caplog):
    import logging

    from pl_lossy.network import Ns3Network, bernoulli

    bernoulli._warned_aliases.clear()
    with caplog.at_level(logging.WARNING):
        assert BernoulliNetwork(loss_rate=0.2).loss_rate == BernoulliNetwork(drop_rate=0.2).loss_rate == 0.2
        assert BernoulliNetwork(drop_rate=0.3).drop_rate == 0.3  # the old attribute reads the same value
        assert BernoulliNetwork(uplink_drop_rate=0.4).uplink_loss_rate == 0.4
        assert Ns3Network(drop_rate=0.2, store="off").config.loss_rate == 0.2
        assert Ns3Network(loss_rate=0.01, drop_rate=0.2, store="off").config.loss_rate == 0.2  # ns3_star.yaml's default
        ge = GilbertElliottNetwork(drop_rate=0.05)
        assert ge.mean_loss_rate == pytest.approx(0.05) and 1 / ge.p_bad_to_good == pytest.approx(10)  # bursts keep their length
        assert GilbertElliottNetwork(loss_rate=0.05).p_good_to_bad == ge.p_good_to_bad
    warnings = [r.getMessage() for r in caplog.records if "alias" in r.getMessage()]
    assert warnings == ["network.drop_rate is an alias of network.loss_rate; use loss_rate",
                        "network.uplink_drop_rate is an alias of network.uplink_loss_rate; use uplink_loss_rate"]


@pytest.mark.parametrize("make", [
    lambda: BernoulliNetwork(loss_rate=0.1, drop_rate=0.2),
    lambda: GilbertElliottNetwork(loss_rate=0.1, drop_rate=0.2),
    lambda: __import__("pl_lossy.network", fromlist=["Ns3Network"]).Ns3Network(loss_rate=0.1, drop_rate=0.2, store="off"),
])
def test_loss_rate_and_its_alias_differing_is_one_error(make):
    with pytest.raises(ValueError, match=r"^loss_rate=0.1 and its alias drop_rate=0.2 differ: give only loss_rate$"):
        make()


def test_a_mean_loss_no_chain_can_have_is_refused():
    with pytest.raises(ValueError, match="loss_rate=0.5 is not a mean loss of a chain with loss_good=0.0 and loss_bad=0.3"):
        GilbertElliottNetwork(loss_rate=0.5, loss_bad=0.3)
