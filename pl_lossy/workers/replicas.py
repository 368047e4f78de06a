"""Virtual workers: the replicas of one LightningModule that one process trains.

A worker is a replica, not a process. A process hosts ``k`` workers; each has its own parameters,
gradients, buffers and optimizer state, stacked along a leading dimension of size ``k``:

- **Parameters** live in one storage ``[k, row]`` (``row`` is the packet layout's padded model size,
  see :class:`~pl_lossy.round.rps.PacketLayout`), so that the RPS exchange works on all workers' blocks at
  once. Each parameter ``p`` gets a stacked ``nn.Parameter`` ``[k, *p.shape]`` (a view of the storage);
  the optimizer holds those, so one ``optimizer.step()`` updates every worker (elementwise optimizers
  only: SGD, Adam, ... see :data:`ELEMENTWISE_OPTIMIZERS`). The module's own parameters become views
  of worker 0's row: ``state_dict()``, inference and ``predict`` see worker 0's replica.
- **Buffers** (BatchNorm statistics) are stacked ``[k, *shape]`` too; the module's show worker 0's.
- **A step** calls the module's ``training_step`` (or ``validation_step``, ``test_step``) once per
  worker on its shard of the process's batch, with that worker's parameters and buffers swapped
  in: either as one ``torch.func.vmap`` over the workers (fast: one launch per op for all ``k``) or
  as a loop (always correct); on a GPU the vmapped training step can be recorded once in CUDA graphs
  and replayed (``cuda_graph``, :mod:`pl_lossy.workers.step_graph`). Values the step logs are caught and logged once, as the mean over
  workers. The returned loss has the mean's value and the sum's gradient, so each worker's
  gradient is exactly its own loss's.

With ``k = 1`` nothing is stacked: the module's parameters are the storage's views and steps run as
usual.
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

from .step_graph import GraphedStep

log = logging.getLogger(__name__)

#: Optimizers whose update of an element depends on that element's history alone, so that stepping
#: ``[k, ...]`` stacked parameters equals stepping ``k`` separate replicas.
ELEMENTWISE_OPTIMIZERS: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
)

BATCHING = ("auto", "vmap", "loop", "cuda_graph")


def check_elementwise(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless ``optimizer`` is known to update every element independently."""
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS and not getattr(optimizer, "elementwise", False):
        names = ", ".join(t.__name__ for t in ELEMENTWISE_OPTIMIZERS)
        raise ValueError(
            f"workers_per_device > 1 steps all workers' stacked parameters in one call, which is exact only for "
            f"elementwise optimizers ({names}); {type(optimizer).__name__} is not known to be one. Use "
            "workers_per_device=1 (one worker per process), or set `elementwise = True` on an optimizer class you know is"
        )


