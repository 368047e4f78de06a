"""Worker failures: masks of a down worker, its frozen replica, and the strategy's rounds around a window."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from pl_lossy import BernoulliNetwork, LossyPSStrategy
from pl_lossy.workers.failures import FrozenWorkers, check_failures, fail_outcome
from pl_lossy.network import RoundSpec

from fits import RecordingLossyPS, digits_model, fit, fit_in_process, load_rounds


def test_a_down_worker_and_its_colocated_server_lose_every_packet_but_their_own():
    up, down = np.ones((4, 4, 3), dtype=bool), np.ones((4, 4, 3), dtype=bool)
    fail_outcome(up, down, (1,), colocated_servers=True)
    others = [0, 2, 3]
    assert not up[1, others].any() and not up[others, 1].any() and not down[1, others].any() and not down[others, 1].any()
    assert up[1, 1].all() and down[1, 1].all() and up[np.ix_(others, others)].all() and down[np.ix_(others, others)].all()
    up, down = np.ones((4, 2, 3), dtype=bool), np.ones((2, 4, 3), dtype=bool)  # dedicated servers stay up
    fail_outcome(up, down, (3,), colocated_servers=False)
    assert not up[3].any() and not down[:, 3].any() and up[:3].all() and down[:, :3].all()


def test_the_schedule_is_checked_in_one_line():
    assert check_failures([[3, 10, 20], (1, 0, 5)]) == ((1, 0, 5), (3, 10, 20))
    assert check_failures(None) == ()
    for bad in ([[1, 5, 5]], [[1, -1, 5]], [[1, 2]], [3, 10, 20], [[True, 1, 2]], "x"):
        with pytest.raises(ValueError, match="worker_failures must be a list of"):
            check_failures(bad)
    with pytest.raises(ValueError, match="workers are 0..3"):
        RoundSpec(0, 4, 4, 2, worker_failures=((4, 0, 1),))
    spec = RoundSpec(7, 4, 4, 2, worker_failures=((1, 5, 8), (2, 8, 9), (3, 0, 7)))
    assert spec.down_workers == (1,)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2), lambda ps: torch.optim.Adam(ps, lr=0.1)])
def test_frozen_rows_of_stacked_workers_undo_a_step_and_the_others_keep_it(make):
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, 2, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    buf = torch.zeros(4, 2)  # a stacked buffer (running statistics)
    opt = make([w, b])

    def step():
        opt.zero_grad()
        ((w.sum(1) + b) ** 2).sum().backward()
        buf.add_(1.0)
        opt.step()

    step()  # the optimizer has state now
    before = [t.detach().clone() for t in (w, b, buf)] + [v.clone() for p in (w, b) for v in opt.state[p].values() if v.shape == p.shape]
    frozen = FrozenWorkers([w, b], [buf], [opt], rows=[1, 3], stacked=True)
    step()
    frozen.restore()
    after = [t.detach() for t in (w, b, buf)] + [v for p in (w, b) for v in opt.state[p].values() if v.shape == p.shape]
    for x, y in zip(before, after):
        assert torch.equal(x[[1, 3]], y[[1, 3]]) and not torch.equal(x[[0, 2]], y[[0, 2]])


def test_one_frozen_worker_undoes_its_whole_step_state_included():
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.1)
    frozen = FrozenWorkers([w], [], [opt], rows=[0], stacked=False)
    (w**2).sum().backward()
    opt.step()
    frozen.restore()
    assert w not in opt.state or not opt.state[w]  # no state before its first step: none after
    (w**2).sum().backward()
    opt.step()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    kept = w.detach().clone()
    frozen = FrozenWorkers([w], [], [opt], rows=[0], stacked=False)
    opt.step()
    frozen.restore()
    assert torch.equal(w, kept) and all(torch.equal(opt.state[w][k], v) for k, v in state.items())


def test_a_down_process_worker_is_frozen_in_its_window_and_rejoins_after(tmp_path):
    """Two processes, worker 1 down for rounds 3..7, no drops otherwise: its replica (and its momentum) stands
    still, worker 0 trains on alone (a round changes nothing for it), and from round 8 both train and average."""
    model, dm = digits_model(momentum=0.9)
    strategy = RecordingLossyPS(tmp_path, network=BernoulliNetwork(0.0), worker_failures=[[1, 3, 8]], compute_time_s=1e-3)
    fit(strategy, model, dm, limit_train_batches=12)
    zero, one = load_rounds(tmp_path, 2)
    n = zero["numel"]
    after = lambda rank, r: rank["rounds"][r][1][:n]  # noqa: E731
    before = lambda rank, r: rank["rounds"][r][0][:n]  # noqa: E731
    for r in range(3, 8):
        assert torch.equal(after(one, r), after(one, 2))  # frozen: no local step, nothing received
        assert torch.equal(before(zero, r), after(zero, r))  # alone: the round averages worker 0 with itself
        assert not torch.equal(after(zero, r), after(zero, r - 1))  # ...and it trains
    assert not torch.equal(after(one, 8), after(one, 2))  # back: it steps again
    assert torch.equal(after(zero, 9), after(one, 9))  # and averaging makes the two equal again (no drops)
    assert not torch.equal(before(zero, 9), before(one, 9))


class Rows(pl.Callback):
    """Every round's replicas ([k, row]), buffers (each [k, ...]) and count of workers down."""

    def __init__(self):
        self.rows, self.buffers, self.down = [], [], []

    def on_round_end(self, trainer, strategy):
        self.rows.append(strategy.replicas.rows.detach().clone())
        self.buffers.append([b.detach().clone() for b in strategy.replicas.all_buffers(trainer.lightning_module)])
        self.down.append(strategy.last_round.stats["workers_down"])


