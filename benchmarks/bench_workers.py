"""Virtual workers against plain training: step time and samples/s, side by side in one run.

    python benchmarks/bench_workers.py                              # CPU: digits MLP, 16 workers x 32
    python benchmarks/bench_workers.py --model resnet20 --device cuda --precision 32-true bf16-mixed
    python benchmarks/bench_workers.py --model gpt-tiny --batch 4 --no-loop   # the transformer (gpt-small, gpt2 on a GPU)

For one model on one device, each configuration runs short fits (one process, in-process launcher),
interleaved and repeated ``--repeats`` times (shared GPUs drift by tens of percent between minutes),
and the median optimizer-step time after warm-up over all repeats is reported:

- ``plain k*b``: Lightning's default single-device training of one model at batch ``k x b``;
- ``plain b``: the same at the per-worker batch ``b`` (``k x`` its time is what a loop of k steps costs);
- ``lossy k x b vmap`` / ``graph`` / ``loop``: ``LossyPSStrategy(workers_per_device=k, batching=...)`` (``graph``:
  ``cuda_graph``, on CUDA only) over a 1% Bernoulli network
  (every worker its own replica and shard of ``b`` rows, one RPS round per step; compute time fixed,
  so rounds read nothing back from the device);
- ``plain``, Lightning's ``DDPStrategy`` in one process, and ``lossy 1 x b`` at ``--single-batch``:
  the per-round cost with one worker (lossy_ps is a DDPStrategy that does not wrap the model).

It prints, per precision: the vmap path's samples/s as a fraction of plain training at batch ``k x b``
(target on a GPU: >= 0.7 for 16 ResNet-20 workers x 32), the loop's time against ``k`` plain steps of
one shard (target: <= 1.15), and one worker's step time against plain training (target: <= 1.05).
On CUDA, TF32 is off (``torch.backends.cuda.matmul.allow_tf32 = False``) and the GPU is synchronized
around each timed step.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from pytorch_lightning.strategies import DDPStrategy

from pl_lossy import BernoulliNetwork, LossyPSStrategy
from pl_lossy.experiment.gpt import LanguageModel
from pl_lossy.experiment.models import MLP, Classifier, ResNet20


class StepTimer(pl.Callback):
    def __init__(self, cuda: bool) -> None:
        self.cuda, self.times, self._t0 = cuda, [], 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_train_batch_start(self, *args) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


GPT_SIZES = {"gpt-tiny": "tiny", "gpt-small": "small", "gpt2": "gpt2"}  # --model: pl_lossy.experiment.gpt's sizes


def make_model(name: str) -> tuple[pl.LightningModule, tuple[int, ...]]:
    """The module and one example's input shape; a GPT's examples are ``context`` bytes."""
    if name in GPT_SIZES:
        model = LanguageModel(size=GPT_SIZES[name], warmup_steps=0)
        model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-4)  # no schedule: steps of equal work
        return model, (model.context,)
    if name == "mlp":
        shape = (1, 8, 8)
        return Classifier(functools.partial(MLP, hidden=(128,)), shape, 10, lr=0.05), shape
    shape = (3, 32, 32)
    return Classifier(functools.partial(ResNet20), shape, 10, lr=0.05, momentum=0.9), shape


def examples(name: str, shape: tuple[int, ...], *batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs and targets of ``batch`` examples: images and 10 classes, or bytes and their next bytes."""
    if name in GPT_SIZES:
        x = torch.randint(0, 256, (*batch, *shape), device=device)
        return x, torch.randint(0, 256, (*batch, *shape), device=device)
    return torch.randn(*batch, *shape, device=device), torch.randint(0, 10, batch, device=device)


def parameter_count(name: str) -> int:
    with torch.device("meta") if name in GPT_SIZES else contextlib.nullcontext():  # GPT-2's shape without its memory
        return sum(p.numel() for p in make_model(name)[0].parameters())


def packets_a_round(name: str, workers: int, packet_bytes: int = 1400) -> int:
    """Packets every round carries for ``workers`` RPS workers with co-located servers (both phases)."""
    from pl_lossy.round.rps import PacketLayout

    layout = PacketLayout.for_model(parameter_count(name), workers, packet_bytes)
    return 2 * workers * (workers - 1) * layout.packets_per_block