class WorkerReplicas:
    """``k`` replicas of ``module`` in one storage; see the module docstring.

    Args:
        module: the LightningModule (its parameters and buffers are re-pointed at worker 0's row).
        k: workers in this process.
        row_numel: elements per worker row (>= the module's floating-point parameter count).
        trailing: extra elements after the ``k`` rows (the exchange's per-process side slots, which
            must share the parameters' all_reduce).
    """

    def __init__(self, module: nn.Module, k: int, row_numel: int, trailing: int = 0) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.dtype.is_floating_point]
        if not named:
            raise ValueError("the model has no floating-point parameters to exchange")
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"RPS exchanges one floating-point dtype; the parameters have {sorted(map(str, dtypes))}")
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
        self.k, self.row_numel = k, row_numel
        self.numel = sum(p.numel() for _, p in named)
        if self.numel > row_numel:
            raise ValueError(f"row_numel={row_numel} cannot hold {self.numel} parameters")
        dtype, device = named[0][1].dtype, named[0][1].device
        self.storage = torch.zeros(k * row_numel + trailing, dtype=dtype, device=device)
        self.param_names = [n for n, _ in named]
        self._shapes = [p.shape for _, p in named]
        self._offsets: list[int] = []
        offset = 0
        with torch.no_grad():
            for _, p in named:
                self.rows[:, offset : offset + p.numel()].copy_(p.reshape(1, -1))
                self._offsets.append(offset)
                offset += p.numel()
        self.params = list(module.parameters())  # the module's own (worker 0's views)
        self.stacked: list[nn.Parameter] = []
        if k > 1:
            self.stacked = [nn.Parameter(v, requires_grad=p.requires_grad) for v, (_, p) in zip(self._views(), named)]
            self.buffer_names = [n for n, b in module.named_buffers() if b is not None]
            buffers = dict(module.named_buffers())
            self.stacked_buffers = [buffers[n].detach().unsqueeze(0).repeat(k, *([1] * buffers[n].dim())) for n in self.buffer_names]
        else:
            self.buffer_names, self.stacked_buffers = [], []
        self.batching: Literal["auto", "vmap", "loop", "cuda_graph"] = "auto"
        self._vmap_failed: dict[str, str] = {}  # method -> why vmap could not batch it
        self._tried: set[str] = set()
        self._graphs: dict[tuple, tuple[GraphedStep, dict[str, dict]]] = {}  # (shapes, autocast) -> capture, log options
        self._graph_failed: str | None = None
        self.graph_captures = 0  # training steps recorded in CUDA graphs (one per batch shape and autocast state)
        self.bind(module)

    # ------------------------------------------------------------------ storage

    @property
    def rows(self) -> Tensor:
        """``[k, row_numel]``: worker j's flat model (padded) in row j."""
        return self.storage[: self.k * self.row_numel].view(self.k, self.row_numel)

    def _views(self) -> Iterator[Tensor]:
        for offset, shape in zip(self._offsets, self._shapes):
            n = shape.numel()
            yield self.rows[:, offset : offset + n].view(self.k, *shape)

    def bind(self, module: nn.Module) -> None:
        """Point the module's parameters (and, with k > 1, buffers) at worker 0's storage."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, view in zip(self.param_names, self._views()):
                params[name].data = view[0]
            if self.k > 1:
                for stacked, view in zip(self.stacked, self._views()):
                    stacked.data = view
                for name, stacked in zip(self.buffer_names, self.stacked_buffers):
                    owner, _, attr = name.rpartition(".")
                    module.get_submodule(owner)._buffers[attr] = stacked[0]

    def to(self, device: torch.device, module: nn.Module) -> None:
        """Move the replicas (all workers) to ``device`` and re-bind ``module`` to them."""
        if self.storage.device != device:
            self.storage = self.storage.to(device)
            self.stacked_buffers = [b.to(device) for b in self.stacked_buffers]
            self._graphs.clear()
        self.bind(module)

    # ------------------------------------------------------------------ optimizers and clipping

    def adopt_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Make the optimizers step the stacked parameters instead of the module's (k > 1)."""
        if self.k == 1:
            return
        stacked_of = {id(p): s for p, s in zip(self._module_params(), self.stacked)}
        for opt in optimizers:
            check_elementwise(opt)
            if opt.state:
                raise ValueError("workers_per_device > 1 needs optimizers with fresh state at setup")
            for group in opt.param_groups:
                try:
                    group["params"] = [stacked_of[id(p)] for p in group["params"]]
                except KeyError:
                    raise ValueError("an optimizer holds a tensor that is not one of the model's parameters") from None

    def trained_tensors(self) -> tuple[list[Tensor], list[int]]:
        """The tensors optimizers step (stacked ``[k, ...]`` with k > 1, else the module's parameters) and
        each one's element offset in a worker's row: where gradients are exchanged from and to."""
        return (self.stacked if self.k > 1 else self._module_params()), list(self._offsets)

    def _module_params(self) -> list[Tensor]:
        return [p for p in self.params if p.dtype.is_floating_point]

    def clip_grad_norm_(self, parameters: Sequence[Tensor], max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` for each worker separately: worker j's gradients are
        scaled by ``min(1, max_norm / (||g_j|| + 1e-6))`` with ``||g_j||`` the 2-norm over all its parameters."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(self.k, -1), dim=1, dtype=torch.float32) for g in grads])
        coef = (max_norm / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp_(max=1.0)
        for g in grads:
            g.mul_(coef.view(self.k, *([1] * (g.dim() - 1))).to(g.dtype))

    # ------------------------------------------------------------------ steps

    def worker_tensors(self, j: int) -> dict[str, Tensor]:
        tensors = {n: s[j] for n, s in zip(self.param_names, self.stacked)}
        tensors.update({n: b[j] for n, b in zip(self.buffer_names, self.stacked_buffers)})
        return tensors

    def run_step(self, module: nn.Module, method: str, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``module.<method>(shard_j, *args, **kwargs)`` for every worker j; see the module docstring."""
        shards = self._split(batch)
        fn = getattr(module, method)
        use_vmap = self.batching in ("vmap", "cuda_graph") or (self.batching == "auto" and method not in self._vmap_failed)
        outputs = None
        with _captured_logs(module) as logs:
            if self._graphable(method):
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
        return _combine(outputs, self.k)

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
            and self.storage.is_cuda and _get_current_dispatch_mode() is None and torch.is_grad_enabled()
        )

    def _split(self, batch: Any) -> Any:
        """Each tensor of the batch as ``[k, rows / k, ...]``: worker j's shard is index j."""
        def split(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            if x.dim() == 0 or x.shape[0] % self.k:
                raise ValueError(
                    f"a batch of {x.shape[0] if x.dim() else 0} rows does not split into {self.k} equal worker shards "
                    "(workers_per_device needs the strategy's sampler; each worker's batch is the loader's batch_size)"
                )
            return x.view(self.k, x.shape[0] // self.k, *x.shape[1:])

        return tree_map(split, batch)

    def _looped(self, module, fn, shards, args, kwargs, logs) -> list[Any]:
        leaves, spec = tree_flatten(shards)
        outputs = []
        for j in range(self.k):
            shard = tree_unflatten([x[j] if isinstance(x, Tensor) else x for x in leaves], spec)
            with _reparametrize_module(module, self.worker_tensors(j)):
                outputs.append(fn(shard, *args, **kwargs))
        return outputs

    def _vmapped(self, module, fn, shards, args, kwargs, logs, first_try: bool, tensors: Sequence[Tensor] | None = None) -> list[Any]:
        """One vmap over the workers of the stacked parameters and buffers (or ``tensors``: the same, as a graph's inputs)."""
        names = self.param_names + self.buffer_names
        snapshot = [b.clone() for b in self.stacked_buffers] if first_try and self.batching == "auto" else None
        returned_none = []

        def one_worker(tensors: dict[str, Tensor], shard: Any):
            with _reparametrize_module(module, tensors), _fp32_batchnorm(module):
                out = fn(shard, *args, **kwargs)
            caught = {name: values[0] for name, (values, _) in logs.items() if isinstance(values[0], Tensor)}
            if out is None:  # vmap returns tensors only
                returned_none.append(True)
                out = torch.zeros(())
            return out, caught

        stacked = dict(zip(names, tensors if tensors is not None else [*self.stacked, *self.stacked_buffers]))
        in_dims = (0, tree_map(lambda x: 0 if isinstance(x, Tensor) else None, shards))
        try:
            out, caught = torch.func.vmap(one_worker, in_dims=in_dims, randomness="different")(stacked, shards)
        except Exception:
            if snapshot is not None:  # a failed first try must not leave half-updated statistics
                with torch.no_grad():
                    for b, saved in zip(self.stacked_buffers, snapshot):
                        b.copy_(saved)
            raise
        for name, value in caught.items():
            logs[name] = ([value], logs[name][1])
        if returned_none:
            return [None] * self.k
        return [out]  # tensors stacked [k, ...]: _combine treats one stacked output like k outputs

    def _graphed(self, module, fn, shards, args, kwargs, logs) -> list[Any]:
        """The vmapped step, replayed from CUDA graphs recorded at the first batch of each shape (and
        autocast state). ``args`` (the batch index) and non-tensor batch parts are frozen at capture;
        the training step must be a function of the batch and the parameters (see docs/virtual_workers.md)."""
        leaves, spec = tree_flatten(shards)
        batch = [x for x in leaves if isinstance(x, Tensor)]
        persistent = [*self.stacked, *self.stacked_buffers]
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
            log.info("lossy_ps: the training step of %d workers is recorded in CUDA graphs (batch %s)", self.k, key[0])
        graph, options = entry
        out, caught = graph(inputs)
        for name, value in caught.items():
            logs[name] = ([value], options[name])
        return [out]

    # ------------------------------------------------------------------ per-worker state

    def worker_state(self, module: nn.Module) -> dict[str, Any]:
        """Every worker's parameters ``[k, numel]`` and buffers ``{name: [k, *shape]}`` (CPU copies)."""
        params = self.rows[:, : self.numel].detach().cpu().clone()
        if self.k > 1:
            buffers = {n: b.detach().cpu().clone() for n, b in zip(self.buffer_names, self.stacked_buffers)}
        else:
            buffers = {n: b.detach().cpu().unsqueeze(0).clone() for n, b in module.named_buffers() if b is not None}
        return {"params": params, "buffers": buffers}

    def load_worker_state(self, params: Tensor, buffers: dict[str, Tensor], module: nn.Module) -> None:
        if tuple(params.shape) != (self.k, self.numel):
            raise ValueError(f"checkpoint holds workers' parameters of shape {tuple(params.shape)}; this run needs {(self.k, self.numel)}")
        with torch.no_grad():
            self.rows[:, : self.numel].copy_(params)
            if self.k > 1:
                for n, b in zip(self.buffer_names, self.stacked_buffers):
                    if n in buffers:
                        b.copy_(buffers[n])
            else:
                own = dict(module.named_buffers())
                for n, b in buffers.items():
                    if n in own and own[n] is not None:
                        own[n].copy_(b[0])

    def all_buffers(self, module: nn.Module) -> list[Tensor]:
        """Buffers to keep equal across workers: stacked ``[k, ...]`` (k > 1) or the module's own."""
        if self.k > 1:
            return [b for b in self.stacked_buffers if b.numel()]
        return [b.unsqueeze(0) for b in module.buffers() if b is not None and b.numel()]


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
