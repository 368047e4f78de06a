"""One round as a pipeline: spec -> outcome -> failures -> exchange -> buffers -> clock -> record.

:func:`run_round` runs the steps in that order, once per optimizer step (for the gradient rules, between
the backward pass and the optimizer step). Each step is a function of the fit's
:class:`~pl_lossy.round.session.FitSession` and what the steps before it returned; none keeps state of
its own. The contract each keeps is in its docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..network import RoundOutcome, RoundSpec
from ..workers.buffer_sync import sync_buffers
from .clock import RoundRecord
from .deadlines import next_deadline
from .masks import broadcast_outcome, mask_hash

if TYPE_CHECKING:
    from .session import FitSession


def run_round(session: "FitSession", module: torch.nn.Module) -> RoundRecord:
    """The round the session is at, start to end; returns its record (also ``session.last_round``)."""
    measured_s = session.end_compute()
    spec = session.round_spec(session.clock.rounds)
    outcome = obtain_outcome(session, spec)
    outcome = account_failures(outcome, spec)
    side = exchange(session, spec, outcome, measured_s)
    sync_worker_buffers(session, spec, module)
    compute_s = compute_time(session, spec, side)
    record = advance_clock(session, spec, outcome, compute_s)
    measure_divergence(session)
    record_mean_model(session)
    prefetch_next(session, spec)
    return record


def obtain_outcome(session: "FitSession", spec: RoundSpec) -> RoundOutcome:
    """What the network did to round ``spec``, the same on every process: asked of the network on every rank when
    it can draw the same outcome there (``same_on_every_rank``), else by rank 0 and broadcast. Checked against the
    spec: mask shapes, co-located servers' own blocks delivered, down workers' packets lost."""
    place = session.place
    if place.world_size == 1 or session.network.same_on_every_rank:
        return session.network.outcome(spec).check(spec)
    return broadcast_outcome(session.network, spec, place.is_global_zero, place.device)


def account_failures(outcome: RoundOutcome, spec: RoundSpec) -> RoundOutcome:
    """Workers down this round (``spec.down_workers``): the network already lost their packets and did not time
    their flows (it owns the failure schedule; :meth:`~pl_lossy.network.RoundOutcome.check` holds it to that);
    the round records how many were down."""
    if spec.worker_failures:
        outcome.stats = {**outcome.stats, "workers_down": float(len(spec.down_workers))}
    return outcome


def exchange(session: "FitSession", spec: RoundSpec, outcome: RoundOutcome, measured_s: float) -> Tensor:
    """Apply the outcome's masks to the workers' tensors (models for ``rps``, gradients for the gradient rules) with
    one all_reduce, which also carries every process's side values ``[measured compute time, mask hash]``; checks
    (on CUDA one round later) that every process applied the same masks. Returns the side values ``[2, processes]``."""
    up, down = torch.from_numpy(outcome.up), torch.from_numpy(outcome.down)
    own_hash = mask_hash(outcome) if session.place.world_size > 1 else 0.0  # one process has no one to disagree with
    side_values = (measured_s, own_hash)
    if session.gradient_exchange is not None:
        side = session.gradient_exchange.step(up, down, session.all_reduce_sum, spec.round, side_values)
    else:
        side = session.exchange.step(up, down, session.all_reduce_sum, side_values)
    session.mask_check.submit(spec.round, side[1], own_hash)
    return side


def sync_worker_buffers(session: "FitSession", spec: RoundSpec, module: torch.nn.Module) -> None:
    """Module buffers made equal over the workers up, reliably (:mod:`pl_lossy.workers.buffer_sync`)."""
    if session.sync_buffers == "none":
        return
    place = session.place
    sync_buffers(session.replicas.all_buffers(module), session.sync_buffers, place.n_workers, place.first_worker,
                 place.world_size, spec.down_workers, session.all_reduce_sum)


def compute_time(session: "FitSession", spec: RoundSpec, side: Tensor) -> float:
    """The round's compute time on the simulated clock: the compute model's (``"measured"``: the slowest
    process's, read from the side values, which waits for the device); with stragglers, the fastest worker up's,
    since the uplink starts when it is done and the network waits for the rest."""
    compute_s = session.compute.round_time_s(lambda: float(side[0].max()))
    if spec.has_stragglers:
        compute_s *= spec.fastest_compute_factor(session.network.seed)
    return compute_s


def advance_clock(session: "FitSession", spec: RoundSpec, outcome: RoundOutcome, compute_s: float) -> RoundRecord:
    """``sim_time += compute + up + down``; an adaptive deadline's next value; the round's record."""
    delivered = outcome.delivered_fractions(spec)
    session.clock.advance(compute_s, outcome, delivered)
    if session.adaptive_deadline:
        session.clock.deadline_s = next_deadline(outcome, session.spec.deadline_s, session.deadline_slack)
    stats = outcome.stats if spec.deadline_s is None else {**outcome.stats, "deadline_s": spec.deadline_s}
    session.last_round = RoundRecord(spec.round, *delivered, outcome.up_time_s, outcome.down_time_s, compute_s,
                                     session.clock.sim_time_s, stats)
    return session.last_round


def measure_divergence(session: "FitSession") -> None:
    """Every ``divergence_every`` rounds: the workers' RMS distance from their mean over the mean's norm (two all_reduces)."""
    if session.divergence_every and session.clock.rounds % session.divergence_every == 0:
        rms, norm = session.exchange.divergence(session.all_reduce_sum)
        session.last_divergence = rms / norm if norm > 0 else 0.0


def record_mean_model(session: "FitSession") -> None:
    """Every ``mean_model_every`` rounds: the replicas' mean model, kept on the CPU (one all_reduce a chunk)."""
    if session.mean_model_every and session.clock.rounds % session.mean_model_every == 0:
        session.mean_models.append((session.clock.rounds, session.exchange.mean_model(session.all_reduce_sum)))


def prefetch_next(session: "FitSession", spec: RoundSpec) -> None:
    """Rank 0 tells a network that simulates elsewhere which round comes next (``NetworkModel.prefetch``: a hint
    a model may use to start simulating it; ns-3 runs ahead inside ``outcome`` instead, ``run_ahead`` rounds past
    each request, and ignores it)."""
    if session.place.is_global_zero and not session.network.same_on_every_rank:
        session.network.prefetch([session.round_spec(spec.round + 1)])


__all__ = [
    "account_failures", "advance_clock", "compute_time", "exchange", "measure_divergence", "obtain_outcome",
    "prefetch_next", "record_mean_model", "run_round", "sync_worker_buffers",
]