def step_times(args, precision: str, batch: int, steps: int, k: int = 0, batching: str = "vmap") -> list[float]:
    """Step times (s) after warm-up of plain training at ``batch`` (k = 0), of Lightning's DDP in one
    process (``batching="ddp"``), or of ``k`` lossy_ps workers of ``batch`` rows each."""
    pl.seed_everything(0, verbose=False)
    model, shape = make_model(args.model)
    rows = batch * max(k, 1)
    n = rows * steps
    data = TensorDataset(*examples(args.model, shape, n))
    loader = DataLoader(data, batch_size=batch if k else rows, shuffle=False, drop_last=True)
    timer = StepTimer(args.device == "cuda")
    strategy = DDPStrategy(start_method="popen") if batching == "ddp" else "auto"
    if k:
        strategy = LossyPSStrategy(network=BernoulliNetwork(0.01, seed=0), workers_per_device=k, batching=batching,
                                   compute_time_s=0.0, divergence_every=0, start_method="popen", log_metrics=False)
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, strategy=strategy, precision=precision,
                         benchmark=args.cudnn_benchmark or None,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, loader)
    if k > 1 and strategy.steps.mode != batching:
        print(f"note: lossy {k} x {batch} {batching} ran as {strategy.steps.mode}")
    if torch.distributed.is_initialized():  # every configuration starts from the same state
        torch.distributed.destroy_process_group()
    return timer.times[args.warmup :]


