"""Models for the examples: a small MLP, a small CNN and ResNet-20, wrapped in a LightningModule."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)) -> None:
        dims = [int(torch.tensor(input_shape).prod()), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Two 3x3 conv layers with ReLU and 2x2 max-pooling, then a linear classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(input_shape)} is too small for {len(channels)} pooling layers")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class CNN1D(nn.Module):
    """The MNIST-1D benchmark's convolutional baseline: three 1-D convolutions (kernels 5, 3, 3, stride 2,
    padding 1, ``channels`` each) with ReLU, then a linear classifier (5,210 parameters at 25 channels)."""

    def __init__(self, input_shape: Sequence[int] = (1, 40), num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        c, length = input_shape
        layers: list[nn.Module] = []
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(c, channels, kernel, stride=2, padding=1), nn.ReLU()]
            c, length = channels, (length + 2 - kernel) // 2 + 1
        if length < 1:
            raise ValueError(f"input {tuple(input_shape)} is too short for three stride-2 convolutions")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 basic blocks (16/32/64 channels), ~0.27M parameters."""

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c_in = [], width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for i in range(3):
                blocks.append(_BasicBlock(c_in, c_out, 2 if (i == 0 and stage > 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Classifier(pl.LightningModule):
    """Cross-entropy classification around any ``net(input_shape=..., num_classes=...)`` factory.

    Logs ``train_loss`` per step, ``val_loss`` and ``val_acc`` per epoch (``sync_dist``: the mean over
    ranks, each rank evaluating its own replica on its shard of the validation set).

    ``lr_milestones``: fractions of the run's optimizer steps after which the learning rate is
    multiplied by ``lr_gamma`` (the step schedule of the CIFAR ResNet recipe: ``[0.5, 0.75]``, x 0.1).
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        input_shape: Sequence[int],
        num_classes: int,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[float] = (),
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if any(not 0 < m < 1 for m in lr_milestones) or list(lr_milestones) != sorted(lr_milestones):
            raise ValueError(f"lr_milestones must be increasing fractions of the run in (0, 1), got {list(lr_milestones)}")
        if not 0 < lr_gamma <= 1:
            raise ValueError(f"lr_gamma must be in (0, 1], got {lr_gamma}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net(input_shape=tuple(input_shape), num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True)  # the epoch's mean
        return loss

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loader 0: the validation set (``val_loss``, ``val_acc``); loader 1, when the data module
        evaluates the training set (``eval_train``): ``train_eval_loss``, ``train_eval_acc`` (the
        paper's measure: the whole training set's loss, here of every worker's replica, averaged)."""
        x, y = batch
        logits = self(x)
        prefix = "train_eval" if dataloader_idx == 1 else "val"
        log = dict(on_epoch=True, sync_dist=True, add_dataloader_idx=False)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), prog_bar=prefix == "val", **log)
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=prefix == "val", **log)

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=h.lr, weight_decay=h.weight_decay)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        if not h.get("lr_milestones"):
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("lr_milestones need a run of known length: set trainer.max_steps or trainer.max_epochs")
        milestones = [max(1, int(m * steps)) for m in h.lr_milestones]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=h.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
