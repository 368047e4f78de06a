"""The exchange math against a loop-by-loop reference written from the paper's description."""

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pl_lossy.round import rps
from pl_lossy.round.exchange import SIDE_FIELDS, RPSExchange


def reference_round(models, up, down, n_servers, layout, server_state=None):
    """RPS as the paper states it, one worker, server and packet at a time, on flat models.

    Each server j, for each packet p of its block, averages the copies it received; if it received
    none (dedicated servers only) it sends what it sent last time. Each worker replaces packet p of
    block j by the server's value if that packet reached it, else keeps its own.
    """
    W = len(models)
    E, P = layout.elems_per_packet, layout.packets_per_block
    padded = [np.concatenate([m, np.zeros(layout.padded_numel - len(m))]) for m in models]
    new = [m.copy() for m in padded]
    sent_all = np.zeros(layout.padded_numel)
    for j in range(n_servers):
        for p in range(P):
            lo = (j * P + p) * E
            hi = lo + E
            received = [padded[i][lo:hi] for i in range(W) if up[i, j, p]]
            if received:
                sent = sum(received) / len(received)
            else:
                sent = server_state[lo:hi]
            sent_all[lo:hi] = sent
            for i in range(W):
                if down[j, i, p]:
                    new[i][lo:hi] = sent
    return [m[: len(models[0])] for m in new], sent_all


@st.composite
def rounds(draw, colocated=True):
    W = draw(st.integers(1, 5))
    S = draw(st.integers(1, W if colocated else 4))
    numel = draw(st.integers(1, 300))
    packet_bytes = draw(st.sampled_from([4, 8, 20, 64, 400]))
    layout = rps.PacketLayout.for_model(numel, S, packet_bytes)
    P = layout.packets_per_block
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    drop = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    up = rng.random((W, S, P)) >= drop
    down = rng.random((S, W, P)) >= drop
    if colocated:
        up[np.arange(S), np.arange(S)] = True
        down[np.arange(S), np.arange(S)] = True
    models = [rng.standard_normal(numel) for _ in range(W)]
    return models, up, down, layout


def _blocks(models, layout):
    flat = torch.zeros(len(models), layout.padded_numel, dtype=torch.float64)
    for i, m in enumerate(models):
        flat[i, : len(m)] = torch.from_numpy(m)
    return flat.view(len(models), *layout.shape)


