"""What a checkpoint holds of every worker (pl_lossy.workers.checkpointing), tested without a fit."""

import io

import torch
from torch import nn

from pl_lossy.workers.checkpointing import merge_processes, process_workers, workers_mean_state_dict
from pl_lossy.workers.replicas import WorkerReplicas


class Tied(nn.Module):
    """An embedding and an output head sharing one weight (as GPT models tie them), and an untied bias."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(5, 3)
        self.decoder = nn.Linear(3, 5)
        self.decoder.weight = self.encoder.weight
        self.register_buffer("count", torch.zeros(2))


def checkpoint_of_two_workers(module: nn.Module, rows: torch.Tensor) -> dict:
    """A checkpoint as LossyPSStrategy writes it for 1 process x 2 workers whose replicas are ``rows``, saved and loaded."""
    replicas = WorkerReplicas(module, 2, row_numel=rows.shape[1])
    with torch.no_grad():
        replicas.rows.copy_(rows)
    checkpoint = {"state_dict": module.state_dict(), "lossy_ps": {"workers": merge_processes([process_workers(replicas, [], module)])}}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_every_name_of_a_tied_weight_gets_the_workers_mean():
    torch.manual_seed(0)
    module = Tied()
    numel = sum(p.numel() for p in module.parameters())  # the tied weight once: 15 + 5
    rows = torch.randn(2, numel)
    mean = workers_mean_state_dict(checkpoint_of_two_workers(module, rows))
    expected_weight, expected_bias = rows.mean(0)[:15].view(5, 3), rows.mean(0)[15:]
    assert not torch.allclose(rows[0], rows[1])
    for name in ("encoder.weight", "decoder.weight"):
        torch.testing.assert_close(mean[name], expected_weight, msg=name)
    torch.testing.assert_close(mean["decoder.bias"], expected_bias)
    fresh = Tied()
    fresh.load_state_dict(mean)
    torch.testing.assert_close(fresh.encoder.weight.detach(), expected_weight)
    torch.testing.assert_close(fresh.decoder.weight.detach(), expected_weight)


def test_a_record_without_tied_names_finds_the_ties_in_the_state_dict():
    """Checkpoints written before tied names were recorded: the state dict's views of one parameter say which."""
    torch.manual_seed(1)
    module = Tied()
    rows = torch.randn(2, 20)
    checkpoint = checkpoint_of_two_workers(module, rows)
    checkpoint["lossy_ps"]["workers"].pop("tied_names", None)
    mean = workers_mean_state_dict(checkpoint)
    for name in ("encoder.weight", "decoder.weight"):
        torch.testing.assert_close(mean[name], rows.mean(0)[:15].view(5, 3), msg=name)
