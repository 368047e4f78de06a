"""The simulated compute time: a pure function of the config by default, measured only when asked."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from torch.utils.flop_counter import FlopCounterMode

from pl_lossy import LossyPSStrategy
from pl_lossy.round.compute import ComputeModel
from pl_lossy.network import BernoulliNetwork
from tests.fits import digits_model, fit_in_process


@pytest.mark.parametrize("bad", ["fast", -1.0, float("nan"), True, [1]])
def test_bad_compute_time_fails_naming_the_setting(bad):
    with pytest.raises(ValueError, match="compute_time_s"):
        ComputeModel(bad)


@pytest.mark.parametrize("bad", [0, -1e9, "many", False])
def test_bad_device_flops_fails_naming_the_setting(bad):
    with pytest.raises(ValueError, match="device_flops"):
        ComputeModel("flops", bad)


def test_models_give_their_round_time():
    assert ComputeModel(0.25).round_time_s(lambda: 9.0) == 0.25
    assert ComputeModel("0.5").round_time_s(lambda: 9.0) == 0.5  # a number from the command line
    assert ComputeModel(None).round_time_s(lambda: 9.0) == 9.0  # None: measured
    flops = ComputeModel("flops", device_flops=2e9)
    with pytest.raises(RuntimeError, match="no step was counted"):
        flops.round_time_s(lambda: 9.0)
    flops.step_flops = 1e9
    assert flops.round_time_s(lambda: 9.0) == 0.5


def _one_worker_step_flops(model, dm):
    """FLOPs of one worker's training step (forward and backward of the first batch), counted here."""
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    with FlopCounterMode(display=False) as counter:
        model.training_step((x, y), 0).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("workers_per_device,batching", [(1, "auto"), (4, "vmap"), (4, "loop")])
def test_flops_model_counts_one_workers_step_and_repeats_exactly(workers_per_device, batching):
    sims = []
    for _ in range(2):
        model, dm = digits_model(seed=3)
        expected = _one_worker_step_flops(*digits_model(seed=3))
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=3), workers_per_device=workers_per_device,
                                   batching=batching, device_flops=1e9, start_method="popen")
        fit_in_process(strategy, model, dm, max_steps=6)
        assert strategy.compute.step_flops == expected > 0
        assert strategy.clock.compute_time_s == pytest.approx(6 * expected / 1e9)
        sims.append(strategy.clock.sim_time_s)
    assert sims[0] == sims[1]  # the same config and seed: the same simulated time, whatever the wall clock did


def test_gradient_accumulation_counts_every_micro_batch_of_a_round():
    model, dm = digits_model(seed=1)
    one = _one_worker_step_flops(*digits_model(seed=1))
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), start_method="popen")
    fit_in_process(strategy, model, dm, max_steps=2, accumulate_grad_batches=3)
    assert strategy.compute.step_flops == 3 * one


def test_measured_compute_is_wall_clock():
    model, dm = digits_model(seed=1)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), compute_time_s="measured", start_method="popen")
    fit_in_process(strategy, model, dm, max_steps=3)
    assert strategy.compute.step_flops is None and strategy.clock.compute_time_s > 0


def test_a_trace_shorter_than_the_fit_fails_at_start(tmp_path):
    from pl_lossy.network import TraceNetwork

    model, dm = digits_model(seed=2)
    recorder = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=2), workers_per_device=2, record_trace=str(tmp_path / "t.npz"),
                               start_method="popen")
    fit_in_process(recorder, model, dm, max_steps=3)
    batches = []

    class CountBatches(pl.Callback):
        def on_train_batch_start(self, *args):
            batches.append(1)

    model, dm = digits_model(seed=2)
    replay = LossyPSStrategy(network=TraceNetwork(tmp_path / "t.npz"), workers_per_device=2, start_method="popen")
    with pytest.raises(ValueError, match=r"holds rounds 0..2 \(3 in all\) but this fit runs 5 rounds: round 3 is missing"):
        fit_in_process(replay, model, dm, max_steps=5, callbacks=[CountBatches()])
    assert not batches  # before the first step
    model, dm = digits_model(seed=2)
    fit_in_process(LossyPSStrategy(network=TraceNetwork(tmp_path / "t.npz"), workers_per_device=2, start_method="popen"),
                   model, dm, max_steps=3)  # as long as the trace: fine
