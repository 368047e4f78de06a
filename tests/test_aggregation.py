"""The gradient rules against loop-by-loop references written from their published descriptions."""

import math
import threading

import numpy as np
import pytest
import scipy.linalg
import torch

from pl_lossy.round import aggregation, rps
from pl_lossy.round.gradient_exchange import GradientExchange

from test_rps import _random_masks, _threaded_all_reduce


def reference_rule(rule, grads, up, down, signs=None):
    """One worker, server and packet at a time, on float64 numpy arrays ``[W, S, P, E]``.

    gradient (the paper's ablation): a server averages the copies it received; a worker takes the
    average where it arrives (and exists), else keeps its own gradient.
    zero_fill (MLT): a server sums what it received and divides by the number of workers; a worker
    takes it where it arrives, else zeros.
    hadamard (OptiReduce): zero_fill on every block multiplied by a +-1 diagonal then the dense
    Walsh-Hadamard matrix (scaled to be orthogonal), each worker's result multiplied back.
    """
    W, S, P, E = grads.shape
    if rule == "hadamard":
        n = P * E
        H = scipy.linalg.hadamard(n) / math.sqrt(n)
        d = np.sign(signs)  # [S, n]
        spread = np.stack([[H @ (d[j] * grads[i, j].reshape(-1)) for j in range(S)] for i in range(W)]).reshape(grads.shape)
        out = reference_rule("zero_fill", spread, up, down)
        return np.stack([[d[j] * (H @ out[i, j].reshape(-1)) for j in range(S)] for i in range(W)]).reshape(grads.shape)
    out = np.empty_like(grads)
    for j in range(S):
        for p in range(P):
            arrived = [grads[i, j, p] for i in range(W) if up[i, j, p]]
            if rule == "gradient":
                agg = sum(arrived) / len(arrived) if arrived else None
            else:
                agg = sum(arrived, np.zeros(E)) / W
            for i in range(W):
                if down[j, i, p] and agg is not None:
                    out[i, j, p] = agg
                else:
                    out[i, j, p] = grads[i, j, p] if rule == "gradient" else 0.0
    return out


def _case(seed, W, S, numel, packet_bytes, colocated, drop, power_of_two=False):
    rng = np.random.default_rng(seed)
    layout = rps.PacketLayout.for_model(numel, S, packet_bytes, power_of_two)
    up, down = _random_masks(rng, W, S, layout.packets_per_block, colocated, drop)
    grads = torch.zeros(W, layout.padded_numel, dtype=torch.float64)
    grads[:, :numel] = torch.from_numpy(rng.standard_normal((W, numel)))
    return layout, grads.view(W, *layout.shape), up, down


