"""Data modules for the examples: all work offline (digits and synthetic ship with scikit-learn;
MNIST-1D is generated on the machine; CIFAR-10 is read from a directory the user provides)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class _ArrayDataModule(pl.LightningDataModule):
    """Train/val tensors in memory; Lightning adds the DistributedSampler in multi-process runs."""

    input_shape: tuple[int, ...]
    num_classes: int

    def __init__(self, batch_size: int = 32, num_workers: int = 0, eval_train: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_train = eval_train
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation set; with ``eval_train``, the whole training set too (a second loader)."""
        val = DataLoader(self.val_set, batch_size=256, shuffle=False, num_workers=self.num_workers)
        if not self.eval_train:
            return val
        return [val, DataLoader(self.train_set, batch_size=256, shuffle=False, num_workers=self.num_workers)]


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int):
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))


class DigitsDataModule(_ArrayDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits, as ``[1, 8, 8]`` images standardized with the
    training split's mean and std; a fixed ``seed`` picks the validation split."""

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size, num_workers)
        self.val_fraction, self.seed = val_fraction, seed
        _split(np.zeros(2), np.zeros(2), val_fraction, seed)  # validate now, before any process starts

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.images.astype(np.float32)[:, None]
        (xt, yt), (xv, yv) = _split(x, digits.target, self.val_fraction, self.seed)
        mean, std = xt.mean(), xt.std()
        self.train_set = _tensors((xt - mean) / std, yt)
        self.val_set = _tensors((xv - mean) / std, yv)


class MNIST1DDataModule(_ArrayDataModule):
    """MNIST-1D (Greydanus & Kobak, 2020): ten digit templates as 1-D series of length 40, shifted,
    scaled, sheared and noised; ``[1, 40]`` inputs. Generated here by the ``mnist1d`` package's
    ``make_dataset`` with its default arguments (5,000 series, seed 42; the package's download path is
    never used): its 4,000-series training split trains, its 1,000-series test split validates, so
    ``val_acc`` is the benchmark's test accuracy."""

    input_shape = (1, 40)
    num_classes = 10

    def __init__(self, batch_size: int = 32, num_workers: int = 0, eval_train: bool = False) -> None:
        super().__init__(batch_size, num_workers, eval_train)

    def setup(self, stage: str | None = None) -> None:
        from mnist1d.data import get_dataset_args, make_dataset

        state = np.random.get_state()  # make_dataset seeds numpy's global generator; training's draws stay as they were
        try:
            data = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(state)
        self.train_set = _tensors(data["x"][:, None], data["y"])
        self.val_set = _tensors(data["x_test"][:, None], data["y_test"])


class SyntheticDataModule(_ArrayDataModule):
    """``sklearn.datasets.make_classification`` reshaped to ``input_shape`` (e.g. ``[3, 32, 32]`` for ResNet-20)."""

    def __init__(
        self,
        n_samples: int = 2000,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        n_informative: int = 20,
        class_sep: float = 1.0,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.input_shape = tuple(int(d) for d in input_shape)
        n_features = int(np.prod(self.input_shape))
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 1 <= n_informative <= n_features:
            raise ValueError(f"n_informative must be in [1, {n_features}] for input_shape {self.input_shape}, got {n_informative}")
        if 2**n_informative < 2 * num_classes:
            raise ValueError(f"n_informative={n_informative} is too small for {num_classes} classes")
        self.num_classes = num_classes
        self.n_samples, self.n_informative, self.class_sep = n_samples, n_informative, class_sep
        self.val_fraction, self.seed = val_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=self.n_samples,
            n_features=int(np.prod(self.input_shape)),
            n_informative=self.n_informative,
            n_redundant=0,
            n_classes=self.num_classes,
            n_clusters_per_class=1,
            class_sep=self.class_sep,
            random_state=self.seed,
        )
        x = x.astype(np.float32).reshape(-1, *self.input_shape)
        (xt, yt), (xv, yv) = _split(x, y, self.val_fraction, self.seed)
        self.train_set, self.val_set = _tensors(xt, yt), _tensors(xv, yv)


class _AugmentedImages(Dataset):
    """Random crop (4-pixel zero padding) and horizontal flip, the usual CIFAR augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = torch.nn.functional.pad(self.x[i], (4, 4, 4, 4))
        dy, dx = np.random.randint(0, 9, size=2)
        img = img[:, dy : dy + 32, dx : dx + 32]
        if np.random.rand() < 0.5:
            img = img.flip(-1)
        return img, self.y[i]


class Cifar10DataModule(_ArrayDataModule):
    """CIFAR-10 from the python-version batches in ``data_dir`` (``data_batch_1..5`` and ``test_batch``,
    as unpacked from ``cifar-10-python.tar.gz``; a ``cifar-10-batches-py`` subfolder is found too).
    Nothing is downloaded. ``limit_train`` keeps only the first N training images."""

    input_shape = (3, 32, 32)
    num_classes = 10
    _MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)[:, None, None]
    _STD = np.array([0.2470, 0.2435, 0.2616], np.float32)[:, None, None]

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        augment: bool = True,
        limit_train: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not data_dir:
            raise ValueError("cifar10 needs data.data_dir: a folder with data_batch_1..5 and test_batch (the python version)")
        self.data_dir = self._find(Path(data_dir))
        self.augment, self.limit_train = augment, limit_train

    @staticmethod
    def _find(root: Path) -> Path:
        for candidate in (root, root / "cifar-10-batches-py"):
            if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
                return candidate
        raise FileNotFoundError(
            f"no CIFAR-10 python batches under {root} (expected data_batch_1..5 and test_batch); "
            "unpack cifar-10-python.tar.gz there"
        )

    def _read(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            path = self.data_dir / name
            if not path.is_file():
                continue
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        x = (np.concatenate(xs).astype(np.float32) / 255.0 - self._MEAN) / self._STD
        return x, np.concatenate(ys)

    def setup(self, stage: str | None = None) -> None:
        xt, yt = self._read([f"data_batch_{i}" for i in range(1, 6)])
        if self.limit_train:
            xt, yt = xt[: self.limit_train], yt[: self.limit_train]
        xv, yv = self._read(["test_batch"])
        train = _tensors(xt, yt)
        self.train_set = _AugmentedImages(*train.tensors) if self.augment else train
        self.val_set = _tensors(xv, yv)