def test_virtual_workers_freeze_by_rows_and_the_rounds_report_who_is_down():
    model, dm = digits_model(momentum=0.9)
    rows = Rows()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=2), workers_per_device=3, worker_failures=[[2, 2, 5]], compute_time_s=1e-3)
    fit_in_process(strategy, model, dm, limit_train_batches=8, max_epochs=1, callbacks=[rows])
    assert rows.down == [0, 0, 1, 1, 1, 0, 0, 0]
    for r in (2, 3, 4):
        assert torch.equal(rows.rows[r][2], rows.rows[1][2]) and not torch.equal(rows.rows[r][0], rows.rows[r - 1][0])
    assert not torch.equal(rows.rows[5][2], rows.rows[1][2])


def test_a_worker_out_of_range_fails_before_launch():
    model, _ = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), worker_failures=[[4, 0, 3]])
    with pytest.raises(ValueError, match="worker failure \\[4, 0, 3\\]: workers are 0..3"):
        strategy.network.check_round(strategy.round_spec_for(model, 4))


def test_failures_with_stragglers_and_a_counted_compute_time_train():
    """The freeze asks which workers are down before the first step's FLOPs are counted (stragglers need them later)."""
    model, dm = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), workers_per_device=2, worker_failures=[[1, 0, 2]], slow_workers={0: 2.0})
    fit_in_process(strategy, model, dm, limit_train_batches=3, max_epochs=1)
    assert strategy.clock.rounds == 3 and strategy.last_round.stats["workers_down"] == 0


if torch.cuda.is_available():  # collected only where there is a GPU (run them there: pytest -k cuda)
    import functools

    from pl_lossy.experiment.data import SyntheticDataModule
    from pl_lossy.experiment.models import Classifier, ResNet20

    @pytest.mark.parametrize("batching", ["vmap", "cuda_graph"])
    def test_cuda_virtual_workers_freeze_a_down_worker_and_its_batchnorm_statistics(batching):
        """On the GPU, eager and replayed from CUDA graphs: worker 2's replica and BatchNorm statistics stand still in
        its window while the others train and share theirs; after it, it trains again."""
        pl.seed_everything(0, verbose=False)
        dm = SyntheticDataModule(n_samples=256, input_shape=(3, 8, 8), batch_size=8)
        model = Classifier(functools.partial(ResNet20, width=4), dm.input_shape, dm.num_classes, momentum=0.9)
        rows = Rows()
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=1), workers_per_device=4, batching=batching, start_method="popen",
                                   compute_time_s=0.0, worker_failures=[[2, 2, 5]])
        fit_in_process(strategy, model, dm, "gpu", max_steps=7, limit_val_batches=0, callbacks=[rows])
        assert strategy.steps.mode == batching and rows.down == [0, 0, 1, 1, 1, 0, 0]
        for r in (2, 3, 4):
            assert torch.equal(rows.rows[r][2], rows.rows[1][2]) and not torch.equal(rows.rows[r][0], rows.rows[r - 1][0])
            assert all(torch.equal(b[2], b1[2]) for b, b1 in zip(rows.buffers[r], rows.buffers[1]))
            assert any(not torch.equal(b[0], b1[0]) for b, b1 in zip(rows.buffers[r], rows.buffers[1]) if b.is_floating_point())
        assert not torch.equal(rows.rows[5][2], rows.rows[1][2])


STEP_COUNTED = [
    lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.AdamW(ps), lambda ps: torch.optim.Adamax(ps),
    lambda ps: torch.optim.NAdam(ps), lambda ps: torch.optim.RAdam(ps), lambda ps: torch.optim.Adagrad(ps, lr_decay=0.1),
]
NO_STEP_COUNT = [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), lambda ps: torch.optim.RMSprop(ps), lambda ps: torch.optim.Adadelta(ps),
    lambda ps: torch.optim.Adagrad(ps),
]


@pytest.mark.parametrize("make", STEP_COUNTED)
def test_failures_of_stacked_workers_refuse_an_optimizer_whose_update_counts_steps(make):
    """One shared step count cannot stand still for a frozen row: refused before training, in one line."""
    from pl_lossy.workers.failures import check_failure_optimizers

    opt = make([torch.nn.Parameter(torch.zeros(3))])
    name = type(opt).__name__
    with pytest.raises(ValueError, match=f"workers_per_device > 1 freezes workers by rows, but {name}'s shared step count.*workers_per_device=1"):
        check_failure_optimizers([opt], 2, ((1, 0, 3),))
    check_failure_optimizers([opt], 1, ((1, 0, 3),))  # one worker a process: its whole state is restored
    check_failure_optimizers([opt], 2, ())  # no failures: no frozen rows


@pytest.mark.parametrize("make", NO_STEP_COUNT)
def test_failures_of_stacked_workers_accept_an_optimizer_without_a_step_count_in_its_update(make):
    from pl_lossy.workers.failures import check_failure_optimizers

    check_failure_optimizers([make([torch.nn.Parameter(torch.zeros(3))])], 4, ((1, 0, 3),))


def test_a_step_counting_param_group_among_others_is_refused():
    from pl_lossy.workers.failures import check_failure_optimizers

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adagrad([{"params": [a]}, {"params": [b], "lr_decay": 0.01}])
    with pytest.raises(ValueError, match="Adagrad's shared step count"):
        check_failure_optimizers([torch.optim.SGD([a], lr=0.1), opt], 2, ((0, 1, 2),))