@settings(max_examples=200, deadline=None)
@given(rounds(colocated=True))
def test_rps_round_matches_reference_colocated(case):
    models, up, down, layout = case
    expected, _ = reference_round(models, up, down, layout.n_servers, layout)
    new, _ = rps.rps_round(_blocks(models, layout), torch.from_numpy(up), torch.from_numpy(down))
    got = new.reshape(len(models), -1)[:, : layout.numel].numpy()
    np.testing.assert_allclose(got, np.stack(expected), rtol=1e-12, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(rounds(colocated=False), st.integers(0, 2**31))
def test_rps_round_matches_reference_dedicated(case, seed):
    models, up, down, layout = case
    state = np.random.default_rng(seed).standard_normal(layout.padded_numel)
    expected, expected_sent = reference_round(models, up, down, layout.n_servers, layout, server_state=state)
    server_blocks = torch.from_numpy(state).view(layout.shape)
    new, sent = rps.rps_round(_blocks(models, layout), torch.from_numpy(up), torch.from_numpy(down), server_blocks)
    np.testing.assert_allclose(new.reshape(len(models), -1)[:, : layout.numel].numpy(), np.stack(expected), atol=1e-12)
    np.testing.assert_allclose(sent.reshape(-1).numpy(), expected_sent, atol=1e-12)


@given(st.integers(1, 10**7), st.integers(1, 16), st.integers(4, 9000))
def test_layout_holds_the_model_in_equal_packets(numel, n_servers, packet_bytes):
    layout = rps.PacketLayout.for_model(numel, n_servers, packet_bytes)
    assert layout.padded_numel >= numel
    assert layout.padded_numel - numel < n_servers * layout.packets_per_block  # padding below one element a packet
    assert layout.packet_bytes <= packet_bytes
    # no fewer packets would do at this packet size
    assert (layout.packets_per_block - 1) * (packet_bytes // 4) * n_servers < numel or layout.packets_per_block == 1


def test_no_drops_is_the_mean_and_full_drops_change_nothing():
    rng = np.random.default_rng(0)
    layout = rps.PacketLayout.for_model(1000, 3, 64)
    models = [rng.standard_normal(1000) for _ in range(3)]
    blocks = _blocks(models, layout)
    ones_up = torch.ones(3, 3, layout.packets_per_block, dtype=torch.bool)
    new, _ = rps.rps_round(blocks, ones_up, ones_up.clone())
    mean = np.mean(models, axis=0)
    for i in range(3):
        np.testing.assert_allclose(new[i].reshape(-1)[:1000].numpy(), mean, atol=1e-12)
    eye = torch.zeros_like(ones_up)
    eye[range(3), range(3)] = True
    new, _ = rps.rps_round(blocks, eye, eye.clone())
    assert torch.equal(new, blocks)  # bit-identical: each worker keeps exactly its own values


def _threaded_all_reduce(n):
    """An in-process all_reduce for n threads (each thread plays one rank)."""
    barrier = threading.Barrier(n)
    slots = [None] * n

    def make(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0].clone()
            for s in slots[1:]:
                total += s
            barrier.wait()
            t.copy_(total)

        return all_reduce

    return [make(r) for r in range(n)]


def _random_masks(rng, W, S, P, colocated, drop=0.3):
    """Masks with ``drop`` of the packets lost; a co-located server's own copies always delivered."""
    up = torch.from_numpy(rng.random((W, S, P)) >= drop)
    down = torch.from_numpy(rng.random((S, W, P)) >= drop)
    if colocated:
        up[range(S), range(S)] = True
        down[range(S), range(S)] = True
    return up, down


def _round_on_threads(exchanges, reducers, up, down, side_value):
    """Every process's ``exchange.step`` at once (one thread each); returns their side values, the
    first field from ``side_value(rank)``, the second ``rank + 10``."""
    sides = [None] * len(exchanges)
    threads = [threading.Thread(target=lambda r=r: sides.__setitem__(r, exchanges[r].step(up, down, reducers[r], (side_value(r), r + 10))))
               for r in range(len(exchanges))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return sides


@pytest.mark.parametrize("colocated", [True, False])
def test_exchange_buffers_match_rps_round(colocated):
    """RPSExchange (flat double buffers, one all_reduce, sparse fix-ups) over 3 rounds equals rps_round."""
    W, S = 3, 2
    torch.manual_seed(0)
    models = [[torch.randn(7, 5), torch.randn(13)] for _ in range(W)]
    exchanges = [RPSExchange.for_params(models[r], r, W, S, packet_bytes=12, colocated_servers=colocated) for r in range(W)]
    layout = exchanges[0].layout
    reducers = _threaded_all_reduce(W)
    reference = torch.stack([ex.blocks()[0].double() for ex in exchanges])
    server_state = None if colocated else reference[0].clone()
    rng = np.random.default_rng(1)
    for rnd in range(3):
        up, down = _random_masks(rng, W, S, layout.packets_per_block, colocated)
        sides = _round_on_threads(exchanges, reducers, up, down, lambda r: float(r + 1))
        reference, server_state = rps.rps_round(reference, up, down, server_state)
        for r in range(W):
            torch.testing.assert_close(exchanges[r].blocks()[0].double(), reference[r], rtol=1e-6, atol=1e-6)
            assert sides[r].tolist() == [[1.0, 2.0, 3.0], [10.0, 11.0, 12.0]]
            # the parameters are views of the exchanged storage
            flat = torch.cat([p.reshape(-1) for p in models[r]])
            assert torch.equal(flat, exchanges[r].blocks().reshape(-1)[: layout.numel])


def test_exchange_rejects_mixed_dtypes_and_too_many_servers():
    with pytest.raises(ValueError, match="one floating-point dtype"):
        RPSExchange.for_params([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], 0, 2, 2)
    with pytest.raises(ValueError, match="co-located"):
        RPSExchange.for_params([torch.zeros(3)], 0, 2, 3)


def _exchanges_over_processes(W, k, S, dtype, colocated=True, seed=0):
    """``W / k`` processes' exchanges of ``k`` workers each, over one random model per worker."""
    torch.manual_seed(seed)
    layout = rps.PacketLayout.for_model(83, S, packet_bytes=16)
    n_proc = W // k
    blocks = torch.randn(W, *layout.shape, dtype=torch.float64)
    blocks.view(W, -1)[:, layout.numel :] = 0  # padding stays zero
    exchanges = []
    for r in range(n_proc):
        storage = torch.zeros(k * layout.padded_numel + SIDE_FIELDS * n_proc, dtype=dtype)
        storage[: k * layout.padded_numel] = blocks[r * k : (r + 1) * k].reshape(-1).to(dtype)
        exchanges.append(RPSExchange(storage, layout, r, n_proc, k, colocated))
    return layout, exchanges


@pytest.mark.parametrize("n_proc, k, colocated", [(1, 4, True), (2, 2, True), (2, 3, False)])
def test_exchange_of_several_workers_per_process_matches_rps_round(n_proc, k, colocated):
    W, S = n_proc * k, 3
    layout, exchanges = _exchanges_over_processes(W, k, S, torch.float32, colocated)
    reference = torch.cat([ex.blocks().double() for ex in exchanges])
    server_state = None if colocated else reference[0].clone()
    reducers = _threaded_all_reduce(n_proc)
    rng = np.random.default_rng(2)
    for _ in range(3):
        up, down = _random_masks(rng, W, S, layout.packets_per_block, colocated)
        sides = _round_on_threads(exchanges, reducers, up, down, lambda r: r + 0.5)
        reference, server_state = rps.rps_round(reference, up, down, server_state)
        got = torch.cat([ex.blocks().double() for ex in exchanges])
        torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
        assert sides[0].tolist() == [[r + 0.5 for r in range(n_proc)], [r + 10.0 for r in range(n_proc)]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_proc, k", [(1, 3), (3, 1)])
def test_averaging_identical_low_precision_replicas_leaves_them_unchanged(dtype, n_proc, k):
    """Packets carry fp32: weights, sums and averages are fp32 whatever the parameters' dtype."""
    W, S = n_proc * k, 3
    layout, exchanges = _exchanges_over_processes(W, k, S, dtype)
    same = exchanges[0].blocks()[0].clone()
    for ex in exchanges:
        ex.blocks().copy_(same.expand_as(ex.blocks()))
    reducers = _threaded_all_reduce(n_proc)
    up = torch.ones(W, S, layout.packets_per_block, dtype=torch.bool)
    up[W - 1, 0, 0] = False  # servers average over 2 and 3 copies
    down = torch.ones(S, W, layout.packets_per_block, dtype=torch.bool)
    sides = _round_on_threads(exchanges, reducers, up, down, lambda r: 1.2345678)
    for ex in exchanges:
        assert torch.equal(ex.blocks(), same.expand_as(ex.blocks()))
    assert sides[0].dtype == torch.float32 and float(sides[0][0, 0]) == pytest.approx(1.2345678, rel=1e-7)
