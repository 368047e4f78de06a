"""network.fidelity: full, reuse and auto, on the real bridge; the choice never silent."""

import json

import numpy as np
import pytest

from pl_lossy.network import Ns3Network, RoundSpec
from pl_lossy.network.fidelity import Fidelity, ReusedRounds, choose, rounds_differ

from test_app import run_app


def _spec(r, **kw):
    return RoundSpec(r, 4, 4, 12, 1400, **kw)


def test_reuse_serves_the_first_rounds_themselves_and_later_ones_a_seeded_draw_among_them():
    reuse = Fidelity("reuse", 5)
    assert [reuse.source_round(7, r) for r in range(5)] == list(range(5))
    later = [reuse.source_round(7, r) for r in range(5, 400)]
    assert set(later) == set(range(5))  # every simulated round is served...
    assert max(np.bincount(later)) < 2 * len(later) / 5  # ...about equally often
    assert later == [reuse.source_round(7, r) for r in range(5, 400)]  # a pure function of (seed, round)
    assert later != [reuse.source_round(8, r) for r in range(5, 400)]  # another seed, other draws
    assert [Fidelity("full").source_round(7, r) for r in range(100)] == list(range(100))


def test_auto_is_full_up_to_the_budget_and_reuse_above_it_saying_why():
    within = choose("auto", 64, 1000, 1000, "")
    assert within.mode == "full" and within.describe() == "full (auto: 1,000 packets a round, within fidelity_budget_packets=1,000)"
    above = choose("auto", 64, 1000, 1001, "")
    assert above.mode == "reuse" and above.rounds == 64 and "1,001 packets a round is over fidelity_budget_packets=1,000" in above.describe()
    assert choose("full", 64, 10, 10**6, "") == Fidelity("full")  # asked for: never replaced
    assert choose("reuse", 8, 10**9, 10, "") == Fidelity("reuse", 8)


@pytest.mark.parametrize("kw, link_failures, why", [
    (dict(compute_s=0.01, compute_jitter=0.5), False, "stragglers"),
    (dict(worker_failures=((1, 2, 4),)), False, "worker failures"),
    ({}, True, "link failures"),
])
def test_rounds_that_differ_refuse_reuse_and_auto_stays_full_saying_so(kw, link_failures, why):
    differ = rounds_differ(_spec(0, **kw), link_failures)
    assert why in differ
    with pytest.raises(ValueError, match=f"fidelity=reuse serves a round another round's outcome.*{why}.*use fidelity=full"):
        choose("reuse", 8, 10, 10**6, differ)
    fallback = choose("auto", 8, 10, 10**6, differ)
    assert fallback.mode == "full" and "so reuse does not apply" in fallback.describe()


@pytest.mark.parametrize("kw, message", [
    (dict(fidelity="fast"), "fidelity must be one of auto, full, reuse"),
    (dict(fidelity_rounds=0), "fidelity_rounds must be a positive integer, got 0"),
    (dict(fidelity_budget_packets=2.5), "fidelity_budget_packets must be a positive integer, got 2.5"),
])
def test_bad_fidelity_settings_are_one_line(kw, message):
    with pytest.raises(ValueError, match=message):
        Ns3Network(**kw)


def test_kept_rounds_come_back_bit_for_bit_as_fresh_arrays():
    rng = np.random.default_rng(0)
    up, down = rng.random((3, 5, 77)) < 0.9, rng.random((5, 3, 77)) < 0.9
    from pl_lossy.network import RoundOutcome

    kept = ReusedRounds()
    kept.keep(4, None, RoundOutcome(up, down, 1e-3, 2e-3, {"drops_link_error": 3.0}))
    back = kept.get(4, None)
    assert back.up.dtype == np.bool_ and (back.up == up).all() and (back.down == down).all()
    assert (back.up_time_s, back.down_time_s, back.stats) == (1e-3, 2e-3, {"drops_link_error": 3.0})
    back.up[:] = False
    assert (kept.get(4, None).up == up).all() and kept.get(5, None) is None
    assert kept.get(4, 0.01) is None and (4, None) in kept  # kept under its deadline too


# ---------------------------------------------------------------------- on the real simulator


def test_reuse_serves_real_ns3_rounds_and_simulates_only_its_own(bridge, tmp_path):
    """Every round reuse serves is, bit for bit, a round full simulated; the store receives those rounds alone,
    under their own keys, so a full run afterwards replays them and simulates only the others."""
    store = tmp_path / "outcomes.sqlite"
    reuse = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=5, store=str(store), fidelity="reuse", fidelity_rounds=3)
    served = [reuse.outcome(_spec(r)) for r in range(12)]
    assert "fidelity reuse of 3 simulated rounds" in reuse.describe()
    sources = [reuse.fidelity.source_round(5, r) for r in range(12)]
    # a trace keys a served round as the round it is: its source, never itself
    assert [reuse.store_key(_spec(r)) for r in range(12)] == [reuse.store_key(_spec(s)) for s in sources]
    assert len({reuse.store_key(_spec(r)) for r in range(3)}) == 3
    reuse.close()
    assert reuse.store_summary()["written"] == 3

    full = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=5, store=str(store), fidelity="full")
    truth = [full.outcome(_spec(r)) for r in range(12)]
    full.close()
    assert (full.store_summary()["hits"], full.store_summary()["written"]) == (3, 9)
    assert sources[:3] == [0, 1, 2] and set(sources[3:]) <= {0, 1, 2}
    for r, (out, source) in enumerate(zip(served, sources)):
        assert (out.up == truth[source].up).all() and (out.down == truth[source].down).all(), r
        assert (out.up_time_s, out.down_time_s) == (truth[source].up_time_s, truth[source].down_time_s)
        assert out.stats == truth[source].stats, r
    distinct = {np.packbits(t.up).tobytes() for t in truth[:3]}
    assert len(distinct) == 3  # the simulated rounds differ: reuse repeats them


