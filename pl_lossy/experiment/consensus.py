"""What drops do to RPS, measured against what they are predicted to do (``paper_grid.py --preset consensus``).

Two quantities of a run with drop probability ``p`` and ``n`` workers = servers (docs/reproduction.md):

- the replicas' **divergence** ``D = sqrt((1/n) sum_i ||x_i - xbar||^2) / ||xbar||`` after a round (the run's
  ``net/divergence``), averaged over a window of rounds;
- the drops' **effect on the mean model** ``xbar``, the model the paper's bound is about: with the same seed a run
  at ``p`` and one at ``p = 0`` start from the same model and see the same batches, so
  ``dist(t) = ||xbar_p(t) - xbar_0(t)|| / ||xbar_0(t)||`` (from ``mean_model.pt``) and the gap in training loss
  ``f(xbar_p(t)) - f(xbar_0(t))`` are what the drops changed.

Their predicted shapes in ``p`` and ``n`` come from :func:`noise_model`, the algorithm's own round
(:func:`pl_lossy.round.rps.rps_round`) driven by the one thing that makes replicas differ: each worker's step
noise. :func:`fit_power_law` fits ``c (p / (1 - p))^a n^b`` to a measured quantity with intervals from
resampling the seeds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..round.rps import rps_round

Cell = tuple[float, int]  # (p, n)


@dataclass(frozen=True)
class NoiseModel:
    """Stationary second moments of one RPS round under step noise, per element, in units of the noise's variance."""

    divergence: float  # h_div: E[(1/n) sum_i (x_i - xbar)^2] after the round
    mean_displacement: float  # h_mean: E[(xbar - ybar)^2], how far a round moves the mean from the drop-free round's
    mean_walk: float  # h_walk: Var(sum over t rounds of those displacements) / t, for large t (they are correlated)
    stderr: tuple[float, float]  # Monte Carlo standard errors of h_div and h_mean


WALK_LAGS = 40  # rounds over which consecutive displacements of the mean are correlated (a deviation lasts ~1/(1-p) rounds)


def noise_model(p: float, n: int, rounds: int = 300, burn_in: int = 50, elements: int = 512, seed: int = 0) -> NoiseModel:
    """The RPS round with i.i.d. drops, driven by step noise alone (a linear model of the replicas' disagreement).

    Every round each worker's copy of every element moves by its own step noise ``y_i = x_i + xi_i``,
    ``xi_i ~ N(0, 1)`` i.i.d. (a step ``-gamma g_i`` whose common part cancels in every difference below), then
    one round of :func:`~pl_lossy.round.rps.rps_round` with every link but a worker's own to its co-located server
    dropping independently with probability ``p``: server ``j`` averages the copies that arrived, a worker that
    misses the average keeps its own ``y_i``. Measured after ``burn_in`` rounds, over ``elements`` independent
    elements (one packet each):

        h_div(p, n)  = E[(1/n) sum_i (x_i - xbar)^2]          the replicas' spread: D ~ sqrt(h_div) gamma sigma / ||xbar||
        h_mean(p, n) = E[d_t^2],  d_t = xbar - ybar           the mean's displacement in a round (0 without drops)
        h_walk(p, n) = h_mean + 2 sum_k E[d_t d_{t+k}]        Var(d_1 + ... + d_t) / t: the mean's random walk

    Displacements of consecutive rounds are correlated (a worker that missed an average keeps its deviation), so
    the mean's distance from the drop-free trajectory after ``t`` rounds is ``~ sqrt(t h_walk)`` (before the
    loss landscape bends it), not ``sqrt(t h_mean)``. For small ``p``, ``h_div ~ (p / (1 - p)) (1 - c/n)``
    (saturating in ``n``) and ``h_mean ~ 1.2-1.9 p / ((1 - p) n)``: a drop term shrinking as ``1/n``.
    """
    if not 0 <= p < 1 or n < 1:
        raise ValueError(f"need 0 <= p < 1 and n >= 1, got p={p}, n={n}")
    if n == 1 or p == 0:
        return NoiseModel(0.0, 0.0, 0.0, (0.0, 0.0))
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, n, elements, 1, dtype=torch.float64)  # [workers, servers, packets, elements per packet]
    own = torch.eye(n, dtype=torch.bool).unsqueeze(-1).expand(n, n, elements)
    div, steps = [], []
    for t in range(rounds):
        y = x + torch.randn(x.shape, generator=g, dtype=torch.float64)
        up = (torch.rand(n, n, elements, generator=g) >= p) | own
        down = (torch.rand(n, n, elements, generator=g) >= p) | own
        x, _ = rps_round(y, up, down)
        if t >= burn_in:
            div.append(float((x - x.mean(0)).square().mean()))
            steps.append((x.mean(0) - y.mean(0)).flatten())
    d = torch.stack(steps)  # [rounds after burn-in, elements]: each round's displacement of the mean
    lag = [float((d[: len(d) - k] * d[k:]).mean()) for k in range(min(WALK_LAGS, len(d) - 1) + 1)]
    mean = [float(v) for v in d.square().mean(1)]
    return NoiseModel(statistics.fmean(div), lag[0], lag[0] + 2 * sum(lag[1:]), (_batch_stderr(div), _batch_stderr(mean)))


