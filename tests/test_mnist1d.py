"""MNIST-1D: generated on this machine (no network), the benchmark's CNN, and a short lossy fit."""

from __future__ import annotations

import functools
import socket

import numpy as np
import pytest
import torch

from pl_lossy import LossyPSStrategy
from pl_lossy.experiment.data import MNIST1DDataModule
from pl_lossy.experiment.models import CNN1D, Classifier
from pl_lossy.network import BernoulliNetwork
from tests.fits import fit_in_process


def test_generated_without_network_access_and_the_same_every_time(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    first, second = MNIST1DDataModule(), MNIST1DDataModule()
    first.setup("fit")
    second.setup("fit")
    assert np.array_equal(np.random.get_state()[1], before)  # the training's own numpy draws are left alone
    x, y = first.train_set.tensors
    xv, yv = first.val_set.tensors
    assert tuple(x.shape) == (4000, 1, 40) and tuple(xv.shape) == (1000, 1, 40)
    assert sorted(torch.unique(y).tolist()) == list(range(10)) and torch.bincount(y).min() > 300
    assert torch.equal(x, second.train_set.tensors[0]) and torch.equal(yv, second.val_set.tensors[1])


def test_the_benchmarks_cnn_shape():
    net = CNN1D((1, 40), 10)
    assert tuple(net(torch.zeros(3, 1, 40)).shape) == (3, 10)
    assert sum(p.numel() for p in net.parameters()) == 5210  # 25x(1x5+1) + 2x25x(25x3+1) + 125x10+10
    with pytest.raises(ValueError, match="too short"):
        CNN1D((1, 2), 10)


def test_eight_lossy_workers_learn_mnist1d():
    torch.manual_seed(0)
    dm = MNIST1DDataModule(batch_size=32)
    model = Classifier(functools.partial(CNN1D, channels=25), dm.input_shape, dm.num_classes, lr=0.1)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=0), workers_per_device=8, start_method="popen")
    trainer = fit_in_process(strategy, model, dm, max_epochs=20)
    assert trainer.callback_metrics["val_acc"] > 0.3  # chance is 0.1
    assert strategy.n_workers == 8 and 0.85 < strategy.clock.delivered_up < 0.95
