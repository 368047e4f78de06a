"""One fit, one session: per-fit state does not outlive its fit, and the hooks Lightning calls outside a fit
(predict, a restore with no Trainer attached, a resume into another worker count) work (issue 23)."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from pl_lossy import BernoulliNetwork, LossyPSStrategy, TraceNetwork
from pl_lossy.experiment.data import DigitsDataModule
from pl_lossy.experiment.models import Classifier, SmallCNN
from tests.fits import digits_model, fit_in_process, in_process
from tests.test_compute import _one_worker_step_flops as one_worker_step_flops


def cnn_model(seed=0):
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=8, seed=seed)
    model = Classifier(functools.partial(SmallCNN, channels=(4, 8)), dm.input_shape, dm.num_classes, lr=0.05)
    return model, dm


@pytest.mark.parametrize("k,batching", [(1, "auto"), (4, "vmap"), (4, "loop")])
def test_flops_of_a_convolutional_step_are_one_workers_whatever_the_batching(k, batching):
    """Defect 1: under vmap a convolution's FLOPs were counted several times (k=4: 2x, k=16: 6x one worker's)."""
    expected = one_worker_step_flops(*cnn_model())
    model, dm = cnn_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1), workers_per_device=k, batching=batching, device_flops=1e9,
                               start_method="popen")
    fit_in_process(strategy, model, dm, max_steps=3)
    assert strategy.compute.step_flops == expected > 0
    if k > 1:
        assert strategy.steps.mode == batching  # only the counted step ran looped


def test_a_second_fit_on_the_same_trainer_starts_a_new_session(tmp_path):
    """Defect 5: a second fit kept the first fit's step FLOPs and failed recording its trace."""
    model, dm = digits_model(seed=1, hidden=(8,))
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=1), device_flops=1e9, record_trace=str(tmp_path / "t.npz"),
                               start_method="popen")
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with in_process():
        trainer.fit(model, dm)
    small = strategy.compute.step_flops
    assert strategy.clock.rounds == 3
    steps = []

    class CountSteps(pl.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    big, _ = digits_model(seed=1, hidden=(512,))  # a 64x wider hidden layer: many more FLOPs a step
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.callbacks.append(CountSteps())
    with in_process():
        trainer.fit(big, dm)
    assert strategy.compute.step_flops == one_worker_step_flops(*digits_model(seed=1, hidden=(512,))) > 10 * small
    assert steps and strategy.clock.rounds == len(steps)  # the second fit's clock started at round 0
    recorded = list(TraceNetwork(tmp_path / "t.npz").recorded())  # the trace holds the second fit's rounds, of its size
    assert [r for r, _ in recorded] == list(range(len(steps)))
    assert recorded[0][1].up.shape == strategy.session.spec.up_shape


def test_predict_with_virtual_workers_uses_the_loader_as_it_is():
    """Defect 8: predict with workers_per_device > 1 failed ("needs a DataLoader with batch_size")."""
    model, dm = digits_model(seed=2)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), workers_per_device=2, start_method="popen")
    trainer = fit_in_process(strategy, model, dm, max_steps=2)
    dm.setup("fit")
    dataset = dm.val_dataloader().dataset
    inputs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    loader = torch.utils.data.DataLoader(inputs, batch_size=7)  # a batch is a tensor of inputs: the default predict_step
    with in_process():
        predictions = trainer.predict(model, loader)
    assert sum(p.shape[0] for p in predictions) == len(inputs)  # every row once: the loader was not sharded over the workers
    with torch.no_grad():
        assert torch.equal(predictions[0], model(inputs[:7]))  # worker 0's replica, which the module holds


def test_restoring_a_checkpoint_into_a_module_attached_to_no_trainer(tmp_path):
    """Defect 11: Lightning's checkpoint connector restores after a spawned fit into a module with no Trainer;
    load_model_state_dict asked module.trainer and raised."""
    model, dm = digits_model(seed=3)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=3), start_method="popen")
    trainer = fit_in_process(strategy, model, dm, max_steps=2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    fresh, _ = digits_model(seed=9)
    other = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=3))
    other.connect(fresh)
    assert fresh._trainer is None
    other.load_model_state_dict(checkpoint)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("k_saved,k_resumed", [(2, 1), (2, 3)])
