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
- **Optimizers** are adopted (they step the stacked parameters), norm clipping is per worker, and each
  worker's state can be taken out and put back (checkpoints).

How a step of the ``k`` workers runs (vmap, loop, CUDA graphs) is :mod:`pl_lossy.workers.steps`.

With ``k = 1`` nothing is stacked: the module's parameters are the storage's views and steps run as
usual.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

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

    def worker_tensors(self, j: int) -> dict[str, Tensor]:
        tensors = {n: s[j] for n, s in zip(self.param_names, self.stacked)}
        tensors.update({n: b[j] for n, b in zip(self.buffer_names, self.stacked_buffers)})
        return tensors

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
