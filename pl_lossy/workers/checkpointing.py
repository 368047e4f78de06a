"""What a checkpoint holds of every worker, so that a resumed fit equals the uninterrupted one.

Lightning saves the module's ``state_dict`` and the optimizers' states of global rank 0 only: under
drops that is one replica of many (worker 0's). :class:`~pl_lossy.LossyPSStrategy` adds, under
``checkpoint["lossy_ps"]["workers"]``, every worker's (all processes', all virtual workers') state,
indexed by global worker ``w = rank * k + j``:

- ``params``: ``[W, numel]``, each worker's flat parameters (in the order of ``param_names``);
- ``tied_names``: ``{name: [other names]}`` for a parameter or buffer the module holds under several
  names (tied weights: ``param_names`` has only the first, as ``named_parameters()`` gives it);
- ``buffers``: ``{name: [W, *shape]}``, each worker's buffers (BatchNorm statistics);
- ``optimizers``: per optimizer, ``W`` plain ``optimizer.state_dict()``s, one per worker, as a
  process with one worker would have it.

Because everything is per worker, a checkpoint of 4 processes x 1 worker resumes as 2 x 2 or 1 x 4.

For inference, ``checkpoint["state_dict"]`` (what ``LightningModule.load_from_checkpoint`` reads) is
worker 0's replica; :func:`workers_mean_state_dict` gives the mean over all workers instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils._pytree import tree_map

from .replicas import WorkerReplicas


def _cpu(tree: Any) -> Any:
    return tree_map(lambda x: x.detach().cpu().clone() if isinstance(x, Tensor) else x, tree)


def _params_in_order(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def split_optimizer_state(optimizer: Optimizer, k: int) -> list[dict[str, Any]]:
    """``k`` per-worker state dicts from an optimizer of stacked ``[k, ...]`` parameters (k = 1: its own)."""
    state_dict = _cpu(optimizer.state_dict())
    if k == 1:
        return [state_dict]
    params = _params_in_order(optimizer)
    return [
        {
            "state": {
                idx: {name: v[j].clone() if isinstance(v, Tensor) and v.shape == params[idx].shape else v for name, v in s.items()}
                for idx, s in state_dict["state"].items()
            },
            "param_groups": state_dict["param_groups"],
        }
        for j in range(k)
    ]


def stack_optimizer_state(optimizer: Optimizer, states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The inverse of :func:`split_optimizer_state`: one state dict for this process's ``len(states)`` workers."""
    if len(states) == 1:
        return states[0]
    params = _params_in_order(optimizer)
    first = states[0]
    stacked = {}
    for idx, s in first["state"].items():
        shape = tuple(params[int(idx)].shape)
        stacked[idx] = {
            name: torch.stack([st["state"][idx][name] for st in states])
            if isinstance(v, Tensor) and (len(states), *v.shape) == shape else v
            for name, v in s.items()
        }
    return {"state": stacked, "param_groups": first["param_groups"]}


