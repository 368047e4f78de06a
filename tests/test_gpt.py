"""The transformer workload: the byte-level GPT, the text corpus, and the strategy's machinery with them."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from pl_lossy import BernoulliNetwork, LossyPSStrategy
from pl_lossy.experiment.data import ByteTextDataModule, split_corpus, stdlib_corpus
from pl_lossy.experiment.gpt import GPT, SIZES, GPTShape, LanguageModel, decay_groups, warmup_cosine

from fits import SaveWorkers, fit, fit_in_process

SHAPE = dict(n_layer=2, n_head=2, d_model=32, context=16)  # a few thousand parameters: seconds a fit


def text_model(seed=0, corpus=None, **kw):
    pl.seed_everything(seed, verbose=False)
    model = LanguageModel(**{**SHAPE, "warmup_steps": 2, "lr": 3e-3, **kw})
    dm = ByteTextDataModule(path=corpus, context=model.context, batch_size=4, val_bytes=512)
    return model, dm


@pytest.fixture
def corpus(tmp_path):
    """A small text folder (sources of this package): fast to read, several files to split."""
    import pl_lossy.experiment as experiment

    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in sorted(Path(experiment.__file__).parent.glob("*.py"))[:10]:
        (folder / f.name).write_bytes(f.read_bytes())
    return str(folder)


def test_the_sizes_have_the_parameter_counts_the_docs_give():
    counts = {}
    for size in SIZES:
        with torch.device("meta"):
            counts[size] = sum(p.numel() for p in GPT(GPTShape.of(size)).parameters())
    assert counts == {"tiny": 1_040_768, "small": 10_844_160, "gpt2": 86_039_040}
    assert GPTShape.of("small", n_layer=2, context=64) == GPTShape(n_layer=2, n_head=6, d_model=384, context=64)


@pytest.mark.parametrize("bad, message", [
    (dict(size="huge"), "size must be one of tiny, small, gpt2"),
    (dict(n_head=3), "n_head (3) must divide d_model (128)"),
    (dict(context=0), "context must be a positive integer"),
])
def test_a_bad_shape_is_one_line_naming_the_key(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LanguageModel(**bad)


def test_the_model_is_causal_and_its_head_is_the_token_embedding():
    torch.manual_seed(0)
    net = GPT(GPTShape(**SHAPE))
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    a, b = net(x), net(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the past does not see the future
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4
    assert net.head.weight is net.token.weight


def test_weight_decay_is_on_matrices_and_the_schedule_warms_up_then_decays():
    net = GPT(GPTShape(**SHAPE))
    decay, keep = decay_groups(net, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and any(p is net.token.weight for p in decay["params"])
    assert any(p is net.position.weight for p in keep["params"])
    assert all(p.dim() == 1 for p in keep["params"] if p is not net.position.weight)
    assert len(decay["params"]) + len(keep["params"]) == len(list(net.parameters()))
    factors = [warmup_cosine(s, 10, 110, 0.1) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[60] == pytest.approx(0.55)
    assert factors[110] == pytest.approx(0.1) and factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_the_standard_library_corpus_is_split_by_file_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_LOSSY_CACHE", str(tmp_path))
    first = ByteTextDataModule()
    cached = list((tmp_path / "text").glob("stdlib-*.npz"))
    assert len(cached) == 1 and not list((tmp_path / "text").glob("*.tmp"))
    files = stdlib_corpus()
    assert len(first.train_bytes) + len(first.validation_bytes) == sum(f.stat().st_size for f in files)
    assert not any(f.name.startswith("_sysconfigdata") for f in files)  # the build's settings differ on every build
    tenth = files[9].read_bytes()  # every tenth file validates, whole
    assert bytes(first.validation_bytes[: len(tenth)]) == tenth
    np.savez(cached[0], train=np.arange(50, dtype=np.uint8), val=np.arange(9, dtype=np.uint8))
    assert len(ByteTextDataModule().train_bytes) == 50  # the cache is read, not the sources
    cached[0].write_bytes(b"PK\x03\x04 damaged")
    again = ByteTextDataModule()  # a damaged copy is read again from the sources, and rewritten
    np.testing.assert_array_equal(again.train_bytes, first.train_bytes)
    assert len(ByteTextDataModule().train_bytes) == len(first.train_bytes)


def test_a_cache_that_cannot_be_written_costs_nothing_but_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("PL_LOSSY_CACHE", str(tmp_path / "file"))  # a cache dir under a file: cannot be made
    dm = ByteTextDataModule()
    assert len(dm.train_bytes) > 1_000_000 and any("not cached" in r.getMessage() for r in caplog.records)


def test_successive_epochs_read_successive_windows_and_an_epoch_never_repeats_one(corpus):
    class At:
        current_epoch = 0

    _, dm = text_model(corpus=corpus)
    dm.epoch_windows = 5
    dm.trainer = At()
    dm.setup("fit")
    first = [dm.train_set[i][0] for i in range(len(dm.train_set))]
    At.current_epoch = 1
    second = [dm.train_set[i][0] for i in range(len(dm.train_set))]
    assert len(first) == 5 and torch.equal(second[0], dm.train_set.data[5 * 16 : 6 * 16].long())
    assert not any(torch.equal(a, b) for a in first for b in second)
    dm.epoch_windows = 10**9  # more than the split: an epoch is the split, each window once
    dm.setup("fit")
    assert len(dm.train_set) == dm.train_set.windows


def test_files_are_split_whole_and_one_file_by_its_last_tenth():
    texts = [bytes([65 + i]) * (i + 1) for i in range(12)]
    train, val = split_corpus(texts)
    assert bytes(val) == texts[9]  # file 10 of 12
    assert len(train) == sum(map(len, texts)) - len(texts[9])
    train, val = split_corpus([b"x" * 95 + b"y" * 5])
    assert bytes(val) == b"x" * 5 + b"y" * 5 and len(train) == 90


def test_windows_are_the_next_bytes_of_their_inputs(corpus):
    _, dm = text_model(corpus=corpus)
    dm.setup("fit")
    x, y = dm.train_set[3]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])
    assert bytes(x.tolist()) == bytes(dm.train_bytes[48:64])


def test_vmap_batches_attention_and_trains_what_the_loop_trains(tmp_path, corpus):
    out = {}
    for batching in ("vmap", "loop"):
        (tmp_path / batching).mkdir()
        model, dm = text_model(corpus=corpus)
        saver = SaveWorkers(tmp_path / batching)
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=3), workers_per_device=3, batching=batching)
        fit_in_process(strategy, model, dm, max_steps=4, limit_val_batches=0, callbacks=[saver], gradient_clip_val=0.5)
        assert strategy.steps.mode == batching
        out[batching], _ = saver.load(1)
    torch.testing.assert_close(out["vmap"], out["loop"], rtol=0, atol=1e-5)
    assert (out["vmap"][0] - out["vmap"][1]).abs().max() > 1e-4  # drops: the replicas differ


def test_virtual_workers_train_what_processes_train(tmp_path, corpus):
    runs = {}
    for processes, k in ((2, 1), (1, 2)):
        (tmp_path / f"{processes}x{k}").mkdir()
        model, dm = text_model(corpus=corpus)
        saver = SaveWorkers(tmp_path / f"{processes}x{k}")
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=5), workers_per_device=k, start_method="fork")
        fit(strategy, model, dm, devices=processes, max_steps=4, limit_val_batches=0, callbacks=[saver], gradient_clip_val=0.5)
        runs[processes, k], _ = saver.load(processes)
    torch.testing.assert_close(runs[1, 2], runs[2, 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["rps", "gradient", "zero_fill", "hadamard"])
def test_every_aggregation_rule_trains_the_transformer_under_drops(corpus, aggregation):
    model, dm = text_model(corpus=corpus)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.1, seed=1), workers_per_device=2, aggregation=aggregation)
    before = model.net.token.weight.detach().clone()
    trainer = fit_in_process(strategy, model, dm, max_steps=12, limit_val_batches=2, val_check_interval=12)
    assert math.isfinite(trainer.callback_metrics["val_bpb"]) and trainer.callback_metrics["val_bpb"] < 8  # below a uniform byte
    assert strategy.clock.rounds == 12 and strategy.clock.delivered_up < 1
    assert not torch.equal(before, model.net.token.weight.detach())


def test_a_failed_worker_with_adamw_one_worker_a_process(tmp_path, corpus):
    # AdamW counts steps: failures freeze whole processes' workers (virtual workers would share the count)
    final = {}
    for failures in (None, [[1, 1, 3]]):
        model, dm = text_model(corpus=corpus)
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.0, seed=1), start_method="fork", worker_failures=failures)
        saver = SaveWorkers(tmp_path)
        fit(strategy, model, dm, devices=2, max_steps=4, limit_val_batches=0, callbacks=[saver])
        final[bool(failures)], _ = saver.load(2)
    assert (final[True] - final[False]).abs().max() > 1e-4  # worker 1's two missing gradients changed the model


def test_a_deadline_no_packet_meets_leaves_every_worker_its_own_model(corpus):
    model, dm = text_model(corpus=corpus)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.0, seed=1), workers_per_device=2, deadline_s=1e-9)
    fit_in_process(strategy, model, dm, max_steps=3, limit_val_batches=0)
    assert strategy.clock.delivered_up == 0 and strategy.clock.delivered_down == 0
    rows = strategy.replicas.rows
    assert (rows[0] - rows[1]).abs().max() > 1e-4  # each trained on its own shard, nothing exchanged


def test_resume_with_tied_weights_equals_the_uninterrupted_fit(tmp_path, corpus):
    from fits import in_process

    def run(epochs, callbacks, ckpt_path=None, **kw):
        model, dm = text_model(corpus=corpus)
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.3, seed=4), workers_per_device=2)
        trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_epochs=epochs, limit_train_batches=3,
                             limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=callbacks, **kw)
        with in_process():
            trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model

    (tmp_path / "full").mkdir(), (tmp_path / "resumed").mkdir()
    full, resumed = SaveWorkers(tmp_path / "full"), SaveWorkers(tmp_path / "resumed")
    run(2, [full, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)])  # the same run's schedule: kept after epoch 0
    first = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    saved = torch.load(first, weights_only=False)
    assert saved["lossy_ps"]["workers"]["tied_names"] == {"net.token.weight": ["net.head.weight"]}
    model = run(2, [resumed], ckpt_path=str(first), enable_checkpointing=False)
    torch.testing.assert_close(resumed.load(1)[0], full.load(1)[0], rtol=0, atol=0)
    assert model.net.head.weight is model.net.token.weight  # still tied after the load


# ---------------------------------------------------------------------------------------------- the app

APP_SHAPE = ["model=gpt", "data=text", "model.n_layer=2", "model.n_head=2", "model.d_model=64", "model.context=64"]


def test_the_transformer_trains_over_ns3_from_the_app_and_its_bits_per_byte_fall(tmp_path):
    from test_app import run_app

    proc = run_app(tmp_path, *APP_SHAPE, "trainer.max_epochs=-1", "trainer.max_steps=60", "trainer.check_val_every_n_epoch=null",
                   "trainer.val_check_interval=20", "data.val_bytes=16384", "model.warmup_steps=10", "model.lr=3e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "network ns-3 UDP over star" in out and "packets a round)" in out
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    bpb = [float(line.split("val_bpb=")[1].split(",")[0]) for line in lines]
    assert len(bpb) == 3 and bpb[0] > bpb[1] > bpb[2] and bpb[-1] < 6, lines  # below 8 bits: it learned bytes' statistics
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bpb"] == pytest.approx(bpb[-1], rel=1e-3) and summary["val_acc"] is None
    assert summary["val_ppl"] == pytest.approx(2 ** summary["val_bpb"], rel=1e-6)
    assert summary["rounds"] == 60 and 0.97 < summary["delivered_up"] < 1  # the default star's 1% loss
    compare = subprocess.run([str(Path(sys.executable).parent / "pl-lossy"), "compare", str(tmp_path / "run"), "--target", str(bpb[1]),
                              "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=120)
    assert compare.returncode == 0, compare.stderr
    with open(tmp_path / "cmp" / "compare.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row[f"time_to_{bpb[1]:g}_s"]) > 0 and float(row["val_bpb"]) == pytest.approx(bpb[-1], rel=1e-3)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "short.txt").write_text("a short text\n" * 20)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / ".hidden").write_text("not read")
    return tmp_path


@pytest.mark.parametrize("overrides, message", [
    (["model=gpt", "data=text", "model.size=huge"], "invalid `model` config: size must be one of tiny, small, gpt2, got 'huge'"),
    (["model=gpt", "data=text", "model.n_head=3"], "invalid `model` config: n_head (3) must divide d_model (128)"),
    (["model=gpt", "data=text", "data.path={files}/empty.txt"], "invalid `data` config: data.path: {files}/empty.txt is empty; give text"),
    (["model=gpt", "data=text", "data.path={files}/blob.bin"], "invalid `data` config: data.path: {files}/blob.bin is binary (it has NUL bytes)"),
    (["model=gpt", "data=text", "data.path={files}/short.txt"], "invalid `data` config: context 128 is longer than the validation data: the validation split has 26 bytes"),
    (["model=gpt"], "invalid `model` config: the model is for language and the data for classification: use data=text"),
    (["data=text"], "invalid `model` config: the model is for classification and the data for language: use model=gpt"),
    (["model=gpt", "data=text", "data.path={files}/none"], "invalid `data` config: data.path: {files}/none has no files"),
    (["model=gpt", "data=text", "data.path={files}/short.txt", "model.context=8", "data.epoch_windows=4"],
     "invalid `data` config: an epoch of 4 windows holds no batch of 16 for each of 2 workers"),
    (["model=gpt", "data=text", "data.val_bytes=100"], "invalid `data` config: context 128 is longer than the validation data: data.val_bytes=100"),
    (["model=gpt", "data=text", "model.betas=[0.9]"], "invalid `model` config: betas must be two numbers in [0, 1)"),
])
def test_bad_transformer_input_is_one_line_before_any_process_starts(files, overrides, message):
    from test_app import run_app

    proc = run_app(files, *(o.format(files=files) for o in overrides))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and message.format(files=files) in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Initializing distributed" not in proc.stdout + proc.stderr
