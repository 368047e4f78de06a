"""The consensus experiment's parts: the mean model recorded by the strategy, the noise model, the fits."""

import math

import numpy as np
import pytest
import torch

from pl_lossy import BernoulliNetwork, LossyPSStrategy
from pl_lossy.callbacks import RunSummary
from pl_lossy.experiment.consensus import (MeanTrajectory, RunMeasures, _interval, fit_power_law, fit_scale,
                                           growth_window, interval95, measure, noise_model, spikes)

from fits import SaveReplicas, digits_model, fit, fit_in_process, flat_params


# ---------------------------------------------------------------------------------------------- the mean model

def test_the_mean_model_recorded_across_processes_is_the_mean_of_every_ranks_replica(tmp_path):
    model, dm = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=2), start_method="fork", mean_model_every=5)
    fit(strategy, model, dm, limit_train_batches=10, max_epochs=1,
        callbacks=[RunSummary(tmp_path / "summary.json"), SaveReplicas(tmp_path)])
    replicas = [r["params"] for r in SaveReplicas(tmp_path).load(2)]
    assert not torch.equal(replicas[0], replicas[1])  # drops left the replicas apart
    saved = MeanTrajectory.load(tmp_path / "mean_model.pt")
    assert saved.rounds == [5, 10]
    torch.testing.assert_close(saved.mean[-1], (replicas[0] + replicas[1]) / 2, rtol=0, atol=1e-6)
    assert not torch.equal(saved.mean[0], saved.mean[1])


def test_virtual_workers_mean_model_and_the_distance_between_two(tmp_path):
    model, dm = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=1), workers_per_device=4, mean_model_every=3)
    fit_in_process(strategy, model, dm, limit_train_batches=9, max_epochs=1, logger=False)
    rounds, means = zip(*strategy.mean_models)
    assert rounds == (3, 6, 9)
    rows = strategy.replicas.rows[:, : strategy.replicas.numel]
    torch.testing.assert_close(means[-1], rows.mean(0), rtol=0, atol=1e-6)
    assert means[-1].shape == flat_params(model).shape
    trajectory = MeanTrajectory(list(rounds), torch.stack(means))
    moved = MeanTrajectory([6, 9, 12], torch.stack([means[1] * 1.5, means[2], means[2]]))
    assert moved.distance_to(trajectory) == {6: pytest.approx(0.5), 9: 0.0}  # only the rounds both recorded


def test_the_drops_own_random_stream_leaves_the_batches_alone():
    """The consensus experiment pairs a run at p with the p = 0 run of its seed: only drops may differ. A network
    that draws a mask every round but drops nothing (p = 1e-12) ends bit for bit where p = 0 ends."""
    means = []
    for p in (0.0, 1e-12):
        model, dm = digits_model()
        strategy = LossyPSStrategy(network=BernoulliNetwork(p, seed=4), workers_per_device=3, mean_model_every=4)
        fit_in_process(strategy, model, dm, limit_train_batches=8, max_epochs=1, logger=False)
        means.append(torch.stack([m for _, m in strategy.mean_models]))
    assert torch.equal(means[0], means[1])


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_mean_model_every_is_one_line(bad):
    with pytest.raises(ValueError, match="mean_model_every must be an integer >= 0"):
        LossyPSStrategy(network=BernoulliNetwork(0.1), mean_model_every=bad)


# ---------------------------------------------------------------------------------------------- the noise model

@pytest.mark.parametrize("p", [0.1, 0.4])
def test_the_noise_model_at_two_workers_matches_its_closed_form(p):
    """n = 2, each worker's own block local: the other copy's up and down links each drop with p. With
    r = p(1-p)/4 + p^2 the difference of the two copies has E[d^2] = 2r/(1-r), so h_div = r/(2(1-r)) and
    h_mean = 5p(1-p)/(8(1-r)) (an up loss moves the mean by e/2, a down loss by e/4)."""
    r = p * (1 - p) / 4 + p * p
    model = noise_model(p, 2, rounds=600, elements=1024)
    assert model.divergence == pytest.approx(r / (2 * (1 - r)), abs=4 * model.stderr[0])
    assert model.mean_displacement == pytest.approx(5 * p * (1 - p) / (8 * (1 - r)), abs=4 * model.stderr[1])


def test_the_noise_models_mean_displacement_shrinks_like_one_over_n_and_its_divergence_saturates():
    models = {n: noise_model(0.1, n, rounds=150, elements=256) for n in (2, 8, 32)}
    steps = [models[n].mean_displacement * n for n in (2, 8, 32)]  # ~ constant x p/(1-p) if it shrinks as 1/n
    assert max(steps) / min(steps) < 2.0 and models[32].mean_displacement < models[8].mean_displacement < models[2].mean_displacement
    assert models[2].divergence < models[8].divergence < models[32].divergence < 0.1 / 0.9  # below p/(1-p)
    # consecutive displacements are correlated, a little: the walk's variance a round stays near one round's
    assert all(0.8 < m.mean_walk / m.mean_displacement < 1.2 for m in models.values())
    assert noise_model(0.0, 8).divergence == noise_model(0.3, 1).mean_walk == 0.0  # nothing to disagree about


# ---------------------------------------------------------------------------------------------- fits and intervals

