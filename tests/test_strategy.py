"""LossyPSStrategy in real multi-process Lightning fits (gloo, fork launcher)."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy

from pl_lossy import BernoulliNetwork, LossyPSStrategy, Ns3Network, ReliableNetwork, TraceNetwork

from fits import RecordingLossyPS, SaveReplicas, digits_model, fit, fit_in_process, flat_params, load_rounds, steps_per_epoch, trace_masks


def lossy(network, **kw):
    return LossyPSStrategy(network=network, start_method="fork", **kw)


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_no_drops_with_sgd_ends_where_ddp_ends(momentum, weight_decay):
    model, dm = digits_model(momentum=momentum, weight_decay=weight_decay)
    fit(lossy(BernoulliNetwork(drop_rate=0.0)), model, dm, max_epochs=2)
    ddp_model, dm = digits_model(momentum=momentum, weight_decay=weight_decay)
    fit(DDPStrategy(start_method="fork"), ddp_model, dm, max_epochs=2)
    a, b = flat_params(model), flat_params(ddp_model)
    assert not torch.equal(a, flat_params(digits_model()[0]))  # it trained
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_full_drops_leave_every_replica_alone(tmp_path):
    """At drop rate 1.0 a round changes no parameter bit on any rank: replicas train independently."""
    model, dm = digits_model()
    fit(RecordingLossyPS(tmp_path, network=BernoulliNetwork(drop_rate=1.0)), model, dm, limit_train_batches=5)
    per_rank = load_rounds(tmp_path, 2)
    for rank in per_rank:
        assert len(rank["rounds"]) == 5
        n = rank["numel"]
        for before, after, _ in rank["rounds"]:
            assert torch.equal(before[:n], after[:n])
    assert not torch.equal(per_rank[0]["rounds"][-1][1], per_rank[1]["rounds"][-1][1])


def test_replicas_that_received_the_same_packets_are_bit_identical(tmp_path):
    model, dm = digits_model()
    fit(RecordingLossyPS(tmp_path, network=BernoulliNetwork(drop_rate=0.3, seed=5)), model, dm, limit_train_batches=8)
    r0, r1 = load_rounds(tmp_path, 2)
    S, P, E = r0["shape"]
    n_shared = n_differ = 0
    for (_, after0, down), (_, after1, _) in zip(r0["rounds"], r1["rounds"]):
        a0 = after0[: S * P * E].view(S * P, E)
        a1 = after1[: S * P * E].view(S * P, E)
        both = (down[:, 0, :] & down[:, 1, :]).reshape(-1)
        assert torch.equal(a0[both], a1[both])
        n_shared += int(both.sum())
        n_differ += int((a0[~both] != a1[~both]).any(dim=1).sum())
    assert n_shared > 0 and n_differ > 0  # both cases occurred


def test_no_drops_keep_replicas_bit_identical(tmp_path):
    model, dm = digits_model()
    saver = SaveReplicas(tmp_path)
    fit(lossy(ReliableNetwork()), model, dm, callbacks=[saver])
    r0, r1 = saver.load(2)
    assert torch.equal(r0["params"], r1["params"])


def test_same_seed_same_drops_and_replay_reproduces_training(tmp_path):
    runs = []
    for name in ("a", "b"):
        model, dm = digits_model()
        fit(lossy(BernoulliNetwork(0.2, seed=11), record_trace=str(tmp_path / f"{name}.npz")), model, dm)
        runs.append((model, trace_masks(tmp_path / f"{name}.npz")))
    (model_a, ta), (model_b, tb) = runs
    assert len(ta["rounds"]) == steps_per_epoch(dm)
    for key in ("rounds", "up", "down"):
        assert np.array_equal(ta[key], tb[key])
    assert torch.equal(flat_params(model_a), flat_params(model_b))
    replayed, dm = digits_model()
    fit(lossy(TraceNetwork(tmp_path / "a.npz")), replayed, dm)
    assert torch.equal(flat_params(replayed), flat_params(model_a))
    other, dm = digits_model()
    fit(lossy(BernoulliNetwork(0.2, seed=12), record_trace=str(tmp_path / "c.npz")), other, dm)
    assert not np.array_equal(trace_masks(tmp_path / "c.npz")["up"], ta["up"])


def test_delivered_fractions_match_the_configured_rates(tmp_path):
    model, dm = digits_model(hidden=(256,))
    logger = CSVLogger(tmp_path, name="m")
    strategy = lossy(BernoulliNetwork(uplink_drop_rate=0.1, downlink_drop_rate=0.3, seed=1), divergence_every=10)
    fit(strategy, model, dm, max_epochs=2, logger=logger, log_every_n_steps=1)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")))
    up = [float(r["net/delivered_up"]) for r in rows if r.get("net/delivered_up")]
    down = [float(r["net/delivered_down"]) for r in rows if r.get("net/delivered_down")]
    sim = [float(r["net/sim_time_s"]) for r in rows if r.get("net/sim_time_s")]
    assert len(up) == 2 * steps_per_epoch(dm)
    assert np.mean(up) == pytest.approx(0.9, abs=0.02)
    assert np.mean(down) == pytest.approx(0.7, abs=0.02)
    assert all(b > a for a, b in zip(sim, sim[1:]))  # the simulated clock only moves forward
    divergence = [float(r["net/divergence"]) for r in rows if r.get("net/divergence")]
    assert len(divergence) == 4 and all(0 < d < 1 for d in divergence)


def test_round_metrics_reach_the_progress_bar_callback_metrics_and_every_logger_each_round(tmp_path):
    """They are written straight into the trainer's dicts (LightningModule.log cost a launch-bound GPU step ~2 ms)."""
    model, dm = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=3), compute_time_s=1e-3)
    trainer = fit_in_process(strategy, model, dm, max_epochs=1, logger=CSVLogger(tmp_path, name="m"), log_every_n_steps=40,
                             enable_progress_bar=True)
    rounds = strategy.clock.rounds
    assert rounds > 40 and float(trainer.callback_metrics["net/round"]) == rounds - 1
    assert float(trainer.callback_metrics["net/sim_time_s"]) == pytest.approx(strategy.clock.sim_time_s)
    assert trainer.progress_bar_metrics["net/sim_s"] == pytest.approx(strategy.clock.sim_time_s)
    assert 0 <= trainer.progress_bar_metrics["net/drop"] < 0.2
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")) if r.get("net/round")]
    assert [int(float(r["net/round"])) for r in rows] == list(range(rounds))  # every round, whatever log_every_n_steps says


