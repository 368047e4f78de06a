"""Virtual workers (``workers_per_device``): many replicas per process, the same training as one worker per process."""

import csv
import functools

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from pl_lossy import BernoulliNetwork, LossyPSStrategy
from pl_lossy.workers.checkpointing import workers_mean_state_dict
from pl_lossy.experiment.data import SyntheticDataModule
from pl_lossy.experiment.models import MLP, Classifier, ResNet20

from fits import SaveWorkers, digits_model, fit, fit_in_process, in_process


def lossy(network, k=1, **kw):
    return LossyPSStrategy(network=network, workers_per_device=k, start_method="fork", **kw)


def train_workers(tmp_path, processes, k, model_dm=None, network=None, **fit_kw):
    """Fits and returns every worker's final parameters [W, numel] and buffers, in worker order."""
    model, dm = model_dm or digits_model(momentum=0.9)
    saver = SaveWorkers(tmp_path)
    fit_kw.setdefault("limit_train_batches", 6)
    strategy_kw = fit_kw.pop("strategy_kw", {})
    fit(lossy(network or BernoulliNetwork(0.2, seed=3), k, **strategy_kw), model, dm, devices=processes,
        callbacks=[saver, *fit_kw.pop("callbacks", [])], **fit_kw)
    return saver.load(processes)


def small_resnet():
    pl.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(n_samples=256, input_shape=(3, 8, 8), batch_size=8)
    return Classifier(functools.partial(ResNet20, width=4), dm.input_shape, dm.num_classes, momentum=0.9), dm


def test_four_workers_laid_out_as_4x1_2x2_1x4_train_the_same_replicas(tmp_path):
    runs = {}
    for processes, k in ((4, 1), (2, 2), (1, 4)):
        (tmp_path / f"{processes}x{k}").mkdir()
        runs[processes, k], _ = train_workers(tmp_path / f"{processes}x{k}", processes, k, max_epochs=2, limit_train_batches=4)
    reference = runs[4, 1]
    assert reference.shape[0] == 4
    assert (reference[0] - reference[1]).abs().max() > 1e-3  # drops made the replicas differ
    for layout, params in runs.items():
        torch.testing.assert_close(params, reference, rtol=0, atol=1e-6, msg=f"{layout} differs from 4x1")


def test_a_process_batch_is_its_workers_batches_as_their_own_processes_would_draw_them():
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader, DistributedSampler

    from pl_lossy.workers.sharding import shard_dataloader

    data = list(range(103))
    for epoch in (0, 1, 2):
        expected = []
        for w in range(6):
            sampler = DistributedSampler(data, num_replicas=6, rank=w, shuffle=True, seed=7)
            sampler.set_epoch(epoch)
            expected.append([list(b) for b in DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)])
        for rank in range(3):
            plain = DataLoader(data, batch_size=4, drop_last=True, sampler=DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=7))
            sharded = shard_dataloader(plain, n_workers=6, rank=rank, workers_per_process=2)
            _set_sampler_epoch(sharded, epoch)  # as Lightning does at every epoch start
            batches = [b.tolist() for b in sharded]
            assert len(batches) == len(expected[0])
            for step, batch in enumerate(batches):
                assert batch == expected[2 * rank][step] + expected[2 * rank + 1][step]


def test_vmap_and_loop_train_the_same_replicas_and_batchnorm_statistics(tmp_path):
    out = {}
    for batching in ("vmap", "loop"):
        (tmp_path / batching).mkdir()
        out[batching] = train_workers(tmp_path / batching, 1, 3, small_resnet(), limit_train_batches=4,
                                      strategy_kw=dict(batching=batching, sync_buffers="none"))
    (pv, bv), (pl_, bl) = out["vmap"], out["loop"]
    torch.testing.assert_close(pv, pl_, rtol=0, atol=2e-5)
    assert (pv[0] - pv[1]).abs().max() > 1e-3
    for name in bv:
        torch.testing.assert_close(bv[name].float(), bl[name].float(), rtol=0, atol=2e-5)
    running = [n for n in bv if n.endswith("running_mean")]
    assert running and any((bv[n][0] - bv[n][1]).abs().max() > 0 for n in running)  # each worker its own statistics


