"""Which samples each virtual worker trains on.

With ``k`` workers per process and ``W = processes x k`` workers in all, worker ``w`` (process
``w // k``, slot ``w % k``) must see exactly the samples a process of its own would see in a run of
``W`` processes with one worker each: Lightning gives such a process
``DistributedSampler(num_replicas=W, rank=w)`` batched by the loader's ``batch_size``. So a process
draws one such sampler per hosted worker and yields, per step, its ``k`` workers' batches
concatenated: shard ``j`` of the process's batch (``batch_size`` rows, in order) is worker
``rank * k + j``'s batch. Then 4 processes x 1 worker, 2 x 2 and 1 x 4 train on the same samples.

A sampler of the user's (say ``SubsetRandomSampler``) reaches the strategy wrapped by Lightning in a
``DistributedSamplerWrapper``, which gives process ``w`` of ``W`` the positions ``DistributedSampler``
would give it, in the user's sampler's order of that epoch. The workers are sharded the same way:
the user's sampler is drawn once an epoch per process (as each of ``W`` processes draws its own copy,
which Lightning's wrapper presumes draw the same order) and each worker takes the positions of its
rank. Samplers that cannot be sharded exactly (any other ``DistributedSampler`` subclass, a custom
sampler Lightning did not wrap) are refused in one line rather than silently replaced.
"""

from __future__ import annotations

from typing import Iterator

from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler


class WorkerSamplers:
    """The ``DistributedSampler`` of each worker a process hosts; ``set_epoch`` reaches them all, and the
    user's sampler ``source`` if it has one (as Lightning's ``DistributedSamplerWrapper`` forwards it).

    It is the batch sampler's ``sampler`` because that is where Lightning calls ``set_epoch`` each epoch."""

    def __init__(self, samplers: list[DistributedSampler], source: Sampler | None = None) -> None:
        self.samplers, self.source = samplers, source

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)
        if callable(getattr(self.source, "set_epoch", None)):
            self.source.set_epoch(epoch)


class VirtualWorkerBatchSampler(Sampler[list[int]]):
    """Batches of ``k`` worker batches (``k x batch_size`` indices; the last ones may be shorter but
    stay ``k`` equal shards, because every worker's sampler has the same length).

    The workers' distributed samplers are over ``range(dataset_len)``: dataset indices, or with
    ``source`` (a user's sampler of ``dataset_len`` indices) positions in ``source``'s order, drawn
    once an epoch and shared by the ``k`` workers so that together they cover it as ``W`` processes would.
    """

    def __init__(
        self,
        dataset_len: int,
        n_workers: int,
        first_worker: int,
        workers_per_process: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        sampler_drop_last: bool = False,
        source: Sampler | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = WorkerSamplers(source=source, samplers=[
            DistributedSampler(
                range(dataset_len), num_replicas=n_workers, rank=first_worker + j,
                shuffle=shuffle, seed=seed, drop_last=sampler_drop_last,
            )
            for j in range(workers_per_process)
        ])
        self.batch_size, self.drop_last = batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.sampler.samplers[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        orders = [list(s) for s in self.sampler.samplers]
        if self.sampler.source is not None:  # positions -> the user's indices, one draw for all workers
            drawn = list(self.sampler.source)
            orders = [[drawn[i] for i in order] for order in orders]
        for b in range(len(self)):
            batch: list[int] = []
            for order in orders:
                batch += order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch


def shard_dataloader(loader: object, n_workers: int, rank: int, workers_per_process: int, default_seed: int = 0) -> object:
    """The same data as ``loader`` but batched for ``workers_per_process`` virtual workers (see module doc).

    ``loader.batch_size`` is the per-worker batch. The shuffle flag and seed come from the sampler
    Lightning put in (a ``DistributedSampler``, or a ``DistributedSamplerWrapper`` around the user's
    sampler, whose indices are then sharded) or the user's (random or sequential); other samplers
    are a ValueError.
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"workers_per_device > 1 needs torch DataLoaders (to shard batches per worker), got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError("workers_per_device > 1 needs a DataLoader with batch_size (the per-worker batch), not a batch_sampler")
    shuffle, seed, sampler_drop_last, source = _sampling(loader.sampler, default_seed)
    batch_sampler = VirtualWorkerBatchSampler(
        len(source) if source is not None else len(loader.dataset), n_workers, rank * workers_per_process, workers_per_process,
        loader.batch_size, shuffle, seed, loader.drop_last, sampler_drop_last, source,
    )
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


def _sampling(sampler: Sampler, default_seed: int) -> tuple[bool, int, bool, Sampler | None]:
    """How the workers draw in place of ``sampler``: ``(shuffle, seed, drop_last, source)`` of their
    distributed samplers, ``source`` the user's sampler whose indices they shard (None: the dataset's).
    ValueError in one line for a sampler whose draws the workers could not reproduce exactly."""
    if type(sampler) is DistributedSampler:  # Lightning's for a random or sequential loader (or a plain one of the user's)
        return sampler.shuffle, sampler.seed, sampler.drop_last, None
    if type(sampler) is DistributedSamplerWrapper:  # Lightning's around any other sampler: shard that sampler's draw
        # its dataset is Lightning's _DatasetSamplerWrapper, holding the user's sampler as _sampler
        return sampler.shuffle, sampler.seed, sampler.drop_last, sampler.dataset._sampler
    if isinstance(sampler, (RandomSampler, SequentialSampler)):  # not wrapped (use_distributed_sampler=False): as Lightning would
        return isinstance(sampler, RandomSampler), default_seed, False, None
    raise ValueError(
        f"workers_per_device > 1 cannot shard the sampler {type(sampler).__name__} exactly across the workers of a process: "
        "use a sampler that Lightning wraps for distributed training (Trainer(use_distributed_sampler=True), the default), "
        "shuffle=True/False, or workers_per_device=1"
    )
