"""One node of a multi-node fit, started the way Lightning's environment expects (``NODE_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` in the environment): ``python node_fit.py OUT_DIR NUM_NODES DEVICES K``.
Saves this process's workers' replicas to ``OUT_DIR/workers{global_rank}.pt``."""

import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).parent))
from fits import SaveWorkers, digits_model  # noqa: E402

from pl_lossy import BernoulliNetwork, LossyPSStrategy  # noqa: E402

if __name__ == "__main__":
    out, num_nodes, devices, k = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    model, dm = digits_model(momentum=0.9)
    strategy = LossyPSStrategy(network=BernoulliNetwork(0.2, seed=3), workers_per_device=k, start_method="popen")
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", num_nodes=num_nodes, devices=devices, max_epochs=2, limit_train_batches=4,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[SaveWorkers(out)])
    trainer.fit(model, dm)
    # leave together: a node that exits while the other still talks to it can abort in gloo's teardown
    # ("terminate called without an active exception", seen once in a fresh-clone run)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