def test_auto_batching_falls_back_to_the_loop_for_a_step_vmap_cannot_batch(tmp_path, caplog):
    class ItemInStep(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if loss.item() > 1e9:  # data-dependent Python: vmap cannot batch it
                raise RuntimeError("unreachable")
            return loss

    _, dm = digits_model()
    model = ItemInStep(functools.partial(MLP, hidden=(64,)), dm.input_shape, dm.num_classes)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1), workers_per_device=2, start_method="popen")
    fit_in_process(strategy, model, dm, max_steps=3, limit_val_batches=0)
    assert strategy.steps.mode == "loop"
    assert any("could not batch it" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("algorithm, clip", [("norm", 0.05), ("value", 0.002)])
def test_gradient_clipping_is_per_worker(tmp_path, algorithm, clip):
    runs = {}
    for processes, k in ((2, 1), (1, 2)):
        (tmp_path / f"{processes}x{k}").mkdir()
        runs[processes, k], _ = train_workers(tmp_path / f"{processes}x{k}", processes, k,
                                              gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    torch.testing.assert_close(runs[1, 2], runs[2, 1], rtol=0, atol=1e-6)
    (tmp_path / "free").mkdir()
    unclipped, _ = train_workers(tmp_path / "free", 1, 2)
    assert (unclipped - runs[1, 2]).abs().max() > 1e-4  # the clip bit


@pytest.mark.parametrize("optimizer", ["adam", "sgd_nesterov"])
def test_elementwise_optimizers_step_every_worker_as_its_own_process_would(tmp_path, optimizer):
    def model_dm():
        pl.seed_everything(0, verbose=False)
        model, dm = digits_model()
        if optimizer == "adam":
            model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        else:
            model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        return model, dm

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, _ = train_workers(tmp_path / "a", 2, 1, model_dm())
    b, _ = train_workers(tmp_path / "b", 1, 2, model_dm())
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_an_optimizer_that_couples_elements_is_refused_with_one_line():
    model, dm = digits_model()
    model.configure_optimizers = lambda: torch.optim.LBFGS(model.parameters())
    with pytest.raises(Exception, match="elementwise optimizers .* LBFGS is not known to be one"):
        fit(lossy(BernoulliNetwork(0.1), 2), model, dm, devices=1, limit_train_batches=2)


def test_manual_optimization_with_several_workers_per_process_is_refused():
    from test_lightning_features import TwoStepManual

    _, dm = digits_model()
    with pytest.raises(Exception, match="workers_per_device > 1 needs automatic optimization"):
        fit(lossy(BernoulliNetwork(0.1), 2), TwoStepManual(), dm, devices=1, limit_train_batches=2)


@pytest.mark.parametrize("mode, equal", [("broadcast", True), ("average", True), ("none", False)])
def test_batchnorm_buffers_of_virtual_workers_follow_sync_buffers(tmp_path, mode, equal):
    _, buffers = train_workers(tmp_path, 2, 2, small_resnet(), limit_train_batches=3, strategy_kw=dict(sync_buffers=mode))
    stats = [b for name, b in buffers.items() if name.endswith("running_mean")]
    same = all(torch.equal(b[0], b[w]) for b in stats for w in range(1, 4))
    assert same == equal


def test_bf16_mixed_batchnorm_workers_train_batched():
    model, dm = small_resnet()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=3), workers_per_device=2, start_method="popen")
    fit_in_process(strategy, model, dm, precision="bf16-mixed", max_steps=2, limit_val_batches=0)
    params = strategy.replicas.worker_state(model)["params"]
    assert strategy.steps.mode == "vmap"  # BatchNorm under autocast batched (it runs in fp32 inside the vmap)
    assert torch.isfinite(params).all() and (params[0] - params[1]).abs().max() > 0


@pytest.mark.parametrize("processes, k", [(2, 1), (1, 2)])
def test_resume_under_drops_equals_the_uninterrupted_fit(tmp_path, processes, k):
    net = lambda: BernoulliNetwork(0.3, seed=4)  # noqa: E731
    kw = dict(limit_train_batches=5, limit_val_batches=2)
    (tmp_path / "full").mkdir(), (tmp_path / "resumed").mkdir()
    full, full_buffers = train_workers(tmp_path / "full", processes, k, network=net(), max_epochs=2, **kw)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, dm = digits_model(momentum=0.9)
    fit(lossy(net(), k), model, dm, devices=processes, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True, **kw)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["lossy_ps"]["workers"]["params"].shape[0] == processes * k
    model, dm = digits_model(momentum=0.9)
    saver = SaveWorkers(tmp_path / "resumed")
    fit(lossy(net(), k), model, dm, devices=processes, max_epochs=2, callbacks=[saver], ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **kw)
    resumed, _ = saver.load(processes)
    assert (full[0] - full[1]).abs().max() > 1e-3  # replicas differ under drops: rank 0's alone would not do
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)