def test_a_deadline_bounds_every_rounds_simulated_time_and_loses_the_late_packets(tmp_path):
    model, dm = digits_model(hidden=(256,))
    network = BernoulliNetwork(0.0, link_rate_bps=1e9, latency_s=10e-6)
    logger = CSVLogger(tmp_path, name="m")
    fit(lossy(network, deadline_s=100e-6, compute_time_s=0.0), model, dm, max_epochs=1, logger=logger, log_every_n_steps=1)
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")) if r.get("net/sim_time_s")]
    sim = [float(r["net/sim_time_s"]) for r in rows]
    assert np.diff([0.0, *sim]) == pytest.approx(2 * 100e-6)  # two phases, each cut at the deadline
    late = [float(r["net/packets_late"]) for r in rows]
    delivered = [float(r["net/delivered_up"]) for r in rows]
    assert all(x > 0 for x in late) and 0.1 < np.mean(delivered) < 0.9  # no drops but the deadline's


def test_a_named_straggler_loses_its_uplink_to_the_deadline_and_the_clock_counts_the_fastest_compute(tmp_path):
    model, dm = digits_model(hidden=(256,))
    network = BernoulliNetwork(0.0, link_rate_bps=1e9, latency_s=10e-6, seed=1)
    logger = CSVLogger(tmp_path, name="m")
    strategy = lossy(network, compute_time_s=1e-3, slow_workers={1: 3.0}, deadline_s=1e-3)
    fit(strategy, model, dm, devices=2, max_epochs=1, logger=logger, log_every_n_steps=1)
    import csv

    rows = [r for r in csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")) if r.get("net/sim_time_s")]
    # worker 1 computes 3 ms, 2 ms after worker 0: its whole uplink misses the 1 ms deadline, worker 0's arrives
    assert all(float(r["net/delivered_up"]) == pytest.approx(0.5) for r in rows)
    assert all(float(r["net/delivered_down"]) == 1.0 for r in rows)
    down = network.timing.phase_times(strategy.round_spec_for(model, 2))[1]
    assert np.diff([0.0, *(float(r["net/sim_time_s"]) for r in rows)]) == pytest.approx(1e-3 + 1e-3 + down)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(compute_jitter=0.3, compute_time_s="measured"), "stragglers \\(compute_jitter, slow_workers\\) need a reproducible compute time"),
        (dict(compute_jitter=-1), "compute_jitter must be a number >= 0"),
        (dict(slow_workers={0: 0}), "slow_workers\\[0\\] must be a factor > 0"),
        (dict(slow_workers={"a": 2}), "slow_workers maps worker indices"),
    ],
)
def test_bad_straggler_settings_say_what_is_wrong(kw, message):
    with pytest.raises(ValueError, match=message):
        LossyPSStrategy(network=BernoulliNetwork(0.1), **kw)


