"""How a step of several virtual workers runs (the replicas themselves live in :mod:`pl_lossy.workers.replicas`).

A step calls the module's ``training_step`` (or ``validation_step``, ``test_step``) once per worker on its
shard of the process's batch, with that worker's parameters and buffers swapped in: either as one
``torch.func.vmap`` over the workers (fast: one launch per op for all ``k``) or as a loop (always correct);
on a GPU the vmapped training step can be recorded once in CUDA graphs and replayed (``cuda_graph``,
:mod:`pl_lossy.workers.step_graph`). Values the step logs are caught and logged once, as the mean over
workers. The returned loss has the mean's value and the sum's gradient, so each worker's gradient is
exactly its own loss's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses, for any method
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .replicas import WorkerReplicas
from .step_graph import GraphedStep

log = logging.getLogger(__name__)

BATCHING = ("auto", "vmap", "loop", "cuda_graph")


class WorkerSteps:
    """Runs the steps of ``replicas``' ``k`` workers, ``batching`` as the strategy's setting of that name
    (``auto``: vmap, falling back to the loop, logged, for a step vmap cannot batch)."""

    def __init__(self, replicas: WorkerReplicas, batching: Literal["auto", "vmap", "loop", "cuda_graph"] = "auto") -> None:
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.replicas, self.batching = replicas, batching
        self._vmap_failed: dict[str, str] = {}  # method -> why vmap could not batch it
        self._tried: set[str] = set()
        self._graphs: dict[tuple, tuple[GraphedStep, dict[str, dict]]] = {}  # (shapes, autocast) -> capture, log options
        self._graph_failed: str | None = None
        self.graph_captures = 0  # training steps recorded in CUDA graphs (one per batch shape and autocast state)
        self._force_loop = False  # see looped()

    def run_step(self, module: nn.Module, method: str, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``module.<method>(shard_j, *args, **kwargs)`` for every worker j; see the module docstring."""
        shards = self._split(batch)
        fn = getattr(module, method)
        use_vmap = not self._force_loop and (
            self.batching in ("vmap", "cuda_graph") or (self.batching == "auto" and method not in self._vmap_failed)
        )
        outputs = None
        with _captured_logs(module) as logs:
            if not self._force_loop and self._graphable(method):
                try:
                    outputs = self._graphed(module, fn, shards, args, kwargs, logs)
                except Exception as exc:  # noqa: BLE001 - a step that cannot be captured runs eagerly, vmapped
                    self._graph_failed = _reason(exc)
                    self._graphs.clear()
                    log.warning("lossy_ps: the training step runs without CUDA graphs (capturing it failed: %s)", self._graph_failed)
                    logs.clear()
            if outputs is None and use_vmap:
                try:
                    outputs = self._vmapped(module, fn, shards, args, kwargs, logs, first_try=method not in self._tried)
                except Exception as exc:  # noqa: BLE001 - any failure to batch falls back to the always-correct loop
                    if self.batching != "auto":
                        raise
                    self._vmap_failed[method] = _reason(exc)
                    log.warning("lossy_ps: %s runs the workers one after another (torch.func.vmap could not batch it: %s)", method, self._vmap_failed[method])
                    logs.clear()
                finally:
                    self._tried.add(method)
            if outputs is None:
                outputs = self._looped(module, fn, shards, args, kwargs, logs)
        for name, (values, kw) in logs.items():
            module.log(name, _mean(values), **kw)  # the capture is gone: this is LightningModule.log
        return _combine(outputs, self.replicas.k)

    @contextlib.contextmanager
    def looped(self) -> Iterator[None]:
        """Steps run one worker after another inside this block, whatever ``batching`` says: what the
        first step's FLOP count needs (under vmap, batched convolutions count several workers' FLOPs)."""
        self._force_loop = True
        try:
            yield
        finally:
            self._force_loop = False

    @property
    def mode(self) -> str:
        """How training steps run: ``vmap``, ``loop`` or ``cuda_graph``."""
        if self.batching == "cuda_graph":
            return "vmap" if self._graph_failed else "cuda_graph"
        if self.batching != "auto":
            return self.batching
        return "loop" if "training_step" in self._vmap_failed else "vmap"

    def _graphable(self, method: str) -> bool:
        """Training steps replay CUDA graphs (``cuda_graph``), except while a dispatch mode watches every op
        (the first step's FLOP count: it must see one step's ops, not a capture's)."""
        return (
            self.batching == "cuda_graph" and method == "training_step" and self._graph_failed is None
            and self.replicas.storage.is_cuda and _get_current_dispatch_mode() is None and torch.is_grad_enabled()
        )

    def _split(self, batch: Any) -> Any:
        """Each tensor of the batch as ``[k, rows / k, ...]``: worker j's shard is index j."""
        def split(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            if x.dim() == 0 or x.shape[0] % self.replicas.k:
                raise ValueError(
                    f"a batch of {x.shape[0] if x.dim() else 0} rows does not split into {self.replicas.k} equal worker shards "
                    "(workers_per_device needs the strategy's sampler; each worker's batch is the loader's batch_size)"
                )
            return x.view(self.replicas.k, x.shape[0] // self.replicas.k, *x.shape[1:])

        return tree_map(split, batch)

    def _looped(self, module, fn, shards, args, kwargs, logs) -> list[Any]:
        leaves, spec = tree_flatten(shards)
        outputs = []
        for j in range(self.replicas.k):
            shard = tree_unflatten([x[j] if isinstance(x, Tensor) else x for x in leaves], spec)
            with _reparametrize_module(module, self.replicas.worker_tensors(j), tie_weights=True):
                outputs.append(fn(shard, *args, **kwargs))
        return outputs

    def _vmapped(self, module, fn, shards, args, kwargs, logs, first_try: bool, tensors: Sequence[Tensor] | None = None) -> list[Any]:
        """One vmap over the workers of the stacked parameters and buffers (or ``tensors``: the same, as a graph's inputs)."""
        names = self.replicas.param_names + self.replicas.buffer_names
        snapshot = [b.clone() for b in self.replicas.stacked_buffers] if first_try and self.batching == "auto" else None
        returned_none = []

        def one_worker(tensors: dict[str, Tensor], shard: Any):
            with _reparametrize_module(module, tensors, tie_weights=True), _fp32_batchnorm(module):
                out = fn(shard, *args, **kwargs)
            caught = {name: values[0] for name, (values, _) in logs.items() if isinstance(values[0], Tensor)}
            if out is None:  # vmap returns tensors only
                returned_none.append(True)
                out = torch.zeros(())
            return out, caught

        stacked = dict(zip(names, tensors if tensors is not None else [*self.replicas.stacked, *self.replicas.stacked_buffers]))
        in_dims = (0, tree_map(lambda x: 0 if isinstance(x, Tensor) else None, shards))
        try:
            out, caught = torch.func.vmap(one_worker, in_dims=in_dims, randomness="different")(stacked, shards)
        except Exception:
            if snapshot is not None:  # a failed first try must not leave half-updated statistics
                with torch.no_grad():
                    for b, saved in zip(self.replicas.stacked_buffers, snapshot):
                        b.copy_(saved)
            raise
        for name, value in caught.items():
            logs[name] = ([value], logs[name][1])
        if returned_none:
            return [None] * self.replicas.k
        return [out]  # tensors stacked [k, ...]: _combine treats one stacked output like k outputs

    def _graphed(self, module, fn, shards, args, kwargs, logs) -> list[Any]:
        """The vmapped step, replayed from CUDA graphs recorded at the first batch of each shape (and
        autocast state). ``args`` (the batch index) and non-tensor batch parts are frozen at capture;
        the training step must be a function of the batch and the parameters (see docs/virtual_workers.md)."""
        leaves, spec = tree_flatten(shards)
        batch = [x for x in leaves if isinstance(x, Tensor)]
        persistent = [*self.replicas.stacked, *self.replicas.stacked_buffers]
        inputs = [*persistent, *batch]
        key = (tuple((tuple(x.shape), x.dtype) for x in batch), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        entry = self._graphs.get(key)
        if entry is None or not entry[0].matches(inputs):
            options: dict[str, dict] = {}

            def step(*flat: Tensor) -> Any:
                parts = iter(flat[len(persistent) :])
                shard = tree_unflatten([next(parts) if isinstance(x, Tensor) else x for x in leaves], spec)
                caught: dict[str, tuple[list, dict]] = {}
                with _captured_logs(module) as caught:
                    out = self._vmapped(module, fn, shard, args, kwargs, caught, first_try=False, tensors=flat[: len(persistent)])
                if out[0] is None:
                    raise TypeError("a training step that returns None cannot be replayed from a CUDA graph")
                for name, (values, kw) in caught.items():
                    if not isinstance(values[0], Tensor):
                        raise TypeError(f"{name!r} is logged as a Python number: a CUDA graph would replay the first one")
                    options[name] = kw
                return out[0], {name: values[0] for name, (values, _) in caught.items()}

            entry = self._graphs[key] = (GraphedStep(step, inputs, persistent), options)
            self.graph_captures += 1
            log.info("lossy_ps: the training step of %d workers is recorded in CUDA graphs (batch %s)", self.replicas.k, key[0])
        graph, options = entry
        out, caught = graph(inputs)
        for name, value in caught.items():
            logs[name] = ([value], options[name])
        return [out]


@contextlib.contextmanager
def _captured_logs(module: nn.Module) -> Iterator[dict[str, tuple[list, dict]]]:
    """``LightningModule.log`` calls caught as name -> (values per worker, log kwargs)."""
    logs: dict[str, tuple[list, dict]] = {}

    def capture(name: str, value: Any, *args: Any, **kw: Any) -> None:
        if args:
            raise TypeError("pass LightningModule.log options by keyword with workers_per_device > 1")
        if not isinstance(value, (Tensor, int, float)):
            raise TypeError(f"with workers_per_device > 1, log {name!r} as a tensor or a number (got {type(value).__name__})")
        values, _ = logs.setdefault(name, ([], kw))
        values.append(value)

    outer = module.__dict__.get("log")  # a capture already in place (a graphed step's inside a step's)
    module.log = capture  # instance attribute shadows the method; log_dict calls self.log too
    try:
        yield logs
    finally:
        if outer is None:
            del module.log
        else:
            module.log = outer


@contextlib.contextmanager
def _fp32_batchnorm(module: nn.Module) -> Iterator[None]:
    """Under autocast, run BatchNorm in fp32 (vmap's batch_norm rule wants input and statistics of one dtype)."""
    device_type = next((b.device.type for b in module.buffers()), "cpu")
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    patched = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def fp32(forward: Callable) -> Callable:
        def run(x: Tensor) -> Tensor:
            with torch.autocast(device_type, enabled=False):
                return forward(x.float()).to(x.dtype)
        return run

    for m in patched:
        m.forward = fp32(type(m).forward.__get__(m))
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _reason(exc: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _mean(values: list[Any]) -> Any:
    if len(values) == 1 and isinstance(values[0], Tensor) and values[0].dim() == 1:
        return values[0].float().mean()  # one stacked [k] value from vmap
    if all(isinstance(v, Tensor) for v in values):
        return torch.stack([v.detach().float() for v in values]).mean()
    return sum(float(v) for v in values) / len(values)


def _combine(outputs: list[Any], k: int) -> Any:
    """Workers' step outputs as one: tensors -> mean over workers, except that a loss keeps the sum's
    gradient (``value = mean``, ``d/dθ = d(sum)/dθ``), so each worker's gradient is its own loss's."""
    if len(outputs) == 1 and k > 1:
        stacked = outputs[0]  # from vmap: every tensor leaf is [k, ...]
        unstack = lambda x: list(x.unbind(0)) if isinstance(x, Tensor) else [x] * k  # noqa: E731
        leaves, spec = tree_flatten(stacked)
        per_leaf = [unstack(x) for x in leaves]
        outputs = [tree_unflatten([leaf[j] for leaf in per_leaf], spec) for j in range(k)]
    first = outputs[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return _loss(outputs)
    if isinstance(first, dict):
        out = {}
        for key in first:
            values = [o[key] for o in outputs]
            if key == "loss":
                out[key] = _loss(values)
            elif isinstance(values[0], Tensor):
                out[key] = torch.stack([v.detach() for v in values]).float().mean()
            else:
                out[key] = values[0]
        return out
    raise TypeError(f"with workers_per_device > 1 a step must return a loss tensor, a dict or None, got {type(first).__name__}")


def _loss(values: list[Tensor]) -> Tensor:
    total = torch.stack(values).sum()
    return total - total.detach() * (1.0 - 1.0 / len(values))