CASES = [  # seed, W, S, numel, packet_bytes, colocated, drop
    (0, 3, 2, 83, 16, True, 0.3), (1, 4, 4, 50, 8, True, 0.5), (2, 2, 3, 61, 12, False, 0.5),
    (3, 5, 1, 17, 400, True, 0.2), (4, 1, 2, 40, 20, False, 0.6), (5, 3, 3, 200, 64, True, 0.0),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rule", ["gradient", "zero_fill"])
def test_gradient_rules_match_their_reference(rule, case):
    layout, grads, up, down = _case(*case)
    got = {"gradient": aggregation.gradient_round, "zero_fill": aggregation.zero_fill_round}[rule](grads, up, down)
    want = reference_rule(rule, grads.numpy(), up.numpy(), down.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_hadamard_matches_its_reference(case):
    layout, grads, up, down = _case(*case, power_of_two=True)
    signs = torch.empty(layout.n_servers, layout.packets_per_block * layout.elems_per_packet, dtype=torch.float64)
    aggregation.round_signs(7, 3, signs, torch.Generator())
    got = aggregation.hadamard_round(grads, up, down, signs)
    want = reference_rule("hadamard", grads.numpy(), up.numpy(), down.numpy(), signs.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 8, 16, 64, 512, 2048])
def test_fwht_is_the_walsh_hadamard_matrix(n):
    assert torch.equal(aggregation.hadamard_matrix(n, torch.float64), torch.from_numpy(scipy.linalg.hadamard(n)).double())
    x = torch.randn(3, n, dtype=torch.float64)
    got = aggregation.fwht(x.clone(), torch.empty_like(x))
    np.testing.assert_allclose(got.numpy(), x.numpy() @ scipy.linalg.hadamard(n).T, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="power-of-two"):
        aggregation.fwht(torch.zeros(6), torch.zeros(6))


def test_spreading_round_trips_preserves_norms_and_signs_are_a_function_of_seed_and_round():
    x = torch.randn(4, 1024)
    signs = torch.empty(1024)
    aggregation.round_signs(0, 5, signs, torch.Generator())
    y = aggregation.spread_(x.clone(), signs, torch.empty_like(x))
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(aggregation.unspread_(y, signs, torch.empty_like(x)), x, rtol=0, atol=1e-5)
    again, other = torch.empty(1024), torch.empty(1024)
    aggregation.round_signs(0, 5, again, torch.Generator())
    aggregation.round_signs(0, 6, other, torch.Generator())
    assert torch.equal(signs, again) and not torch.equal(signs, other)
    assert set((signs * 32).round().tolist()) == {-1.0, 1.0}  # +-1/sqrt(1024)


def test_hadamard_spreads_a_lost_packets_error_over_the_whole_block():
    """Measured: one lost packet of 16 leaves a hole of E zeros under zero_fill; under hadamard its error
    covers every coordinate of the block, with the same squared norm in expectation and a far smaller peak."""
    torch.manual_seed(0)
    layout = rps.PacketLayout.for_model(4096, 1, packet_bytes=1024, power_of_two_blocks=True)  # 1 block, 16 x 256
    W, P, E = 2, layout.packets_per_block, layout.elems_per_packet
    grads = torch.randn(W, *layout.shape, dtype=torch.float64)
    up = torch.ones(W, 1, P, dtype=torch.bool)
    down = torch.ones(1, W, P, dtype=torch.bool)
    down[0, 1, 5] = False  # worker 1 misses packet 5 of the averaged block
    exact = grads.mean(0)
    hole = aggregation.zero_fill_round(grads, up, down)[1] - exact
    signs = torch.empty(1, P * E, dtype=torch.float64)
    aggregation.round_signs(0, 0, signs, torch.Generator())
    noise = aggregation.hadamard_round(grads, up, down, signs)[1] - exact
    assert int((hole.abs() > 1e-12).sum()) == E  # a hole of one packet
    assert float((noise.abs() > 1e-12).float().mean()) > 0.99  # noise everywhere
    assert float(noise.abs().max()) < 0.5 * float(hole.abs().max())
    assert 0.5 < float(noise.norm() / hole.norm()) < 2.0
    torch.testing.assert_close(aggregation.hadamard_round(grads, up, torch.ones_like(down), signs), exact.expand_as(grads))


def test_bad_names_fail_in_one_line():
    with pytest.raises(ValueError, match="aggregation must be one of rps, gradient, zero_fill, hadamard; got 'average'"):
        aggregation.check_aggregation("average")


# ---------------------------------------------------------------------- one process's side


def _gradient_exchanges(rule, n_proc, k, layout, grads, colocated):
    """``n_proc`` processes of ``k`` workers whose trained tensors (two, [k, ...] or plain) carry ``grads``."""
    exchanges, params = [], []
    cut = layout.numel // 3
    for r in range(n_proc):
        mine = grads[r * k : (r + 1) * k].reshape(k, -1)[:, : layout.numel].float()
        shapes = [(cut,), (layout.numel - cut,)]
        tensors = []
        for (lo, hi), shape in zip([(0, cut), (cut, layout.numel)], shapes):
            t = torch.zeros((k, *shape) if k > 1 else shape, requires_grad=True)
            t.grad = mine[:, lo:hi].reshape(t.shape).clone()
            tensors.append(t)
        params.append(tensors)
        exchanges.append(GradientExchange(rule, tensors, [0, cut], layout, r, n_proc, k, colocated, seed=11))
    return exchanges, params


@pytest.mark.parametrize("rule", aggregation.GRADIENT_RULES)
@pytest.mark.parametrize("n_proc, k, colocated", [(1, 4, True), (2, 2, True), (3, 1, True), (2, 3, False)])
def test_gradient_exchange_over_processes_matches_the_rule(rule, n_proc, k, colocated):
    W, S = n_proc * k, 3
    layout = rps.PacketLayout.for_model(83, S, packet_bytes=16, power_of_two_blocks=rule == "hadamard")
    rng = np.random.default_rng(3)
    torch.manual_seed(3)
    grads = torch.zeros(W, layout.padded_numel, dtype=torch.float64)
    grads[:, : layout.numel] = torch.randn(W, layout.numel, dtype=torch.float64)
    grads = grads.view(W, *layout.shape)
    exchanges, params = _gradient_exchanges(rule, n_proc, k, layout, grads, colocated)
    reducers = _threaded_all_reduce(n_proc)
    for rnd in range(2):
        grads.view(W, -1)[:, layout.numel :] = 0  # padding carries no gradient
        up, down = _random_masks(rng, W, S, layout.packets_per_block, colocated)
        sides = [None] * n_proc
        threads = [threading.Thread(target=lambda r=r: sides.__setitem__(
            r, exchanges[r].step(up, down, reducers[r], rnd, (r + 0.5, r + 10.0)))) for r in range(n_proc)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        if rule == "hadamard":
            signs = torch.empty(S, layout.packets_per_block * layout.elems_per_packet)  # fp32, as the exchange draws them
            aggregation.round_signs(11, rnd, signs, torch.Generator())
            grads = aggregation.hadamard_round(grads, up, down, signs.double())
        else:
            grads = {"gradient": aggregation.gradient_round, "zero_fill": aggregation.zero_fill_round}[rule](grads, up, down)
        got = torch.cat([torch.cat([t.grad.reshape(k, -1) for t in tensors], dim=1) for tensors in params]).double()
        torch.testing.assert_close(got, grads.reshape(W, -1)[:, : layout.numel], rtol=1e-5, atol=1e-5)
        assert sides[0].tolist() == [[r + 0.5 for r in range(n_proc)], [r + 10.0 for r in range(n_proc)]]


def test_one_worker_on_its_own_server_leaves_its_gradient_bit_for_bit():
    layout = rps.PacketLayout.for_model(10, 1, packet_bytes=16, power_of_two_blocks=True)
    t = torch.zeros(10, requires_grad=True)
    t.grad = torch.randn(10)
    before = t.grad.clone()
    ex = GradientExchange("hadamard", [t], [0], layout, 0, 1)
    ex.step(torch.ones(1, 1, layout.packets_per_block, dtype=torch.bool), torch.ones(1, 1, layout.packets_per_block, dtype=torch.bool),
            lambda x: None, 0)
    assert torch.equal(t.grad, before)


# ---------------------------------------------------------------------- in real fits


def _model(optimizer):
    from fits import digits_model

    model, dm = digits_model(momentum=0.9)
    if optimizer == "adam":
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, dm


@pytest.mark.parametrize("optimizer, rules", [
    ("sgd_momentum", aggregation.GRADIENT_RULES),
    # hadamard's fp32 round trip turns an exactly-zero gradient (a pixel that is always 0) into ~1e-9 noise,
    # which Adam normalizes into a full step there: equal to DDP only up to that (docs/aggregation.md)
    ("adam", ("gradient", "zero_fill")),
])
def test_without_drops_a_gradient_rule_ends_where_ddp_ends(optimizer, rules):
    """Gradient rules step on the aggregated gradient, as DDP does, so momentum and Adam see the same
    (RPS with Adam does not: tests/test_strategy.py::test_with_adam_rps_without_drops_is_not_ddp)."""
    from pytorch_lightning.strategies import DDPStrategy

    from pl_lossy import BernoulliNetwork, LossyPSStrategy

    from fits import fit, fit_in_process, flat_params

    ddp_model, dm = _model(optimizer)
    fit(DDPStrategy(start_method="fork"), ddp_model, dm, limit_train_batches=10)
    start = flat_params(_model(optimizer)[0])
    for rule in rules:
        model, dm = _model(optimizer)
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.0), aggregation=rule, workers_per_device=2)
        fit_in_process(strategy, model, dm, limit_train_batches=10, max_epochs=1)
        assert strategy.clock.rounds == 10
        assert not torch.equal(flat_params(model), start)
        torch.testing.assert_close(flat_params(model), flat_params(ddp_model), rtol=1e-4, atol=1e-5, msg=rule)