def test_a_reuse_runs_trace_imports_its_simulated_rounds_which_a_full_run_then_replays(bridge, tmp_path, capsys):
    from pl_lossy.network import TraceRecorder
    from pl_lossy.network.outcome_store import main as store_main

    recorder = TraceRecorder(Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=7, store="off", fidelity="reuse",
                                        fidelity_rounds=2), tmp_path / "trace.npz")
    served = [recorder.outcome(_spec(r)) for r in range(6)]
    recorder.save()
    recorder.network.close()
    store = tmp_path / "imported.sqlite"
    assert store_main(["import", str(tmp_path / "trace.npz"), "--path", str(store)]) == 0
    out = capsys.readouterr().out
    assert "imported 2 of 2 rounds" in out and "(6 rounds in the trace)" in out
    full = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=7, store=str(store), fidelity="full")
    replayed = [full.outcome(_spec(r)) for r in range(2)]
    full.close()
    assert full.store_summary()["hits"] == 2  # the imported rounds are round 0 and 1 themselves
    assert all((a.up == b.up).all() for a, b in zip(replayed, served[:2]))


def test_reuse_without_a_store_simulates_each_source_round_once(bridge):
    network = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=5, store="off", fidelity="reuse", fidelity_rounds=2)
    asked = []
    connect = network._connect

    def counting():
        asked.append(1)
        return connect()

    network._connect = counting
    outs = [network.outcome(_spec(r)) for r in range(10)]
    network.close()
    assert len(asked) == 2  # rounds 0 and 1; the other eight were served from memory
    assert all((o.up == outs[network.fidelity.source_round(5, r)].up).all() for r, o in enumerate(outs))


def test_reuse_is_the_same_asked_ahead_in_a_pool_or_first_asked_past_its_simulated_rounds(bridge):
    """Run-ahead prefetches the source rounds; a resumed run first asks for a round >= K with nothing kept: the
    outcomes are those of the plain run either way."""
    def outcomes(rounds, **kw):
        network = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.1, seed=6, store="off", fidelity="reuse", fidelity_rounds=3, **kw)
        try:
            return {r: network.outcome(_spec(r)) for r in rounds}
        finally:
            network.close()

    plain = outcomes(range(10))
    for other in (outcomes(range(10), run_ahead=3), outcomes(range(7, 10))):
        for r, out in other.items():
            assert (out.up == plain[r].up).all() and (out.down == plain[r].down).all() and out.up_time_s == plain[r].up_time_s, r


def test_a_round_served_with_another_deadline_is_its_source_simulated_under_that_deadline(bridge):
    """An adaptive deadline changes a round's deadline: the source round is simulated again under it (what a full
    run of that round with that deadline gives), not served as kept under another deadline."""
    network = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.0, seed=6, store="off", fidelity="reuse", fidelity_rounds=1)
    reference = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.0, seed=6, store="off", fidelity="full")
    try:
        loose = network.outcome(_spec(0, deadline_s=1.0))
        tight_spec = _spec(5, deadline_s=loose.up_time_s / 2)  # half the uplink's time: packets are cut
        tight = network.outcome(tight_spec)
        truth = reference.outcome(_spec(0, deadline_s=tight_spec.deadline_s))
    finally:
        network.close()
        reference.close()
    assert loose.up.all() and not tight.up.all()
    assert (tight.up == truth.up).all() and tight.up_time_s == truth.up_time_s


def test_the_run_names_its_fidelity_in_its_first_line_and_summary(tmp_path):
    proc = run_app(tmp_path, "trainer.max_epochs=1", "network.fidelity_budget_packets=10", "network.fidelity_rounds=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = next(line for line in proc.stdout.splitlines() if line.startswith("lossy_ps:"))
    assert "fidelity reuse of 2 simulated rounds (auto: 56 packets a round is over fidelity_budget_packets=10)" in first
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["fidelity"] == {"mode": "reuse", "rounds": 2, "reason": "auto: 56 packets a round is over fidelity_budget_packets=10"}
    assert "fidelity reuse of 2" in summary["network"]


def test_a_default_run_says_it_is_exact_and_why(tmp_path):
    proc = run_app(tmp_path, "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = next(line for line in proc.stdout.splitlines() if line.startswith("lossy_ps:"))
    assert first.endswith("fidelity full (auto: 56 packets a round, within fidelity_budget_packets=200,000)")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["fidelity"]["mode"] == "full"


def test_reuse_with_stragglers_is_refused_before_launch(tmp_path):
    proc = run_app(tmp_path, "network.fidelity=reuse", "strategy.compute_time_s=0.001", "strategy.compute_jitter=0.3")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid `network` config: fidelity=reuse") and "stragglers" in last
    assert "Initializing distributed" not in proc.stdout + proc.stderr
