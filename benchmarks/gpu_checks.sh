#!/usr/bin/env bash
# The checks that need a GPU, as one run on the lent GPU machine (see shared/NOTES_GPU.md):
#   run there with the wheels it lacks carried in .gpu_wheels/ (pyzmq, hydra-core, omegaconf, antlr4):
#   bash benchmarks/gpu_checks.sh
# It runs the CUDA tests, one app fit of 16 virtual workers (CUDA-graphed), and bench_workers.py (ResNet-20, fp32 and bf16).
set -u
pip install -q --no-index --no-deps --target /tmp/site .gpu_wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD OPENBLAS_NUM_THREADS=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
echo "== CUDA tests"
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_virtual_workers.py tests/test_aggregation.py tests/test_failures.py -k cuda --tb=short 2>&1 | tail -40
echo "== app: 16 workers on one GPU, CUDA-graphed"
timeout 75 python examples/train.py trainer=gpu trainer.devices=1 strategy.workers_per_device=16 strategy.batching=cuda_graph strategy.start_method=popen \
  network=bernoulli network.drop_rate=0.1 trainer.max_epochs=10 trainer.enable_progress_bar=false hydra.run.dir=/tmp/app16 2>&1 | grep -E "summary|error|vmap|graph" ; \
  python -c "import json; s=json.load(open('/tmp/app16/summary.json')); print({k: s[k] for k in ('n_workers','workers_per_device','batching','val_acc','steps')})"
echo "== bench_workers (ResNet-20, 16 x 32, with the raw recipe)"
timeout 260 python benchmarks/bench_workers.py --model resnet20 --device cuda --precision 32-true bf16-mixed --steps 15 --warmup 5 --repeats 2 --no-loop --raw 2>&1 | grep -v "Trainer.fit. stopped"
