"""LossyPSStrategy honours Lightning's contract: accumulation, manual optimization, precision, clipping."""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from pl_lossy import BernoulliNetwork, LossyPSStrategy

from fits import RecordingLossyPS, digits_model, fit, flat_params, load_rounds, steps_per_epoch


def test_gradient_accumulation_runs_one_round_per_optimizer_step(tmp_path):
    model, dm = digits_model()
    fit(RecordingLossyPS(tmp_path, network=BernoulliNetwork(0.1)), model, dm, accumulate_grad_batches=2)
    rounds = load_rounds(tmp_path, 2)[0]["rounds"]
    assert len(rounds) == steps_per_epoch(dm) // 2


class TwoStepManual(pl.LightningModule):
    """Manual optimization with two optimizer steps per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a = torch.nn.Linear(64, 32)
        self.b = torch.nn.Linear(32, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt in (opt_a, opt_b):
            loss = F.cross_entropy(self.b(torch.relu(self.a(x.flatten(1)))), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_manual_optimization_runs_one_round_per_optimizer_step(tmp_path):
    _, dm = digits_model()
    model = TwoStepManual()
    fit(RecordingLossyPS(tmp_path, network=BernoulliNetwork(0.1)), model, dm, limit_train_batches=4, limit_val_batches=0)
    assert len(load_rounds(tmp_path, 2)[0]["rounds"]) == 8


def test_bf16_mixed_precision_and_clipping_train():
    model, dm = digits_model()
    before = flat_params(model).clone()
    trainer = fit(LossyPSStrategy(network=BernoulliNetwork(0.1), start_method="fork"), model, dm,
                  precision="bf16-mixed", gradient_clip_val=0.5, max_epochs=2)
    assert not torch.equal(before, flat_params(model))
    assert float(trainer.callback_metrics["val_acc"]) > 0.6