def synthetic(a, b, c=2.0, noise=0.1, seeds=5, offset=0.0, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return {(p, n): [offset + c * (p / (1 - p)) ** a * n ** b * math.exp(rng.normal(0, noise)) for _ in range(seeds)]
            for p in (0.0, 0.05, 0.2, 0.5) for n in (2, 8, 32)}


def test_the_power_law_fit_recovers_known_exponents_with_intervals_that_cover_them():
    fit_ = fit_power_law(synthetic(0.5, -0.5))
    assert fit_.a == pytest.approx(0.5, abs=0.05) and fit_.b == pytest.approx(-0.5, abs=0.05)
    assert fit_.a_ci[0] < 0.5 < fit_.a_ci[1] and fit_.b_ci[0] < -0.5 < fit_.b_ci[1]
    assert fit_(0.2, 8) == pytest.approx(fit_.c * 0.25 ** fit_.a * 8 ** fit_.b)
    linear = fit_power_law(synthetic(1.0, -1.0, noise=0.05), log_space=False, resamples=200)
    assert linear.a == pytest.approx(1.0, abs=0.1) and linear.b == pytest.approx(-1.0, abs=0.1)


def test_fits_refuse_what_they_cannot_fit():
    with pytest.raises(ValueError, match="two drop rates > 0 and two worker counts"):
        fit_power_law({(0.1, 2): [1.0], (0.2, 2): [2.0]})
    negative = synthetic(1.0, -1.0, offset=-1.0)
    with pytest.raises(ValueError, match="every cell's mean > 0"):
        fit_power_law(negative)


def test_one_constant_scales_a_prediction_onto_what_it_predicts():
    values = synthetic(0.5, -0.5, c=3.0, noise=0.0)
    scale, r2 = fit_scale(values, lambda p, n: (p / (1 - p)) ** 0.5 * n ** -0.5)
    assert scale == pytest.approx(3.0) and r2 == pytest.approx(1.0)
    _, poor = fit_scale(values, lambda p, n: 1.0 + 0 * p)
    assert poor < 0.1


def test_interval95_is_students_t():
    mean, lo, hi = interval95([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4) and lo == pytest.approx(4 - hi)


# ---------------------------------------------------------------------------------------------- the window, spikes

def measures_with(distance_of, final=lambda p, n, s: 1.0):
    out = {}
    for p in (0.0, 0.1, 0.5):
        for n in (2, 8):
            out[(p, n)] = {s: RunMeasures(p, n, s, {}, {}, {} if p == 0 else {t: distance_of(t, p, n) for t in range(5, 101, 5)},
                                          {}, final(p, n, s)) for s in range(3)}
    return out


def test_the_window_ends_where_the_distance_grows_faster_than_linearly():
    end, slopes = growth_window(measures_with(lambda t, p, n: p * (t ** 0.5 if t <= 40 else 40 ** 0.5 * (t / 40) ** 3)))
    assert end == 40 and slopes[0] == (5, 10, pytest.approx(0.5))
    assert growth_window(measures_with(lambda t, p, n: p * t ** 0.5))[0] == 100  # never amplified: all of it


def test_the_window_survives_cells_that_have_not_moved_yet():
    end, slopes = growth_window(measures_with(lambda t, p, n: 0.0 if t <= 10 else p * t ** 0.5))
    assert end == 100 and slopes[0][0] == 15  # rounds 5-10: nothing to take a slope of


def test_fit_intervals_at_the_grids_edge_and_with_one_seed_say_so():
    assert _interval((-3.0, 0.5), one_seed=False) == "[<= -3, 0.50]" and _interval((0.1, 3.0), False) == "[0.10, >= 3]"
    assert _interval((0.2, 0.2), one_seed=True) == "[n/a]"


def test_measures_keep_the_seeds_every_cell_has(tmp_path):
    class Run:
        def __init__(self, p, n, seed):
            self.settings, self.run_dir = {"seed": seed}, tmp_path / f"{p}-{n}-{seed}"
            self.summary = {"config": {"data": {}, "model": {}}}
            self.run_dir.mkdir()
            torch.save({"rounds": torch.tensor([5, 10]), "mean": torch.full((2, 3), 1.0 + p + seed)}, self.run_dir / "mean_model.pt")

        def column(self, name):
            return [(9, 0.1)]

    grid = {(p, 2): [Run(p, 2, s) for s in ((0, 1, 2) if p == 0 else (1, 2))] for p in (0.0, 0.5)}
    measures = measure(grid, loss_of=lambda config: (lambda flat: float(flat.sum())))
    assert {c: sorted(runs) for c, runs in measures.items()} == {(0.0, 2): [1, 2], (0.5, 2): [1, 2]}
    run = measures[(0.5, 2)][1]
    assert run.divergence == {10: 0.1}  # logged at round index 9: after 10 rounds
    assert run.distance == {5: pytest.approx(0.5 / 2), 10: pytest.approx(0.5 / 2)} and run.mean_loss_gap == {5: 1.5, 10: 1.5}
    assert run.final_loss == 3 * 2.5
    grid[(0.5, 2)] = [Run(0.5, 2, 7)]
    with pytest.raises(ValueError, match="no seed that every cell"):
        measure(grid, loss_of=lambda config: (lambda flat: 0.0))


def test_a_spike_is_a_final_loss_over_twice_the_drop_free_median():
    measures = measures_with(lambda t, p, n: 1.0, final=lambda p, n, s: 5.0 if (p, n, s) == (0.5, 8, 1) else 1.0 + 0.1 * s)
    assert spikes(measures) == {0.0: (0, 6), 0.1: (0, 6), 0.5: (1, 6)}
