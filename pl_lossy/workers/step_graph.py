"""A training step's forward and backward, captured once in CUDA graphs and replayed.

Virtual workers (:mod:`pl_lossy.workers.replicas`) run ``k`` replicas' forward and backward as one
``torch.func.vmap`` call. On a GPU that call is host-bound: vmap's batching rules launch thousands
of small kernels a step for a ResNet, each costing microseconds of Python and C++ on the host while
the GPU waits. A CUDA graph records those launches once and replays them as one, so the step costs
what the GPU needs.

:class:`GraphedStep` records ``fn(*inputs) -> outputs`` (a pytree of tensors) and the gradient of
its differentiable outputs with respect to the inputs that require grad. It is an autograd-aware
callable: its forward replays the forward graph, its backward the backward graph, so Lightning's
closure (forward, ``loss.backward()``, clipping, ``optimizer.step()``) runs unchanged around it.

What a replay assumes, and what the caller must guarantee:

- Inputs that require grad, and every input in ``persistent``, are the **same memory** at every
  call (parameters, BatchNorm statistics): updated in place between steps (the optimizer, the RPS
  round), never re-allocated. Other inputs (the batch) are copied into the graph's own buffers.
- ``fn``'s GPU work depends on its tensor inputs alone: Python control flow, host values and
  ``.item()`` are frozen (or fail) at capture. Autocast's state is part of the capture, so the
  caller keys graphs by it.
- The forward runs once before each backward (automatic optimization).

Capture runs ``fn`` eagerly a few times on a side stream first (cuDNN and cuBLAS pick their
algorithms and workspaces); those runs update ``persistent`` tensors (running statistics), so they
are restored afterwards: a captured step changes state exactly as an eager one does.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

WARMUP_RUNS = 2


class GraphedStep:
    """``fn`` over ``inputs`` recorded as a forward and a backward CUDA graph; see the module docstring.

    Args:
        fn: ``fn(*inputs)`` returning a pytree of tensors; those that require grad are differentiated.
        inputs: example inputs, with the shapes, dtypes and (for persistent ones) storage of every call.
        persistent: inputs, beyond those requiring grad, that keep their storage across calls
            (updated in place: BatchNorm statistics); restored after the warm-up runs.
    """

    def __init__(self, fn: Callable[..., Any], inputs: Sequence[Tensor], persistent: Sequence[Tensor] = ()) -> None:
        keep = {id(t) for t in persistent}
        # Differentiated inputs enter the graphs as fresh leaves over the same memory: autograd nodes of the
        # originals may still live from eager steps on another stream, and a capture must not wait on that stream.
        self._static = [x.detach().requires_grad_() if x.requires_grad else x if id(x) in keep else x.clone() for x in inputs]
        self._copied = [i for i, x in enumerate(inputs) if not (x.requires_grad or id(x) in keep)]
        self._differentiated = [i for i, x in enumerate(inputs) if x.requires_grad]
        self._ptrs = [x.data_ptr() for x in inputs]
        self._wrt = [self._static[i] for i in self._differentiated]
        saved = [t.detach().clone() for t in persistent if not t.requires_grad]  # parameters are only read
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    leaves, _ = tree_flatten(fn(*self._static))
                    diff = [o for o in leaves if isinstance(o, Tensor) and o.requires_grad]
                    if diff:
                        torch.autograd.grad(diff, self._wrt, [torch.ones_like(o) for o in diff], allow_unused=True)
                    del leaves, diff
        finally:
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for t, s in zip((t for t in persistent if not t.requires_grad), saved):
                    t.copy_(s)
        self._fwd, self._bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._fwd):
            leaves, self._spec = tree_flatten(fn(*self._static))
        if not all(isinstance(o, Tensor) for o in leaves):
            raise TypeError("a graphed step must return tensors only")
        self._outputs = leaves
        self._diff = [i for i, o in enumerate(leaves) if o.requires_grad]
        self._grad_outputs = [torch.empty_like(leaves[i]) for i in self._diff]
        self._grads: list[Tensor | None] = []
        if self._diff:
            with torch.cuda.graph(self._bwd, pool=self._fwd.pool()):
                grads = torch.autograd.grad([leaves[i] for i in self._diff], self._wrt, self._grad_outputs, allow_unused=True)
            self._grads = list(grads)

    def matches(self, inputs: Sequence[Tensor]) -> bool:
        """Whether ``inputs`` can replay this capture: same persistent storage, same shapes and dtypes."""
        return len(inputs) == len(self._static) and all(
            x.shape == s.shape and x.dtype == s.dtype and (i in self._copied or x.data_ptr() == p)
            for i, (x, s, p) in enumerate(zip(inputs, self._static, self._ptrs))
        )

    def __call__(self, inputs: Sequence[Tensor]) -> Any:
        with torch.no_grad():
            for i in self._copied:
                self._static[i].copy_(inputs[i])
        outputs = _Replay.apply(self, *(inputs[i] for i in self._differentiated))
        return tree_unflatten(list(outputs), self._spec)


class _Replay(torch.autograd.Function):
    """Forward: replay the forward graph and hand out copies of its outputs (the next replay overwrites
    them). Backward: the incoming gradients into the graph's buffers, replay, copies of the gradients
    (autograd may keep them as ``.grad``, which must not alias the graph's memory)."""

    @staticmethod
    def forward(ctx: Any, step: GraphedStep, *wrt: Tensor) -> tuple[Tensor, ...]:
        step._fwd.replay()
        ctx.step = step
        outputs = tuple(o.clone() for o in step._outputs)
        ctx.mark_non_differentiable(*(o for i, o in enumerate(outputs) if i not in step._diff))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        step: GraphedStep = ctx.step
        for buffer, i in zip(step._grad_outputs, step._diff):
            if grads[i] is None:
                buffer.zero_()
            else:
                buffer.copy_(grads[i])
        step._bwd.replay()
        return (None, *(g.clone() if g is not None else None for g in step._grads))