def _batch_stderr(values: Sequence[float], batches: int = 10) -> float:
    """Standard error of a correlated series' mean, from the means of ``batches`` consecutive batches."""
    size = len(values) // batches
    means = [statistics.fmean(values[i * size : (i + 1) * size]) for i in range(batches)]
    return statistics.stdev(means) / math.sqrt(batches)


def interval95(values: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its 95% Student-t interval over independent runs (seeds)."""
    from scipy import stats

    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class PowerLaw:
    """``y = c (p / (1 - p))^a n^b`` fitted to cell means; ``*_ci``: 95% intervals from resampling the seeds."""

    c: float
    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]

    def __call__(self, p: float, n: int) -> float:
        return self.c * (p / (1 - p)) ** self.a * n ** self.b


def fit_power_law(values: Mapping[Cell, Sequence[float]], log_space: bool = True, resamples: int = 2000,
                  seed: int = 0) -> PowerLaw:
    """Fit ``c (p/(1-p))^a n^b`` to the mean over seeds of each cell (``values[(p, n)][s]``: seed ``s``'s value).

    ``log_space``: least squares on ``log(mean)`` (positive quantities); else in the quantity itself (it may be
    negative: a loss gap), ``c`` solved for every ``(a, b)`` on a grid. Intervals: the seeds resampled with
    replacement, the same draw for every cell (a seed's runs share its data order), refitted ``resamples`` times.
    """
    cells = sorted(c for c in values if c[0] > 0)
    if len({n for _, n in cells}) < 2 or len({p for p, _ in cells}) < 2:
        raise ValueError("a power law in p and n needs at least two drop rates > 0 and two worker counts")
    table = np.array([[float(v) for v in values[c]] for c in cells])  # [cells, seeds]
    q = np.log(np.array([p / (1 - p) for p, _ in cells]))
    ln = np.log(np.array([n for _, n in cells], dtype=float))
    fit = _fit_log if log_space else _fit_linear
    c, a, b = fit(table.mean(1), q, ln)
    rng = np.random.default_rng(seed)
    draws = np.array([fit(table[:, rng.integers(0, table.shape[1], table.shape[1])].mean(1), q, ln)[1:]
                      for _ in range(resamples)])
    (a_lo, b_lo), (a_hi, b_hi) = np.percentile(draws, 2.5, axis=0), np.percentile(draws, 97.5, axis=0)
    return PowerLaw(float(c), float(a), float(b), (float(a_lo), float(a_hi)), (float(b_lo), float(b_hi)))


def _fit_log(y: np.ndarray, q: np.ndarray, ln: np.ndarray) -> tuple[float, float, float]:
    if (y <= 0).any():
        raise ValueError("a fit in log space needs every cell's mean > 0 (a cell at 0: its runs did not differ)")
    design = np.stack([np.ones_like(q), q, ln], axis=1)
    (log_c, a, b), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    return math.exp(log_c), a, b


_GRID = np.linspace(-3.0, 3.0, 241)  # exponents tried by the linear-space fit (steps of 0.025)


def _fit_linear(y: np.ndarray, q: np.ndarray, ln: np.ndarray) -> tuple[float, float, float]:
    # basis[a, b, cell] = (p/(1-p))^a n^b; for each (a, b) the best c is <basis, y> / <basis, basis>
    basis = np.exp(_GRID[:, None, None] * q[None, None, :] + _GRID[None, :, None] * ln[None, None, :])
    c = (basis @ y) / np.einsum("abk,abk->ab", basis, basis)
    sse = np.square(y[None, None, :] - c[..., None] * basis).sum(-1)
    i, j = np.unravel_index(np.argmin(sse), sse.shape)
    return float(c[i, j]), float(_GRID[i]), float(_GRID[j])


def fit_scale(values: Mapping[Cell, Sequence[float]], predicted: Callable[[float, int], float],
              log_space: bool = True) -> tuple[float, float]:
    """The one constant ``k`` of ``y = k predicted(p, n)`` fitted to the cell means (least squares on their logs,
    or on the means themselves with ``log_space=False``), and the fraction of the cell means' variance the
    scaled prediction explains (R^2, in the same space)."""
    cells = [c for c in values if c[0] > 0 and predicted(*c) > 0]
    y = np.array([statistics.fmean(values[c]) for c in cells])
    x = np.array([predicted(*c) for c in cells])
    if log_space:
        y, x = np.log(y), np.log(x)
        k = float((y - x).mean())
        residual, scale = y - x - k, math.exp(k)
    else:
        scale = float(x @ y / (x @ x))
        residual = y - scale * x
    total = float(np.square(y - y.mean()).sum())
    return scale, 1.0 - float(np.square(residual).sum()) / total if total > 0 else math.nan


@dataclass
class MeanTrajectory:
    """A run's mean model every few rounds (``mean_model.pt``, written with ``strategy.mean_model_every``)."""

    rounds: list[int]
    mean: torch.Tensor  # [T, parameters]

    @classmethod
    def load(cls, path) -> "MeanTrajectory":
        saved = torch.load(path, weights_only=True)
        return cls([int(r) for r in saved["rounds"]], saved["mean"].float())

    def distance_to(self, reference: "MeanTrajectory") -> dict[int, float]:
        """``||self - reference|| / ||reference||`` at every round both recorded."""
        at = {r: i for i, r in enumerate(reference.rounds)}
        out = {}
        for i, r in enumerate(self.rounds):
            if r in at:
                ref = reference.mean[at[r]]
                out[r] = float((self.mean[i] - ref).norm() / ref.norm())
        return out


class TrainingLoss:
    """The whole training set's cross-entropy of a classifier given as one flat parameter vector."""

    def __init__(self, config: Mapping) -> None:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(dict(config))
        data = instantiate(cfg.data)
        data.setup("fit")
        self.x, self.y = data.train_set.tensors
        self.model = instantiate(cfg.model, input_shape=list(data.input_shape), num_classes=int(data.num_classes)).eval()
        if any(True for _ in self.model.buffers()):
            raise ValueError("the mean model's loss needs a model without buffers (BatchNorm statistics are not in mean_model.pt)")
        self.params = [p for p in self.model.parameters() if p.dtype.is_floating_point]

    @torch.no_grad()
    def __call__(self, flat: torch.Tensor) -> float:
        torch.nn.utils.vector_to_parameters(flat.to(self.params[0].dtype), self.params)
        return float(torch.nn.functional.cross_entropy(self.model(self.x), self.y))


def window_rms(curve: Mapping[int, float], first: int, last: int) -> Optional[float]:
    """Root mean square of a ``{round: value}`` curve over ``first <= round <= last`` (None: nothing there). The
    divergence is compared so with the noise model's ``E[D^2]``: where drops are rare (n = 2, p = 0.01) most rounds
    have none and ``D`` is 0, then large, and its plain mean would sit far below ``sqrt(E[D^2])``."""
    values = [v * v for r, v in curve.items() if first <= r <= last and math.isfinite(v)]
    return math.sqrt(statistics.fmean(values)) if values else None


__all__ = ["Cell", "MeanTrajectory", "NoiseModel", "PowerLaw", "TrainingLoss", "fit_power_law", "fit_scale",
           "interval95", "noise_model", "window_rms"]


# ---------------------------------------------------------------------------------------------- the runs' measures

@dataclass
class RunMeasures:
    """One run's measures (``paper_grid.py --preset consensus``)."""

    p: float
    n: int
    seed: int
    divergence: dict[int, float]  # net/divergence by rounds done
    mean_loss: dict[int, float]  # the mean model's whole-training-set loss by round
    distance: dict[int, float]  # the mean model's distance to the p = 0 run's of the same (n, seed), by round
    mean_loss_gap: dict[int, float]  # its training loss minus that p = 0 run's, by round
    final_loss: Optional[float]  # the mean model's training loss at its last snapshot (the end of the run)


def measure(grid: Mapping[Cell, Sequence], loss_of: Callable[[Mapping], TrainingLoss] = TrainingLoss) -> dict[Cell, dict[int, RunMeasures]]:
    """Every run's measures: ``grid[(p, n)]`` holds the runs (:class:`~pl_lossy.experiment.runs.RunResult`) of
    that cell, one per seed, each with its ``mean_model.pt``; a cell at ``p > 0`` is compared with the ``p = 0``
    run of the same ``n`` and seed. Only the seeds every cell has are kept (an interrupted grid: the fits resample
    seeds, the same draw for every cell); none in common is an error."""
    common = set.intersection(*({int(r.settings["seed"]) for r in runs} for runs in grid.values())) if grid else set()
    if not common:
        raise ValueError("no seed that every cell of the grid has run: nothing to compare (run the grid to the end)")
    grid = {cell: [r for r in runs if int(r.settings["seed"]) in common] for cell, runs in grid.items()}
    losses: dict[str, TrainingLoss] = {}
    trajectories: dict[tuple[float, int, int], MeanTrajectory] = {}
    out: dict[Cell, dict[int, RunMeasures]] = {}
    for (p, n), runs in sorted(grid.items()):
        for run in runs:
            seed = int(run.settings["seed"])
            path = run.run_dir / str(run.summary.get("mean_model_file") or "mean_model.pt")
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: run the grid with strategy.mean_model_every > 0 "
                                        "(paper_grid.py --preset consensus does)")
            trajectories[(p, n, seed)] = MeanTrajectory.load(path)
            config = run.summary["config"]
            key = repr((config["data"], config["model"]))
            if key not in losses:
                losses[key] = loss_of(config)
            loss = losses[key]
            trajectory = trajectories[(p, n, seed)]
            mean_loss = {r: loss(m) for r, m in zip(trajectory.rounds, trajectory.mean)}
            # net/divergence is logged at the round's index (0-based), the mean model at rounds done: key both by the latter
            divergence = {r + 1: v for r, v in run.column("net/divergence")}
            out.setdefault((p, n), {})[seed] = RunMeasures(p, n, seed, divergence, mean_loss, {}, {}, mean_loss[max(mean_loss)])
    for (p, n, seed), trajectory in trajectories.items():
        reference = trajectories.get((0.0, n, seed))
        if p > 0 and reference is not None:
            run, base = out[(p, n)][seed], out[(0.0, n)][seed]
            run.distance = trajectory.distance_to(reference)
            run.mean_loss_gap = {r: v - base.mean_loss[r] for r, v in run.mean_loss.items() if r in base.mean_loss}
    return out


# ---------------------------------------------------------------------------------------------- the report

@dataclass(frozen=True)
class Quantity:
    """A measured quantity of the report: its per-run value, how the noise model predicts its shape, the fit's space."""

    name: str
    label: str
    value: Callable[[RunMeasures], Optional[float]]
    predicted: Callable[[NoiseModel], float]
    log_space: bool = True


def cell_values(measures: Mapping[Cell, Mapping[int, RunMeasures]], quantity: Quantity) -> dict[Cell, list[float]]:
    """``{(p, n): [value of each seed]}`` for the cells where every seed has one."""
    out = {}
    for cell, runs in measures.items():
        values = [quantity.value(m) for _, m in sorted(runs.items())]
        if values and all(v is not None and math.isfinite(v) for v in values):
            out[cell] = values
    return out


def table(values: Mapping[Cell, Sequence[float]], digits: int = 4) -> str:
    """Markdown: a row per p, a column per n, each cell ``mean [95% interval]`` over seeds."""
    ps, ns = sorted({p for p, _ in values}), sorted({n for _, n in values})
    lines = ["| p | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for p in ps:
        cells = []
        for n in ns:
            if (p, n) not in values:
                cells.append("-")
                continue
            mean, lo, hi = interval95(values[(p, n)])
            cells.append(f"{mean:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]")
        lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DIVERGENCE_FROM = 0.25  # divergence: the RMS over the run's last three quarters (replicas start equal)
MAX_GROWTH = 1.0  # the drops' own effect on the mean grows like sqrt(t); the window ends where it grows faster than t


def growth_window(measures: Mapping[Cell, Mapping[int, RunMeasures]]) -> tuple[int, list[tuple[int, int, float]]]:
    """The rounds over which the mean model's distance is the drops' own effect, not yet amplified by training.

    A drop moves the mean by a random step (:func:`noise_model`): alone, such steps add up like a random walk,
    ``dist ~ sqrt(t)``, a log-log slope of 1/2. Training's own dynamics amplify any difference between two runs
    (seeds separate the same way), which shows as growth faster than linear. For each pair of consecutive
    snapshots, the slope ``log(dist(t2)/dist(t1)) / log(t2/t1)`` of the median over seeds, then its median over
    the cells at ``p > 0``; the window ends at the last round before the first slope over :data:`MAX_GROWTH`.
    Chosen from the growth alone, before any fit in ``n``. Returns ``(last round, [(t1, t2, median slope)])``.
    """
    curves = [{r: statistics.median(m.distance[r] for m in runs.values()) for r in next(iter(runs.values())).distance}
              for (p, _), runs in measures.items() if p > 0 and all(m.distance for m in runs.values())]
    if not curves:
        raise ValueError("no cell at p > 0 with a p = 0 run to compare with")
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    slopes = []
    for t1, t2 in zip(rounds, rounds[1:]):
        cell_slopes = [math.log(c[t2] / c[t1]) / math.log(t2 / t1) for c in curves if c[t1] > 0 and c[t2] > 0]
        if cell_slopes:  # none: no cell has moved from p = 0's yet
            slopes.append((t1, t2, statistics.median(cell_slopes)))
    last = rounds[0]
    for t1, t2, slope in slopes:
        if slope > MAX_GROWTH:
            break
        last = t2
    return last, slopes


def quantities(window_end: int, last_round: int) -> list[Quantity]:
    """The report's quantities, each with the noise model's prediction of its shape."""
    def gap_at(t: int) -> Callable[[RunMeasures], Optional[float]]:
        return lambda m: m.mean_loss_gap.get(t)

    first = int(DIVERGENCE_FROM * last_round)
    return [
        Quantity("divergence", f"replicas' divergence D, RMS over rounds {first}-{last_round}",
                 lambda m: window_rms(m.divergence, first, last_round), lambda h: math.sqrt(h.divergence)),
        Quantity("distance_window", f"mean model's distance to p = 0's at round {window_end}",
                 lambda m: m.distance.get(window_end), lambda h: math.sqrt(h.mean_walk)),
        Quantity("distance_end", f"mean model's distance to p = 0's at round {last_round}",
                 lambda m: m.distance.get(last_round), lambda h: math.sqrt(h.mean_walk)),
        Quantity("loss_gap_window", f"mean model's training loss minus p = 0's, round {window_end}",
                 gap_at(window_end), lambda h: h.mean_walk, log_space=False),
        Quantity("loss_gap_end", f"mean model's training loss minus p = 0's, round {last_round}",
                 gap_at(last_round), lambda h: h.mean_walk, log_space=False),
    ]


SPIKE_FACTOR = 2.0  # a run "spikes" when its final training loss is over this times the p = 0 runs' median at its n


def _interval(ci: tuple[float, float], one_seed: bool) -> str:
    """``[lo, hi]``; an end at the edge of the linear-space fit's grid of exponents reads ``<= -3`` / ``>= 3`` (the
    fit found no better exponent inside it); ``[n/a]`` with one seed (nothing to resample)."""
    if one_seed:
        return "[n/a]"
    edge = float(_GRID[-1])
    ends = [f"<= {-edge:.0f}" if v <= -edge + 1e-9 else f">= {edge:.0f}" if v >= edge - 1e-9 else f"{v:.2f}" for v in ci]
    return f"[{ends[0]}, {ends[1]}]"


def spikes(measures: Mapping[Cell, Mapping[int, RunMeasures]]) -> dict[float, tuple[int, int]]:
    """``{p: (runs that spiked, runs)}``: the mean model's final training loss over :data:`SPIKE_FACTOR` x the median of the
    ``p = 0`` runs at the same ``n`` (a criterion fixed before looking: a run that ended far above where
    drop-free training ends)."""
    out: dict[float, tuple[int, int]] = {}
    for (p, n), runs in sorted(measures.items()):
        base = [m.final_loss for m in measures.get((0.0, n), {}).values() if m.final_loss is not None]
        if not base:
            continue
        limit = SPIKE_FACTOR * statistics.median(base)
        finals = [m.final_loss for m in runs.values() if m.final_loss is not None]
        spiked, total = out.get(p, (0, 0))
        out[p] = (spiked + sum(1 for f in finals if not f <= limit), total + len(finals))
    return out


@dataclass
class Report:
    """What :func:`report` found: markdown sections, the fits, the window."""

    markdown: str
    fits: dict[str, dict]
    window_end: int


def report(measures: Mapping[Cell, Mapping[int, RunMeasures]], out, title: str = "") -> Report:
    """Writes to ``out``: ``consensus.md`` (everything), each table alone (``consensus_<quantity>.md``,
    ``consensus_final_loss.md``, ``consensus_fits.md``: what docs quote), ``consensus.json`` (fits, per-cell
    values, the noise model) and ``consensus.png``."""
    import json
    from pathlib import Path

    out = Path(out)
    last_round = max(max(m.mean_loss) for runs in measures.values() for m in runs.values())
    window_end, slopes = growth_window(measures)
    models = {c: noise_model(*c) for c in measures if c[0] > 0}
    seeds = sorted({s for runs in measures.values() for s in runs})
    slope_text = ", ".join(f"{t1}-{t2}: {s:.2f}" for t1, t2, s in slopes[:8])
    sections = [
        f"{len(seeds)} seeds a cell ({', '.join(map(str, seeds))}); cells: mean [95% t-interval over seeds].\n",
        f"The window: the mean model's distance grows with median log-log slopes {slope_text}, ...; "
        f"it ends at round {window_end}, the last before a slope over {MAX_GROWTH:g} (see `growth_window`).\n",
    ]
    fits: dict[str, dict] = {}
    fit_lines = ["| quantity | a: exponent of p/(1-p) [95%] | b: exponent of n [95%] | noise model's a, b (same fit) | "
                 "noise model x one constant: R^2 |", "|---|---|---|---|---|"]
    values_of: dict[str, dict[Cell, list[float]]] = {}
    tables: dict[str, str] = {}
    for quantity in quantities(window_end, last_round):
        values = cell_values(measures, quantity)
        values_of[quantity.name] = values
        tables[quantity.name] = table(values)
        sections.append(f"**{quantity.label}** (`{quantity.name}`):\n\n" + tables[quantity.name])
        drops = {c: v for c, v in values.items() if c[0] > 0}
        try:
            fit = fit_power_law(drops, quantity.log_space)
        except ValueError as exc:  # too few cells (a small grid), or a sign the log-space fit cannot take
            fit_lines.append(f"| {quantity.name} | not fitted: {exc} | | | |")
            continue
        model = fit_power_law({c: [quantity.predicted(models[c])] for c in drops}, quantity.log_space, resamples=1)
        scale, r2 = fit_scale(drops, lambda p, n: quantity.predicted(models[(p, n)]), quantity.log_space)
        fits[quantity.name] = dict(label=quantity.label, c=fit.c, a=fit.a, b=fit.b, a_ci=fit.a_ci, b_ci=fit.b_ci,
                                   noise_a=model.a, noise_b=model.b, noise_scale=scale, noise_r2=r2)
        one_seed = len(seeds) < 2
        fit_lines.append(f"| {quantity.name} | {fit.a:.2f} {_interval(fit.a_ci, one_seed)} | {fit.b:.2f} {_interval(fit.b_ci, one_seed)} "
                         f"| {model.a:.2f}, {model.b:.2f} | {r2:.2f} |")
    window_lines = ["| round | a: exponent of p/(1-p) [95%] | b: exponent of n [95%] |", "|---|---|---|"]
    for t in [r for r in sorted(next(iter(next(iter(measures.values())).values())).mean_loss) if r <= window_end]:
        at_t = cell_values(measures, Quantity("", "", lambda m, t=t: m.distance.get(t), lambda h: 0.0))
        try:
            fit = fit_power_law({c: v for c, v in at_t.items() if c[0] > 0}, resamples=500)
        except ValueError:
            continue
        window_lines.append(f"| {t} | {fit.a:.2f} {_interval(fit.a_ci, len(seeds) < 2)} | {fit.b:.2f} {_interval(fit.b_ci, len(seeds) < 2)} |")
    tables["window"] = "\n".join(window_lines) + "\n"
    sections.append("The mean model's distance fitted at every snapshot in the window (is the exponent of n stable?):\n\n"
                    + tables["window"])
    finals = {c: [m.final_loss for _, m in sorted(runs.items())] for c, runs in measures.items()
              if all(m.final_loss is not None for m in runs.values())}
    tables["final_loss"] = table(finals)
    sections.append(f"**the mean model's final training loss** (round {last_round}):\n\n" + tables["final_loss"])
    spiked = spikes(measures)
    sections.append(f"Runs that spiked (the mean model's final training loss over {SPIKE_FACTOR:g} x the p = 0 median at their n): "
                    + ", ".join(f"p = {p:g}: {k} of {t}" for p, (k, t) in spiked.items()) + ".\n")
    tables["fits"] = "\n".join(fit_lines) + "\n"
    sections.append("Fits of `c (p/(1-p))^a n^b` to the cell means at p > 0 (intervals: seeds resampled, 2,000 times):\n\n"
                    + tables["fits"])
    markdown = (f"{title}\n\n" if title else "") + "\n".join(sections)
    out.mkdir(parents=True, exist_ok=True)
    (out / "consensus.md").write_text(markdown)
    for name, text in tables.items():
        (out / f"consensus_{name}.md").write_text(text)
    (out / "consensus.json").write_text(json.dumps({
        "window_end": window_end, "slopes": slopes, "fits": fits, "spikes": {str(p): v for p, v in spiked.items()},
        "noise_model": {f"{p:g},{n}": {"divergence": m.divergence, "mean_displacement": m.mean_displacement,
                                       "mean_walk": m.mean_walk} for (p, n), m in models.items()},
        "values": {name: {f"{p:g},{n}": v for (p, n), v in values.items()} for name, values in values_of.items()},
    }, indent=1) + "\n")
    plot(measures, values_of, models, fits, window_end, last_round, out / "consensus.png", title)
    return Report(markdown, fits, window_end)


def plot(measures, values_of, models, fits, window_end: int, last_round: int, path, title: str = "") -> None:
    """(a) divergence and (b) the mean model's distance at the window's end against n, measured (95% intervals)
    beside the noise model (lines, one fitted constant); (c) the distance against rounds at one p, the window
    shaded; (d) the mean model's loss gap at the window's end against n."""
    from .compare import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.6))
    ps = sorted({p for p, _ in values_of["divergence"] if p > 0})
    colors = {p: plt.cm.viridis(i / max(len(ps) - 1, 1)) for i, p in enumerate(ps)}
    panels = ((axes[0], "divergence", "(a)"), (axes[1], "distance_window", "(b)"), (axes[3], "loss_gap_window", "(d)"))
    for ax, name, letter in panels:
        values, fit = values_of[name], fits.get(name)
        q = next(q for q in quantities(window_end, last_round) if q.name == name)
        for i, p in enumerate(ps):
            ns = sorted(n for pp, n in values if pp == p)
            stats = [interval95(values[(p, n)]) for n in ns]
            shifted = [n * 2 ** (0.04 * (i - (len(ps) - 1) / 2)) for n in ns]  # the intervals side by side
            ax.errorbar(shifted, [s[0] for s in stats], yerr=[[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]],
                        fmt="o", color=colors[p], capsize=3, markersize=4, label=f"p = {p:g}")
            if fit is not None:
                ax.plot(ns, [fit["noise_scale"] * q.predicted(models[(p, n)]) for n in ns], "-", color=colors[p], linewidth=1)
        ax.set_xscale("log", base=2)
        if q.log_space:
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="gray", linewidth=0.8)
        model = (f"lines: noise model x {fit['noise_scale']:.3g}, R^2 {fit['noise_r2']:.2f}" if fit is not None
                 else "too few cells to fit")
        ax.set(xlabel="workers = servers n", ylabel=name.replace("_", " "), title=f"{letter} {q.label}\n(dots: measured; {model})")
    axes[0].legend(fontsize=7)
    ax = axes[2]
    p_show = ps[len(ps) // 2]
    ns = sorted(n for p, n in measures if p == p_show)
    for i, n in enumerate(ns):
        runs = measures[(p_show, n)].values()
        rounds = sorted(next(iter(runs)).distance)
        ax.plot(rounds, [statistics.median(m.distance[r] for m in runs) for r in rounds],
                color=plt.cm.plasma(i / max(len(ns) - 1, 1)), label=f"n = {n}")
    ax.axvspan(0, window_end, color="gray", alpha=0.15, label=f"window (rounds <= {window_end})")
    ax.set(xscale="log", yscale="log", xlabel="round", ylabel="||xbar_p - xbar_0|| / ||xbar_0|| (median over seeds)",
           title=f"(c) the mean model's distance to p = 0's, p = {p_show:g}")
    ax.legend(fontsize=7)
    save_figure(fig, path, title)