def test_resume_continues_the_same_drop_sequence(tmp_path):
    net = lambda: BernoulliNetwork(0.25, seed=4)  # noqa: E731
    model, dm = digits_model()
    fit(lossy(net(), record_trace=str(tmp_path / "full.npz")), model, dm, max_epochs=2)
    full = trace_masks(tmp_path / "full.npz")

    model, dm = digits_model()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(lossy(net()), model, dm, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    per_epoch = len(full["rounds"]) // 2
    assert saved["lossy_ps"]["clock"]["rounds"] == per_epoch

    model, dm = digits_model()
    fit(lossy(net(), record_trace=str(tmp_path / "resumed.npz")), model, dm, max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    resumed = trace_masks(tmp_path / "resumed.npz")
    assert resumed["rounds"].tolist() == full["rounds"][per_epoch:].tolist()
    assert np.array_equal(resumed["up"], full["up"][per_epoch:])
    assert np.array_equal(resumed["down"], full["down"][per_epoch:])


def test_an_adaptive_deadline_cuts_a_straggler_and_resumes_where_it_was(tmp_path):
    def strategy(**kw):
        net = BernoulliNetwork(0.05, link_rate_bps=1e9, latency_s=10e-6, seed=2)
        return lossy(net, compute_time_s=1e-3, compute_jitter=0.2, slow_workers={1: 3.0}, deadline_s=4e-3, adaptive_deadline=True, **kw)

    import csv

    model, dm = digits_model(hidden=(256,))
    fit(strategy(), model, dm, max_epochs=2, logger=CSVLogger(tmp_path, name="full"), log_every_n_steps=1)
    rows = [r for r in csv.DictReader(open(tmp_path / "full" / "version_0" / "metrics.csv")) if r.get("net/deadline_s")]
    deadlines = [float(r["net/deadline_s"]) for r in rows]
    assert deadlines[0] == 4e-3 and max(deadlines) <= 4e-3 and deadlines[-1] < 2e-3  # it came down from the cap
    assert float(rows[-1]["net/delivered_up"]) < 0.75  # worker 1's uplink, 2 ms late, is cut

    model, dm = digits_model(hidden=(256,))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(strategy(), model, dm, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["lossy_ps"]["clock"]
    per_epoch = saved["rounds"]
    assert saved["deadline_s"] == pytest.approx(deadlines[per_epoch])  # the next round's deadline travels with the clock
    model, dm = digits_model(hidden=(256,))
    fit(strategy(), model, dm, max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        logger=CSVLogger(tmp_path, name="resumed"), log_every_n_steps=1)
    resumed = [float(r["net/deadline_s"]) for r in csv.DictReader(open(tmp_path / "resumed" / "version_0" / "metrics.csv"))
               if r.get("net/deadline_s")]
    assert resumed == pytest.approx(deadlines[per_epoch:])


def test_an_adaptive_deadline_needs_a_cap():
    with pytest.raises(ValueError, match="adaptive_deadline needs deadline_s"):
        LossyPSStrategy(network=BernoulliNetwork(0.1), adaptive_deadline=True)


class _RankZeroOnly(BernoulliNetwork):
    """A network only rank 0 may ask (like the ns-3 bridge): masks reach the others by broadcast."""

    same_on_every_rank = False

    def __init__(self, *a, fail_at=None, **kw):
        super().__init__(*a, **kw)
        self.fail_at = fail_at

    def outcome(self, spec):
        import torch.distributed as dist

        assert dist.get_rank() == 0, "only rank 0 talks to the network"
        if spec.round == self.fail_at:
            raise ConnectionError("simulated bridge failure")
        return super().outcome(spec)


def test_broadcast_masks_train_exactly_like_local_draws():
    local, dm = digits_model()
    fit(lossy(BernoulliNetwork(0.2, seed=3)), local, dm)
    broadcast, dm = digits_model()
    fit(lossy(_RankZeroOnly(0.2, seed=3)), broadcast, dm)
    assert torch.equal(flat_params(local), flat_params(broadcast))


def test_a_network_failure_on_rank_zero_fails_the_fit_on_every_rank():
    model, dm = digits_model()
    with pytest.raises(Exception, match="simulated bridge failure"):
        fit(lossy(_RankZeroOnly(0.2, fail_at=3), timeout=__import__("datetime").timedelta(seconds=60)), model, dm)


@pytest.mark.parametrize("mode, equal", [("broadcast", True), ("average", True), ("none", False)])
def test_batchnorm_buffers(tmp_path, mode, equal):
    import functools

    from pl_lossy.experiment.data import SyntheticDataModule
    from pl_lossy.experiment.models import Classifier, ResNet20

    pl.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(n_samples=256, input_shape=(3, 8, 8), batch_size=16)
    model = Classifier(functools.partial(ResNet20, width=4), dm.input_shape, dm.num_classes)
    saver = SaveReplicas(tmp_path)
    fit(lossy(BernoulliNetwork(0.1), sync_buffers=mode), model, dm, limit_train_batches=3, callbacks=[saver])
    r0, r1 = saver.load(2)
    same = all(torch.equal(r0["buffers"][k], r1["buffers"][k]) for k in r0["buffers"])
    assert same == equal


def test_dedicated_servers_train():
    model, dm = digits_model()
    before = flat_params(model).clone()
    trainer = fit(lossy(BernoulliNetwork(0.5, seed=2), num_servers=3, colocated_servers=False), model, dm)
    assert not torch.equal(before, flat_params(model))
    assert trainer.callback_metrics["val_acc"] > 0.5


def test_registered_names_build_the_strategy():
    for name, method in (("lossy_ps", "popen"), ("lossy_ps_fork", "fork"), ("lossy_ps_spawn", "spawn")):
        trainer = pl.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False)
        assert isinstance(trainer.strategy, LossyPSStrategy)
        assert trainer.strategy._start_method == method
        assert isinstance(trainer.strategy.network, Ns3Network)  # the packet-level simulation by default


@pytest.mark.slow
def test_four_workers_accuracy_at_ten_percent_drops_is_close_to_no_drops():
    acc = {}
    for rate in (0.0, 0.1):
        model, dm = digits_model(hidden=(128,), lr=0.1)
        trainer = fit(lossy(BernoulliNetwork(rate, seed=0)), model, dm, devices=4, max_epochs=15)
        acc[rate] = float(trainer.callback_metrics["val_acc"])
    assert acc[0.0] > 0.9
    assert abs(acc[0.1] - acc[0.0]) < 0.04, acc


def test_with_adam_rps_without_drops_is_not_ddp():
    """RPS averages the results of local steps; DDP steps on the averaged gradient: equal for plain SGD only."""
    def adam_model():
        model, dm = digits_model()
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, dm

    model, dm = adam_model()
    fit(lossy(ReliableNetwork()), model, dm, limit_train_batches=10)
    ddp_model, dm = adam_model()
    fit(DDPStrategy(start_method="fork"), ddp_model, dm, limit_train_batches=10)
    start = flat_params(adam_model()[0])
    gap = (flat_params(model) - flat_params(ddp_model)).norm() / (flat_params(ddp_model) - start).norm()
    assert gap > 0.01, gap


class _UnfreezeAtEpochOne(pl.Callback):
    """Freezes the first layer before the strategy sets up and trains it from epoch 1 (as BackboneFinetuning does)."""

    def setup(self, trainer, pl_module, stage):
        for p in pl_module.net[1].parameters():
            p.requires_grad_(False)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            for p in pl_module.net[1].parameters():
                p.requires_grad_(True)


def test_parameters_frozen_at_setup_and_unfrozen_later_are_exchanged(tmp_path):
    model, dm = digits_model()
    saver = SaveReplicas(tmp_path)
    first_layer = sum(p.numel() for p in model.net[1].parameters())
    fit(lossy(BernoulliNetwork(0.0)), model, dm, max_epochs=2, limit_train_batches=4, callbacks=[_UnfreezeAtEpochOne(), saver])
    r0, r1 = saver.load(2)
    start = flat_params(digits_model()[0])[:first_layer]
    assert not torch.equal(r0["params"][:first_layer], start)  # it trained in epoch 1
    torch.testing.assert_close(r0["params"][:first_layer], r1["params"][:first_layer], rtol=0, atol=1e-6)  # and was averaged


class _DisagreeingNetwork(BernoulliNetwork):
    """Claims every rank computes the same outcome, but from round 3 on each rank draws its own."""

    def outcome(self, spec):
        import torch.distributed as dist

        if spec.round < 3:
            return super().outcome(spec)
        return BernoulliNetwork(self.uplink_drop_rate, seed=100 + dist.get_rank()).outcome(spec)


def test_processes_applying_different_masks_fail_the_fit_naming_the_round():
    model, dm = digits_model()
    with pytest.raises(Exception, match="round 3: the processes applied different masks"):
        fit(lossy(_DisagreeingNetwork(0.3, seed=1)), model, dm, limit_train_batches=6)


def test_mask_agreement_check_fails_on_a_mismatch_and_passes_on_agreement():
    from pl_lossy.round.masks import MaskAgreement

    check = MaskAgreement()
    check.submit(7, torch.tensor([5.0, 5.0]), 5.0)
    with pytest.raises(RuntimeError, match=r"round 8: the processes applied different masks \(hashes by process: \[5, 6\]\)"):
        check.submit(8, torch.tensor([5.0, 6.0]), 5.0)


def test_replaying_a_trace_of_a_run_with_stragglers_gives_the_same_clock(tmp_path):
    """The trace keeps the network's seed: the fastest worker's compute factor, drawn from it, is the recorded run's."""
    trace = tmp_path / "t.npz"
    kw = dict(compute_time_s=1e-3, compute_jitter=0.5)
    model, dm = digits_model()
    recorded = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=7), record_trace=str(trace), **kw)
    fit_in_process(recorded, model, dm, limit_train_batches=6, max_epochs=1)
    model, dm = digits_model()
    replayed = LossyPSStrategy(network=TraceNetwork(trace), **kw)
    fit_in_process(replayed, model, dm, limit_train_batches=6, max_epochs=1)
    assert replayed.network.seed == 7
    assert replayed.clock.compute_time_s == pytest.approx(recorded.clock.compute_time_s) != pytest.approx(6e-3)
    assert replayed.clock.sim_time_s == pytest.approx(recorded.clock.sim_time_s)


