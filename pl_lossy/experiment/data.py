"""Data modules for the examples: all work offline (digits and synthetic ship with scikit-learn;
MNIST-1D is generated on the machine; CIFAR-10 is read from a directory the user provides; text is the
running Python's standard library, or the user's files)."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..cache import cache_dir

log = logging.getLogger(__name__)


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


class _Windows(Dataset):
    """Non-overlapping windows of a byte array: window w is ``(bytes[w c : w c + c], bytes[w c + 1 : w c + c + 1])``
    as int64 tensors, the input and its next-byte targets (``c`` the context).

    With ``per_epoch``, an epoch is that many windows (at most all of them), successive epochs taking successive
    ones (wrapping around the array): item i of epoch e is window ``(e * per_epoch + i) mod windows``, the epoch
    read from ``epoch()`` (the trainer's) when the item is fetched, so that a run reads the whole split before
    any window twice, in epochs short enough to validate and report."""

    def __init__(self, data: np.ndarray, context: int, per_epoch: int | None = None, epoch: Callable[[], int] | None = None) -> None:
        self.data, self.context = torch.from_numpy(data), context
        self.windows = (len(self.data) - 1) // context
        self.per_epoch = min(per_epoch, self.windows) if per_epoch else None
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch or self.windows

    def __getitem__(self, i: int):
        w = ((self.epoch() if self.epoch else 0) * self.per_epoch + i) % self.windows if self.per_epoch else i
        chunk = self.data[w * self.context : (w + 1) * self.context + 1].long()
        return chunk[:-1], chunk[1:]


CORPUS_VERSION = 1  # of how the standard-library corpus is chosen and split: part of its cache key


def stdlib_corpus() -> list[Path]:
    """The default corpus: the running Python's top-level standard-library modules (``Lib/*.py``), by name, but
    ``_sysconfigdata_*`` (the build's own settings, different on every build)."""
    import sysconfig

    return sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if not p.name.startswith("_sysconfigdata"))


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"data.path: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"data.path: {path} has no files (hidden ones are skipped); give text files")
    return files


def _read_text(files: Sequence[Path], where: str, named: Path | str) -> list[bytes]:
    """The files' bytes; ValueError naming ``where`` if one is binary or all are empty (``named``: what was given)."""
    texts = []
    for f in files:
        raw = f.read_bytes()
        if b"\0" in raw:
            raise ValueError(f"{where}: {f} is binary (it has NUL bytes); give text files")
        texts.append(raw)
    if not sum(map(len, texts)):
        raise ValueError(f"{where}: {named} is empty; give text")
    return texts


def split_corpus(texts: Sequence[bytes], val_every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation byte arrays: with several files, every ``val_every``-th file (the last of each
    ``val_every``, at least one) validates, so that no file is in both; one file: its last ``1 / val_every``."""
    if len(texts) == 1:
        raw = np.frombuffer(texts[0], np.uint8)
        cut = len(raw) - max(1, len(raw) // val_every)
        return raw[:cut].copy(), raw[cut:].copy()
    val = {i for i in range(len(texts)) if i % val_every == val_every - 1} or {len(texts) - 1}
    join = lambda keep: np.frombuffer(b"".join(t for i, t in enumerate(texts) if keep(i)), np.uint8).copy()  # noqa: E731
    return join(lambda i: i not in val), join(lambda i: i in val)


def _cached_corpus(files: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """The standard-library corpus, split, from the cache if a whole copy is there, else read and (if the cache
    can be written) saved there; parallel jobs each write a temporary file and rename it into place."""
    import hashlib
    import tempfile

    key = hashlib.sha256(repr((CORPUS_VERSION, sys.version, [(f.name, f.stat().st_size) for f in files])).encode()).hexdigest()[:16]
    cached = cache_dir() / "text" / f"stdlib-{key}.npz"
    try:
        with np.load(cached) as arrays:
            return arrays["train"], arrays["val"]
    except Exception:  # noqa: BLE001 - absent, or damaged (empty, truncated, foreign): read the sources again
        pass
    train, val = split_corpus(_read_text(files, "the standard-library corpus", "Lib/*.py"))
    partial = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=cached.parent, prefix=cached.stem + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, train=train, val=val)
        os.replace(partial, cached)
    except OSError as exc:  # a read-only or full cache costs a re-read next time, not the run
        log.warning("text corpus not cached in %s (%s)", cached.parent, exc)
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return train, val


class ByteTextDataModule(pl.LightningDataModule):
    """Byte-level language modelling (vocabulary: the 256 byte values, no tokenizer) on real text.

    The default corpus is the running Python's standard library, its top-level modules (``Lib/*.py`` but the
    build's ``_sysconfigdata_*``: 167 files and 4.7 MB on CPython 3.11), split by file: every tenth file by
    name validates. It is read once and cached as two uint8 arrays under ``$PL_LOSSY_CACHE/text`` (default
    ``~/.cache/pl-lossy``), keyed by the files' names and sizes and the Python version; :meth:`describe` gives
    the corpus's digest, so that runs on two machines can tell whether they read the same bytes (a
    distribution that adds or patches modules changes it). ``path``: a text file (its last tenth validates)
    or a folder of them (split by file) instead.

    Items are non-overlapping windows of ``context`` bytes (the model's: the app passes it with
    :meth:`use_context`) and their next bytes. An epoch is ``epoch_windows`` windows of the training split
    (all workers together; at most the whole split), the next epoch the next ones, so that epochs are short
    enough to validate and report (3,200 windows: 100 steps of 2 workers x 16) and a run reads the whole
    split before it repeats; None: an epoch is the whole split. ``val_bytes`` bounds the validation split used
    (its first bytes), so that a validation stays seconds on a CPU; None uses all of it. The windows are cut
    from memory in the training process (no loader workers: there is nothing to overlap).
    """

    task = "language"
    num_classes = 256

    def __init__(self, path: str | None = None, context: int | None = None, batch_size: int = 16,
                 epoch_windows: int | None = 3200, val_bytes: int | None = 65536) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if epoch_windows is not None and epoch_windows < 1:
            raise ValueError(f"epoch_windows must be >= 1 (or null: an epoch is the whole split), got {epoch_windows}")
        if val_bytes is not None and val_bytes < 2:
            raise ValueError(f"val_bytes must be >= 2 (or null: the whole validation split), got {val_bytes}")
        self.path = Path(path).expanduser() if path else None
        self.batch_size, self.epoch_windows, self.val_bytes = batch_size, epoch_windows, val_bytes
        if self.path is not None:
            self.train_bytes, self.validation_bytes = split_corpus(_read_text(_text_files(self.path), "data.path", self.path))
        else:
            self.train_bytes, self.validation_bytes = _cached_corpus(stdlib_corpus())
        self.context: int | None = None
        if context is not None:
            self.use_context(context)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.context or 0,)

    def describe(self) -> str:
        import hashlib

        source = str(self.path) if self.path else f"the Python {sys.version.split()[0]} standard library (Lib/*.py)"
        digest = hashlib.sha256(self.train_bytes.tobytes() + self.validation_bytes.tobytes()).hexdigest()[:12]
        return f"{source}: {len(self.train_bytes):,} training / {len(self.validation_bytes):,} validation bytes, sha256 {digest}"

    def use_context(self, context: int) -> None:
        """Cut windows of ``context`` bytes; a context a split cannot fill is one ValueError."""
        if len(self.train_bytes) < int(context) + 1:
            raise ValueError(f"context {context} is longer than the training split ({len(self.train_bytes):,} bytes): "
                             "lower model.context or give more text (data.path)")
        validation = self._validation()
        if len(validation) < int(context) + 1:
            cause = (f"data.val_bytes={self.val_bytes} keeps {len(validation):,} bytes of the validation split"
                     if len(validation) < len(self.validation_bytes) else f"the validation split has {len(validation):,} bytes")
            raise ValueError(f"context {context} is longer than the validation data: {cause}; lower model.context, "
                             "raise data.val_bytes or give more text (data.path)")
        self.context = int(context)

    def check_workers(self, n_workers: int) -> None:
        """ValueError unless an epoch holds a batch for every worker (else Lightning trains no step, silently)."""
        windows = (len(self.train_bytes) - 1) // (self.context or 1)
        per_epoch = min(self.epoch_windows or windows, windows)
        if per_epoch < self.batch_size * n_workers:
            raise ValueError(f"an epoch of {per_epoch:,} windows holds no batch of {self.batch_size} for each of {n_workers} workers: "
                             "raise data.epoch_windows, lower data.batch_size or give more text (data.path)")

    def _validation(self) -> np.ndarray:
        return self.validation_bytes[: self.val_bytes] if self.val_bytes else self.validation_bytes

    def setup(self, stage: str | None = None) -> None:
        if self.context is None:
            raise RuntimeError("ByteTextDataModule needs the model's context: pass context= or call use_context()")
        self.train_set = _Windows(self.train_bytes, self.context, self.epoch_windows, self._epoch)
        self.val_set = _Windows(self._validation(), self.context)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64, shuffle=False)