def test_a_checkpoint_of_4x1_resumes_as_1x4(tmp_path):
    kw = dict(limit_train_batches=4, limit_val_batches=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, dm = digits_model(momentum=0.9)
    fit(lossy(BernoulliNetwork(0.3, seed=4), 1), model, dm, devices=4, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True, **kw)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, _ = train_workers(tmp_path / "a", 4, 1, network=BernoulliNetwork(0.3, seed=4), max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **kw)
    b, _ = train_workers(tmp_path / "b", 1, 4, network=BernoulliNetwork(0.3, seed=4), max_epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    mean = workers_mean_state_dict(saved)
    workers = saved["lossy_ps"]["workers"]
    first = workers["param_names"][0]
    n = saved["state_dict"][first].numel()
    torch.testing.assert_close(mean[first].reshape(-1), workers["params"][:, :n].mean(0))
    torch.testing.assert_close(saved["state_dict"][first].reshape(-1), workers["params"][0, :n])  # Lightning's: worker 0


def test_every_round_reaches_the_logger_whatever_log_every_n_steps_says(tmp_path):
    model, dm = digits_model()
    fit(lossy(BernoulliNetwork(0.1), 2), model, dm, devices=1, limit_train_batches=20, logger=CSVLogger(tmp_path, name="m"),
        log_every_n_steps=10)
    rows = list(csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")))
    rounds = sorted(int(float(r["net/round"])) for r in rows if r.get("net/round"))
    assert rounds == list(range(20))


def test_every_round_of_manual_optimization_reaches_the_logger(tmp_path):
    from test_lightning_features import TwoStepManual

    _, dm = digits_model()
    fit(lossy(BernoulliNetwork(0.1)), TwoStepManual(), dm, limit_train_batches=4, limit_val_batches=0,
        logger=CSVLogger(tmp_path, name="m"), log_every_n_steps=50)
    rows = list(csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")))
    assert sorted(int(float(r["net/round"])) for r in rows if r.get("net/round")) == list(range(8))


def test_validate_with_a_checkpoint_then_fit_starts_at_round_zero(tmp_path):
    """State loaded outside fit must not leak into a later fit (one process: nothing hides it)."""
    model, dm = digits_model()
    fit_in_process(LossyPSStrategy(network=BernoulliNetwork(0.2), start_method="popen"), model, dm, max_steps=20,
                   enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.2), start_method="popen")
    second = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with in_process():
        second.validate(model, dm, ckpt_path=str(tmp_path / "last.ckpt"))
        assert strategy.clock.rounds == 0
        second.fit(model, dm)
    assert second.global_step == 5 and strategy.clock.rounds == 5


def test_validate_after_fit_evaluates_every_worker_its_own_replica(tmp_path):
    model, dm = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(1.0), workers_per_device=2, start_method="popen")
    trainer = fit_in_process(strategy, model, dm, max_steps=10)
    before = strategy.replicas.worker_state(model)["params"]
    assert (before[0] - before[1]).abs().max() > 0  # drop rate 1: the workers trained apart
    with in_process():
        trainer.validate(model, dm)
    after = strategy.replicas.worker_state(model)["params"]
    assert torch.equal(before, after)


def test_cuda_graph_batching_on_the_cpu_is_refused_in_one_line():
    model, dm = digits_model()
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1), workers_per_device=2, batching="cuda_graph", start_method="popen")
    with pytest.raises(ValueError, match="batching='cuda_graph' records CUDA graphs and needs a GPU, but the workers are on cpu"):
        fit_in_process(strategy, model, dm, max_steps=1)