def raw_step_times(args, k: int, b: int, steps: int, precision: str) -> dict[str, list[float]]:
    """Without Lightning or pl_lossy: one model at batch ``k x b`` (``plain``), and ``k`` stacked replicas
    trained by ``torch.func.vmap(functional_call)`` (the model-ensembling recipe, BatchNorm buffers
    stacked; ``vmap``), each with SGD over all parameters; on CUDA also the vmapped forward and backward
    recorded once in CUDA graphs and replayed (``vmap graph``, :class:`pl_lossy.workers.step_graph.GraphedStep`).
    What vmap itself costs, to compare with the ``lossy vmap`` rows."""
    import copy

    import torch.nn.functional as F
    from torch.func import functional_call, stack_module_state, vmap

    from pl_lossy.workers.steps import _fp32_batchnorm
    from pl_lossy.workers.step_graph import GraphedStep

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    pl.seed_everything(0, verbose=False)
    model, shape = make_model(args.model)
    net = model.net.to(device)
    names = ["plain", "vmap"] + (["vmap graph"] if cuda else [])
    times: dict[str, list[float]] = {name: [] for name in names}
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    params, buffers = stack_module_state([copy.deepcopy(net) for _ in range(k)])
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    base = copy.deepcopy(net)
    vopt = torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False, enabled=precision == "bf16-mixed")

    def loss(p, bufs, x, y):
        with _fp32_batchnorm(base):
            return F.cross_entropy(functional_call(base, (p, bufs), (x,), tie_weights=True).flatten(0, -2), y.flatten())

    batched = vmap(loss, in_dims=(0, 0, 0, 0), randomness="different")
    pn, bn = list(params), list(buffers)

    def flat_step(*flat):
        return batched(dict(zip(pn, flat[: len(pn)])), dict(zip(bn, flat[len(pn) : len(pn) + len(bn)])), *flat[-2:])

    graphed = None
    for step in range(steps):
        x, y = examples(args.model, shape, k, b, device=device)
        for name in names:
            if name == "vmap graph" and graphed is None:
                with autocast:
                    graphed = GraphedStep(flat_step, [*params.values(), *buffers.values(), x, y], persistent=list(buffers.values()))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "plain":
                opt.zero_grad()
                with autocast:
                    out = F.cross_entropy(net(x.view(k * b, *shape)).flatten(0, -2), y.flatten())
                out.backward()
                opt.step()
            else:
                vopt.zero_grad()
                with autocast:
                    out = batched(params, buffers, x, y) if name == "vmap" else graphed([*params.values(), *buffers.values(), x, y])
                out.sum().backward()
                vopt.step()
            if cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "resnet20", *GPT_SIZES), default="mlp")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", nargs="+", default=["32-true"])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="per-worker batch")
    parser.add_argument("--single-batch", type=int, default=128, help="batch of the one-worker overhead check")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--no-loop", action="store_true", help="skip the sequential loop (slow for big k on CPU)")
    parser.add_argument("--only", nargs="+", help="run only these configurations (e.g. 'plain k*b' 'lossy vmap')")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="Trainer(benchmark=True): cuDNN autotunes its algorithms, for every configuration")
    parser.add_argument("--raw", action="store_true", help="also time plain, vmap (and on CUDA graphed vmap) steps without Lightning")
    parser.add_argument("--packets", action="store_true", help="print the packets a round of every model at 2-32 workers, and stop")
    args = parser.parse_args()
    if args.packets:
        counts = (2, 4, 16, 32)
        print("| model | parameters | " + " | ".join(f"W = {w}" for w in counts) + " |\n|---|---|" + "---|" * len(counts))
        for name in ("mlp", "resnet20", *GPT_SIZES):
            print(f"| {name} | {parameter_count(name):,} | " + " | ".join(f"{packets_a_round(name, w):,}" for w in counts) + " |")
        return
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    k, b = args.workers, args.batch
    configs = {
        "plain k*b": (k * b, 0, ""),
        "plain b": (b, 0, ""),
        "lossy vmap": (b, k, "vmap"),
        **({"lossy graph": (b, k, "cuda_graph")} if args.device == "cuda" else {}),
        **({} if args.no_loop else {"lossy loop": (b, k, "loop")}),
        "plain single": (args.single_batch, 0, ""),
        "ddp single": (args.single_batch, 0, "ddp"),
        "lossy 1 worker": (args.single_batch, 1, ""),
    }
    if args.only:
        configs = {name: c for name, c in configs.items() if name in args.only}
    if args.raw:
        for precision in args.precision:
            raw: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, ts in raw_step_times(args, k, b, args.steps, precision).items():
                    raw.setdefault(name, []).extend(ts)
            med = {name: statistics.median(ts) for name, ts in raw.items()}
            print(f"raw {precision} (no Lightning): " + ", ".join(f"{name} {t * 1e3:.2f} ms ({med['plain'] / t:.2f}x)" for name, t in med.items()))
    rows, peak = [], 0
    for precision in args.precision:
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, (batch, workers, batching) in configs.items():
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[name] += step_times(args, precision, batch, args.steps, workers, batching or "vmap")
                if args.device == "cuda" and name == "lossy vmap":
                    peak = max(peak, torch.cuda.max_memory_allocated())
        rows.append((precision, {name: statistics.median(ts) for name, ts in times.items()}))
    if args.only:
        for precision, t in rows:
            print(f"{precision}: " + ", ".join(f"{name} {v * 1e3:.2f} ms" for name, v in t.items()))
        for fast in ("lossy vmap", "lossy graph"):
            if {"plain k*b", fast} <= set(configs):
                print(f"{fast} samples/s vs plain: " + ", ".join(f"{p} {t['plain k*b'] / t[fast]:.2f}x" for p, t in rows))
        return
    memory = f", vmapped workers' peak memory {peak / 2**20 / k:.0f} MiB a worker" if peak else ""
    print(f"\n{packets_a_round(args.model, k):,} packets a round for {k} workers (1400-byte packets, co-located servers){memory}")
    print(f"{args.model} on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{k} workers x batch {b}, median of {args.repeats} x {args.steps - args.warmup} steps, TF32 off, cudnn.benchmark {args.cudnn_benchmark}, torch {torch.__version__}")
    print("| precision | plain k*b | vmap k x b | vmap samples/s vs plain | CUDA-graphed vmap | graphed samples/s vs plain | plain b | loop k x b | loop / (k x plain b) "
          "| plain single | DDP, 1 process | lossy 1 worker | 1 worker / plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for precision, t in rows:
        loop = t.get("lossy loop")
        loop_cols = f"{loop * 1e3:.1f} ms | {loop / (k * t['plain b']):.2f}" if loop else "- | -"
        graph = t.get("lossy graph")
        graph_cols = f"{graph * 1e3:.1f} ms | {t['plain k*b'] / graph:.2f}x" if graph else "- | -"
        print(f"| {precision} | {t['plain k*b'] * 1e3:.1f} ms | {t['lossy vmap'] * 1e3:.1f} ms | {t['plain k*b'] / t['lossy vmap']:.2f}x | {graph_cols} "
              f"| {t['plain b'] * 1e3:.2f} ms | {loop_cols} "
              f"| {t['plain single'] * 1e3:.2f} ms | {t['ddp single'] * 1e3:.2f} ms | {t['lossy 1 worker'] * 1e3:.2f} ms | {t['lossy 1 worker'] / t['plain single']:.2f}x |")

if __name__ == "__main__":
    main()