def test_a_checkpoint_of_virtual_workers_resumes_into_another_worker_count_from_worker_zero(tmp_path, k_saved, k_resumed):
    """Defect 7: resuming a k > 1 checkpoint into another worker count crashed on the stacked optimizer state."""
    model, dm = digits_model(seed=4, momentum=0.9)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=4), workers_per_device=k_saved, start_method="popen")
    fit_in_process(strategy, model, dm, max_steps=3, callbacks=[ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["lossy_ps"]["workers"]
    assert not torch.equal(saved["params"][0], saved["params"][1])  # the workers differ under drops
    model, dm = digits_model(seed=5, momentum=0.9)
    resumed = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=4), workers_per_device=k_resumed, start_method="popen")
    starts = []

    class FirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if not starts:
                starts.append(resumed.replicas.worker_state(trainer.lightning_module)["params"].clone())
                states = [resumed.optimizers[0].state[p]["momentum_buffer"].clone() for p in resumed.replicas.trained_tensors()[0]]
                starts.append(states)

    pl_trainer = pl.Trainer(strategy=resumed, accelerator="cpu", devices=1, max_steps=5, logger=False, callbacks=[FirstStep()],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with in_process():
        pl_trainer.fit(model, dm, ckpt_path=str(tmp_path / "last.ckpt"))
    params, momenta = starts
    assert torch.equal(params, saved["params"][:1].expand(k_resumed, -1))  # every worker starts from worker 0's replica
    worker0 = saved["optimizers"][0][0]["state"]
    for i, m in enumerate(momenta):
        rows = m if k_resumed > 1 else m.unsqueeze(0)
        for row in rows:
            assert torch.equal(row, worker0[i]["momentum_buffer"])
    assert resumed.clock.rounds == 5  # the clock went on from the checkpoint's 3 rounds


def test_a_down_worker_neither_times_the_round_nor_sets_its_compute_time():
    """Defect 4, through a fit: worker 1 is down the whole run and named fast (0.1x); the round starts when the
    fastest worker *up* is done, and the uplink carries nothing of worker 1's."""
    model, dm = digits_model(seed=6)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), workers_per_device=2, compute_time_s=0.01,
                               slow_workers={1: 0.1}, worker_failures=[[1, 0, 1000]], start_method="popen")
    fit_in_process(strategy, model, dm, max_steps=3)
    assert strategy.clock.compute_time_s == pytest.approx(3 * 0.01)  # worker 0's compute, not the down worker's 0.001
    assert strategy.last_round.up_time_s == 0 and strategy.last_round.stats["workers_down"] == 1  # nobody left to send to


class IgnoresFailures(BernoulliNetwork):
    """A user's network that forgets the failure schedule: it returns every packet delivered."""

    def outcome(self, spec):
        out = super().outcome(spec)
        out.up[:] = True
        out.down[:] = True
        return out


def test_a_network_that_delivers_a_down_workers_packets_fails_the_round_in_one_line():
    """The network owns the failure schedule; the round holds it to that instead of cutting masks after it."""
    model, dm = digits_model(seed=6)
    strategy = LossyPSStrategy(network=IgnoresFailures(0.0), workers_per_device=2, worker_failures=[[1, 1, 2]],
                               start_method="popen")
    with pytest.raises(ValueError, match=r"round 1: worker 1 is down \(worker_failures\) but the network delivered its packets"):
        fit_in_process(strategy, model, dm, max_steps=3)


def test_adam_with_failures_and_stacked_workers_is_refused_before_the_first_step():
    """Defect 9: Adam's shared step count moved on for a frozen row (2x1 and 1x2 layouts differed)."""
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=16)
    model = Classifier(functools.partial(SmallCNN, channels=(4, 8)), dm.input_shape, dm.num_classes, optimizer="adam", lr=1e-3)
    steps = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), workers_per_device=2, worker_failures=[[1, 1, 2]], start_method="popen")
    with pytest.raises(ValueError, match="worker_failures with workers_per_device > 1"):
        fit_in_process(strategy, model, dm, max_steps=2, callbacks=[CountSteps()])
    assert not steps


def test_dedicated_servers_resume_into_another_worker_count_from_worker_zero(tmp_path, caplog):
    """The servers' blocks of another layout do not fit: the servers start from worker 0's restored model (a warning)."""
    model, dm = digits_model(seed=7)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    saving = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=7), workers_per_device=2, colocated_servers=False,
                             start_method="popen")
    fit_in_process(saving, model, dm, max_steps=2, callbacks=[ckpt], enable_checkpointing=True)
    model, dm = digits_model(seed=8)
    resumed = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=7), workers_per_device=1, colocated_servers=False,
                              start_method="popen")
    servers = []

    class FirstStep(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if not servers:
                servers.append(resumed.session.exchange.server_blocks.clone())

    with caplog.at_level("WARNING"):
        pl_trainer = pl.Trainer(strategy=resumed, accelerator="cpu", devices=1, max_steps=4, logger=False, callbacks=[FirstStep()],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with in_process():
            pl_trainer.fit(model, dm, ckpt_path=str(tmp_path / "last.ckpt"))
    assert "dedicated-server blocks (2," in caplog.text and "start from worker 0's restored model" in caplog.text
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["lossy_ps"]["workers"]["params"][0]
    numel = saved.numel()
    assert torch.equal(servers[0].reshape(-1)[:numel], saved)  # worker 0's replica, as restored
    assert resumed.clock.rounds == 4