def _one_process_workers(accelerator, batching, k=4):
    """Every worker's parameters after a short in-process fit of ``k`` workers on one device."""
    model, dm = digits_model(momentum=0.9)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=3), workers_per_device=k, batching=batching, start_method="popen",
                               compute_time_s=0.0)
    fit_in_process(strategy, model, dm, accelerator, max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    return strategy.replicas.worker_state(model)["params"]


if torch.cuda.is_available():  # collected only where there is a GPU (run them there: pytest -k cuda)

    @pytest.mark.parametrize("batching", ["vmap", "loop"])
    def test_cuda_workers_train_the_replicas_cpu_workers_train(batching):
        """1 x 4 workers on the GPU end where 1 x 4 on the CPU end (which equals 4 x 1, tested above)."""
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        cpu = _one_process_workers("cpu", batching)
        gpu = _one_process_workers("gpu", batching)
        assert (cpu[0] - cpu[1]).abs().max() > 1e-3
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)

    @pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
    def test_cuda_mixed_precision_batchnorm_workers_train_batched(precision):
        model, dm = small_resnet()
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.1), workers_per_device=4, start_method="popen", compute_time_s=0.0)
        fit_in_process(strategy, model, dm, "gpu", precision=precision, max_steps=6, limit_val_batches=2)
        params = strategy.replicas.worker_state(model)["params"]
        assert strategy.steps.mode == "vmap" and torch.isfinite(params).all()
        assert (params[0] - params[1]).abs().max() > 0

    def _resnet_workers_on_gpu(batching, precision="32-true", steps=6, logger=False):
        model, dm = small_resnet()
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=1), workers_per_device=4, batching=batching, start_method="popen",
                                   compute_time_s=0.0)
        fit_in_process(strategy, model, dm, "gpu", precision=precision, max_steps=steps, limit_val_batches=0, logger=logger,
                       log_every_n_steps=1)
        state = strategy.replicas.worker_state(model)
        return strategy, state["params"], state["buffers"]

    @pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
    def test_cuda_graph_replays_train_the_replicas_eager_vmap_trains(precision):
        """Recorded once, replayed every step: the same parameters and BatchNorm statistics as eager vmap (warm-up runs
        leave no trace), and the mode is reported."""
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        _, params, buffers = _resnet_workers_on_gpu("vmap", precision)
        strategy, graphed, graphed_buffers = _resnet_workers_on_gpu("cuda_graph", precision)
        assert strategy.steps.mode == "cuda_graph" and strategy.steps.graph_captures == 1
        assert (params[0] - params[1]).abs().max() > 1e-4
        tol = 1e-4 if precision == "32-true" else 2e-2
        torch.testing.assert_close(graphed, params, rtol=0, atol=tol)
        for name, b in buffers.items():
            torch.testing.assert_close(graphed_buffers[name].float(), b.float(), rtol=0, atol=tol)

    def test_cuda_graph_logs_every_steps_own_loss(tmp_path):
        strategy, _, _ = _resnet_workers_on_gpu("cuda_graph", logger=CSVLogger(tmp_path, name="m"))
        assert strategy.steps.mode == "cuda_graph"
        rows = list(csv.DictReader(open(tmp_path / "m" / "version_0" / "metrics.csv")))
        losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
        assert len(losses) == 6 and len(set(losses)) == 6  # replays log their own values, not the capture's

    def test_cuda_mask_agreement_is_checked_one_round_later_without_waiting():
        from pl_lossy.round.masks import MaskAgreement

        check = MaskAgreement()
        check.submit(4, torch.tensor([3.0, 9.0], device="cuda"), 3.0)  # queued, not read yet
        with pytest.raises(RuntimeError, match="round 4: the processes applied different masks"):
            check.flush()

    def test_cuda_exchange_of_several_workers_matches_rps_round():
        import numpy as np

        from pl_lossy.round import rps
        from pl_lossy.round.exchange import SIDE_FIELDS, RPSExchange

        W, S = 5, 3
        layout = rps.PacketLayout.for_model(1001, S, packet_bytes=64)
        torch.manual_seed(0)
        storage = torch.randn(W * layout.padded_numel + SIDE_FIELDS, device="cuda")
        exchange = RPSExchange(storage, layout, 0, 1, W)
        reference = exchange.blocks().double().cpu()
        rng = np.random.default_rng(0)
        for _ in range(3):
            up = torch.from_numpy(rng.random((W, S, layout.packets_per_block)) >= 0.2)
            down = torch.from_numpy(rng.random((S, W, layout.packets_per_block)) >= 0.2)
            up[range(S), range(S)] = down[range(S), range(S)] = True
            exchange.step(up, down, lambda t: None)
            reference, _ = rps.rps_round(reference, up, down)
        torch.testing.assert_close(exchange.blocks().double().cpu(), reference, rtol=1e-6, atol=1e-6)


def test_two_nodes_on_loopback_train_the_replicas_one_node_trains(tmp_path):
    """num_nodes=2 (one process of 2 workers per node, each node started as Lightning expects) equals one node of 2 x 2."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "nodes").mkdir(), (tmp_path / "one").mkdir()
    script = Path(__file__).parent / "node_fit.py"
    launched = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launched and not k.startswith(("PL_", "TORCHELASTIC"))}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    nodes = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "nodes"), "2", "1", "2"], env={**env, "NODE_RANK": str(n)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:  # a hung node must not outlive the test
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    two_nodes, _ = SaveWorkers(tmp_path / "nodes").load(2)
    one_node, _ = train_workers(tmp_path / "one", 2, 2, max_epochs=2, limit_train_batches=4, limit_val_batches=1)
    assert two_nodes.shape[0] == 4 and (two_nodes[0] - two_nodes[2]).abs().max() > 1e-3
    torch.testing.assert_close(two_nodes, one_node, rtol=0, atol=1e-6)
