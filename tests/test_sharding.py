"""Which rows each virtual worker trains on when the loader has a sampler of the user's (pl_lossy.workers.sharding)."""

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, Sampler, SubsetRandomSampler, TensorDataset

from pl_lossy import BernoulliNetwork, LossyPSStrategy
from pl_lossy.workers.sharding import shard_dataloader

from fits import fit_in_process


def subset_sampler(rows, seed=3):
    """A user's random subset: its order is drawn from its own generator, the same in every process."""
    return SubsetRandomSampler(rows, generator=torch.Generator().manual_seed(seed))


def test_a_users_sampler_is_sharded_as_w_processes_would_shard_it():
    """Worker w of 1 process x 3 workers draws, epoch after epoch, what process w of 3 processes draws from
    Lightning's DistributedSamplerWrapper of the same sampler (11 rows over 3 workers: one padded)."""
    data, rows, b = list(range(100)), [5, 17, 23, 42, 8, 61, 99, 0, 13, 77, 31], 2
    processes = [DataLoader(data, batch_size=b, sampler=DistributedSamplerWrapper(subset_sampler(rows), num_replicas=3, rank=w, shuffle=True, seed=7))
                 for w in range(3)]
    wrapped = DistributedSamplerWrapper(subset_sampler(rows), num_replicas=1, rank=0, shuffle=True, seed=7)  # what Lightning makes of it
    sharded = shard_dataloader(DataLoader(data, batch_size=b, sampler=wrapped), n_workers=3, rank=0, workers_per_process=3)
    for epoch in range(3):
        for loader in (*processes, sharded):
            _set_sampler_epoch(loader, epoch)
        expected = [[batch.tolist() for batch in loader] for loader in processes]
        batches = [batch.tolist() for batch in sharded]
        assert len(batches) == len(expected[0]) == 2
        for step, batch in enumerate(batches):
            assert batch == sum((expected[w][step] for w in range(3)), [])
        assert set(sum(batches, [])) == set(rows)


def test_two_workers_of_one_process_train_on_the_users_sampler_rows_only():
    """Lightning wraps the user's sampler; with k = 2 the workers still see its 8 rows, each once an epoch."""
    seen = []

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def on_train_batch_start(self, batch, batch_idx):
            seen.append((self.current_epoch, batch[0].view(-1).long().tolist()))

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dataset = TensorDataset(torch.arange(100.0).unsqueeze(1))
    loader = DataLoader(dataset, batch_size=2, sampler=SubsetRandomSampler(range(8)))
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), workers_per_device=2, start_method="popen")
    fit_in_process(strategy, Recorder(), loader, max_epochs=2, limit_val_batches=0)
    for epoch in (0, 1):
        rows = sum((batch for e, batch in seen if e == epoch), [])
        assert sorted(rows) == list(range(8))


def test_plain_loaders_are_sharded_as_before():
    """RandomSampler, SequentialSampler and Lightning's DistributedSampler: DistributedSampler over the dataset per worker."""
    data = list(range(37))
    for loader, shuffle in ((DataLoader(data, batch_size=4, shuffle=True), True), (DataLoader(data, batch_size=4), False),
                            (DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=5)), True)):
        sharded = shard_dataloader(loader, n_workers=2, rank=0, workers_per_process=2, default_seed=5)
        _set_sampler_epoch(sharded, 1)
        expected = []
        for w in range(2):
            sampler = DistributedSampler(data, num_replicas=2, rank=w, shuffle=shuffle, seed=5)
            sampler.set_epoch(1)
            expected.append([b.tolist() for b in DataLoader(data, batch_size=4, sampler=sampler)])
        assert [b.tolist() for b in sharded] == [x + y for x, y in zip(*expected)]


class EveryOther(DistributedSampler):
    """A DistributedSampler of the user's own making, with its own order: not to be replaced."""

    def __iter__(self):
        return iter(list(super().__iter__())[::2])


class Reversed(Sampler):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n - 1, -1, -1))

    def __len__(self):
        return self.n


def test_samplers_that_cannot_be_sharded_exactly_are_refused_in_one_line():
    data = list(range(20))
    for sampler, name in ((EveryOther(data, num_replicas=1, rank=0), "EveryOther"), (Reversed(20), "Reversed")):
        with pytest.raises(ValueError, match=f"workers_per_device > 1 cannot shard .*{name}"):
            shard_dataloader(DataLoader(data, batch_size=2, sampler=sampler), n_workers=2, rank=0, workers_per_process=2)