@pytest.mark.parametrize("rule", ["gradient", "hadamard"])
def test_a_gradient_rule_under_drops_trains_the_same_workers_laid_out_2x1_and_1x2(tmp_path, rule):
    from pl_lossy import BernoulliNetwork

    from test_virtual_workers import train_workers

    runs = {}
    for processes, k in ((2, 1), (1, 2)):
        (tmp_path / f"{processes}x{k}").mkdir()
        runs[processes, k], _ = train_workers(tmp_path / f"{processes}x{k}", processes, k, network=BernoulliNetwork(0.3, seed=2),
                                              strategy_kw={"aggregation": rule})
    assert (runs[2, 1][0] - runs[2, 1][1]).abs().max() > 1e-4  # missed packets made the workers differ
    torch.testing.assert_close(runs[1, 2], runs[2, 1], rtol=0, atol=1e-6)


if torch.cuda.is_available():  # collected only where there is a GPU (run them there: pytest -k cuda)

    @pytest.mark.parametrize("rule", aggregation.GRADIENT_RULES)
    def test_cuda_gradient_exchange_of_several_workers_matches_the_rule(rule):
        """One process of 5 workers on the GPU; hadamard's signs drawn on the GPU, the reference given the same."""
        W, S = 5, 3
        layout = rps.PacketLayout.for_model(1001, S, packet_bytes=64, power_of_two_blocks=rule == "hadamard")
        torch.manual_seed(0)
        grads = torch.zeros(W, layout.padded_numel, dtype=torch.float64)
        grads[:, : layout.numel] = torch.randn(W, layout.numel, dtype=torch.float64)
        t = torch.zeros(W, layout.numel, device="cuda", requires_grad=True)
        exchange = GradientExchange(rule, [t], [0], layout, 0, 1, W, seed=4)
        rng = np.random.default_rng(0)
        for rnd in range(3):
            grads[:, layout.numel :] = 0
            t.grad = grads[:, : layout.numel].float().cuda()
            up, down = _random_masks(rng, W, S, layout.packets_per_block, True, 0.2)
            exchange.step(up, down, lambda x: None, rnd)
            blocks = grads.view(W, *layout.shape)
            if rule == "hadamard":
                signs = torch.empty(S, layout.packets_per_block * layout.elems_per_packet, device="cuda")
                aggregation.round_signs(4, rnd, signs, torch.Generator(device="cuda"))
                grads = aggregation.hadamard_round(blocks, up, down, signs.double().cpu()).reshape(W, -1)
            else:
                rule_round = {"gradient": aggregation.gradient_round, "zero_fill": aggregation.zero_fill_round}[rule]
                grads = rule_round(blocks, up, down).reshape(W, -1)
            torch.testing.assert_close(t.grad.double().cpu(), grads[:, : layout.numel], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("rule", aggregation.GRADIENT_RULES)
    def test_cuda_gradient_rules_train_16_virtual_workers_batched(rule):
        from pl_lossy import BernoulliNetwork, LossyPSStrategy

        from fits import fit_in_process
        from test_virtual_workers import small_resnet

        model, dm = small_resnet()
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.1), aggregation=rule, workers_per_device=16, start_method="popen")
        fit_in_process(strategy, model, dm, "gpu", max_steps=6, limit_val_batches=2)
        params = strategy.replicas.worker_state(model)["params"]
        assert strategy.steps.mode == "vmap" and strategy.clock.rounds == 6 and torch.isfinite(params).all()
        assert (params[0] - params[1]).abs().max() > 0