# ---------------------------------------------------------------------- the summary says where drops went


def _summary_of(strategy, tmp_path, batches=4):
    import json

    from pl_lossy.callbacks import RunSummary

    model, dm = digits_model()
    summary = RunSummary(tmp_path / "summary.json")
    fit_in_process(strategy, model, dm, limit_train_batches=batches, limit_val_batches=1, max_epochs=1, callbacks=[summary])
    return json.loads((tmp_path / "summary.json").read_text())


def test_the_summary_tallies_drops_by_cause_late_failed_and_random(tmp_path):
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=3), workers_per_device=4, deadline_s=5.5e-5,
                               worker_failures=[[1, 0, 2]])
    out = _summary_of(strategy, tmp_path)
    drops = out["drops"]
    assert drops["packets"] > drops["lost"] > 0 and drops["late"] > 0 and drops["other"] > 0
    assert drops["lost"] == drops["late"] + drops["other"]  # Bernoulli reports no random drops: they are "other"
    assert drops["lost"] == pytest.approx(drops["packets"] * (1 - (out["delivered_up"] + out["delivered_down"]) / 2), abs=1)
    assert drops["workers_down"] == 2  # worker 1 down for rounds 0 and 1
    assert "queue" not in drops and "link_error" not in drops  # causes this network does not report are not claimed


def test_the_summary_counts_an_ns3_stars_queue_drops(bridge, tmp_path):
    network = Ns3Network(endpoint=bridge.endpoint, loss_rate=0.0, queue_packets=2, seed=1, store="off")
    out = _summary_of(LossyPSStrategy(network=network, workers_per_device=4), tmp_path, batches=2)
    drops = out["drops"]
    assert drops["queue"] > 0 and drops["link_error"] == 0 and drops["other"] == 0
    assert drops["lost"] == drops["queue"] + drops["source"] + drops["link_error"]
