"""Which samples each virtual worker trains on.

With ``k`` workers per process and ``W = processes x k`` workers in all, worker ``w`` (process
``w // k``, slot ``w % k``) must see exactly the samples a process of its own would see in a run of
``W`` processes with one worker each: Lightning gives such a process
``DistributedSampler(num_replicas=W, rank=w)`` batched by the loader's ``batch_size``. So a process
draws one such sampler per hosted worker and yields, per step, its ``k`` workers' batches
concatenated: shard ``j`` of the process's batch (``batch_size`` rows, in order) is worker
``rank * k + j``'s batch. Then 4 processes x 1 worker, 2 x 2 and 1 x 4 train on the same samples.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler, SequentialSampler


class WorkerSamplers:
    """The ``DistributedSampler`` of each worker a process hosts; ``set_epoch`` reaches them all.

    It is the batch sampler's ``sampler`` because that is where Lightning calls ``set_epoch`` each epoch."""

    def __init__(self, samplers: list[DistributedSampler]) -> None:
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class VirtualWorkerBatchSampler(Sampler[list[int]]):
    """Batches of ``k`` worker batches (``k x batch_size`` indices; the last ones may be shorter but
    stay ``k`` equal shards, because every worker's sampler has the same length)."""

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
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = WorkerSamplers([
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
        for b in range(len(self)):
            batch: list[int] = []
            for order in orders:
                batch += order[b * self.batch_size : (b + 1) * self.batch_size]
            yield batch


def shard_dataloader(loader: object, n_workers: int, rank: int, workers_per_process: int, default_seed: int = 0) -> object:
    """The same data as ``loader`` but batched for ``workers_per_process`` virtual workers (see module doc).

    ``loader.batch_size`` is the per-worker batch. The shuffle flag and seed come from the sampler
    Lightning put in (a ``DistributedSampler``) or the user's (random or sequential).
    """
    if not isinstance(loader, DataLoader):
        raise TypeError(f"workers_per_device > 1 needs torch DataLoaders (to shard batches per worker), got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ValueError("workers_per_device > 1 needs a DataLoader with batch_size (the per-worker batch), not a batch_sampler")
    sampler = loader.sampler
    sampler_drop_last = False
    if isinstance(sampler, DistributedSampler):
        shuffle, seed, sampler_drop_last = sampler.shuffle, sampler.seed, sampler.drop_last
    elif isinstance(sampler, RandomSampler):
        shuffle, seed = True, default_seed
    elif isinstance(sampler, SequentialSampler):
        shuffle, seed = False, default_seed
    else:
        raise ValueError(f"workers_per_device > 1 cannot shard a custom sampler ({type(sampler).__name__}); use shuffle=True/False")
    batch_sampler = VirtualWorkerBatchSampler(
        len(loader.dataset), n_workers, rank * workers_per_process, workers_per_process,
        loader.batch_size, shuffle, seed, loader.drop_last, sampler_drop_last,
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