def tied_names(module: torch.nn.Module) -> dict[str, list[str]]:
    """``{first name: [other names]}`` of every parameter and buffer ``module`` holds under several names.

    ``named_parameters()`` and ``named_buffers()`` (hence ``param_names`` and the buffers' names) give
    a tensor once, under its first name; ``state_dict()`` gives it under every name."""
    names: dict[int, list[str]] = {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if t is not None:
            names.setdefault(id(t), []).append(name)
    return {group[0]: group[1:] for group in names.values() if len(group) > 1}


def process_workers(replicas: WorkerReplicas, optimizers: Sequence[Optimizer], module: torch.nn.Module) -> dict[str, Any]:
    """This process's workers: ``params [k, numel]``, ``buffers {name: [k, ...]}``, per optimizer k states."""
    state = replicas.worker_state(module)
    state["param_names"] = replicas.param_names
    state["tied_names"] = tied_names(module)
    state["optimizers"] = [split_optimizer_state(opt, replicas.k) for opt in optimizers]
    return state


def merge_processes(per_process: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every process's :func:`process_workers`, in rank order, as one per-worker record."""
    first = per_process[0]
    return {
        "param_names": first["param_names"],
        "tied_names": first.get("tied_names"),
        "params": torch.cat([p["params"] for p in per_process]),
        "buffers": {name: torch.cat([p["buffers"][name] for p in per_process]) for name in first["buffers"]},
        "optimizers": [sum((p["optimizers"][i] for p in per_process), []) for i in range(len(first["optimizers"]))],
    }


def select_workers(workers: dict[str, Any], first: int, k: int) -> dict[str, Any]:
    """Workers ``first .. first + k - 1`` of a per-worker record."""
    return {
        "params": workers["params"][first : first + k],
        "buffers": {name: b[first : first + k] for name, b in workers["buffers"].items()},
        "optimizers": [states[first : first + k] for states in workers["optimizers"]],
    }


def own_workers(state: dict[str, Any], n_workers: int, first: int, k: int) -> dict[str, Any] | None:
    """A process's workers' records in a checkpoint's ``lossy_ps`` state: their own (workers ``first ..
    first + k - 1``) when the checkpoint holds ``n_workers`` workers, else worker 0's for each of the ``k``
    (a resume into another worker count); None without per-worker state."""
    workers = state.get("workers")
    if workers is None:
        return None
    if state.get("n_workers") == n_workers:
        return select_workers(workers, first, k)
    return worker_zero_for(workers, k)


def worker_zero_for(workers: dict[str, Any], k: int) -> dict[str, Any]:
    """Worker 0's record of a per-worker record, for each of ``k`` workers (a resume into another worker count)."""
    return {
        "params": workers["params"][:1].expand(k, -1),
        "buffers": {name: b[:1].expand(k, *b.shape[1:]) for name, b in workers["buffers"].items()},
        "optimizers": [[states[0]] * k for states in workers["optimizers"]],
    }


def worker_zero_everywhere(replicas: WorkerReplicas, module: torch.nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
    """Every worker of this process set to its worker 0 (what a checkpoint without per-worker state gives)."""
    state = replicas.worker_state(module)
    params = state["params"][:1].expand_as(state["params"])
    buffers = {name: b[:1].expand_as(b) for name, b in state["buffers"].items()}
    return params, buffers


def workers_mean_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The module's ``state_dict`` with every parameter and floating-point buffer averaged over all
    workers (``checkpoint["state_dict"]`` holds worker 0's), under each of its names where the module
    ties it to several (``load_state_dict`` sets a tied tensor once per name: the last one wins).
    Load it with ``model.load_state_dict``."""
    workers = (checkpoint.get("lossy_ps") or {}).get("workers")
    if workers is None:
        raise ValueError("this checkpoint has no per-worker state (it was not written by LossyPSStrategy)")
    out = dict(checkpoint["state_dict"])
    mean = workers["params"].double().mean(0)
    offset = 0
    for name in workers["param_names"]:
        ref = out[name]
        out[name] = mean[offset : offset + ref.numel()].view_as(ref).to(ref.dtype)
        offset += ref.numel()
    for name, stacked in workers["buffers"].items():
        if name in out and stacked.dtype.is_floating_point:
            out[name] = stacked.double().mean(0).to(stacked.dtype)
    tied = workers.get("tied_names")
    if tied is None:  # a record from before tied names were kept
        tied = _aliased_names(checkpoint["state_dict"], [*workers["param_names"], *workers["buffers"]])
    for name, others in tied.items():
        for other in others:
            if name in out and other in out:
                out[other] = out[name]
    return out


def _aliased_names(state_dict: dict[str, Tensor], names: Sequence[str]) -> dict[str, list[str]]:
    """``{name: [other keys]}`` for keys of ``state_dict`` that view the same elements as ``names``' tensors
    (``state_dict()`` gives a tied tensor as views of one storage, and ``torch.save`` keeps them so)."""
    wanted = set(names)
    keys_at: dict[tuple, list[str]] = {}
    for key, t in state_dict.items():
        if isinstance(t, Tensor) and t.numel():  # empty tensors may all sit at one address
            where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            keys_at.setdefault(where, []).append(key)
    out: dict[str, list[str]] = {}
    for keys in keys_at.values():
        first = next((k for k in keys if k in wanted), None)
        if first is not None and len(keys) > 1:
            out[first] = [k for k in keys if k != first]
    return out
