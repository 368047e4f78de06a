"""pl-lossy main job: train data-parallel with RPS over a simulated network.

    python examples/train.py                                   # digits, MLP, 2 workers, 1% drops
    python examples/train.py network.loss_rate=0.1 trainer.devices=4
    python examples/train.py -m network.loss_rate=0,0.05,0.1 trainer.devices=2,4
"""

import sys
from pathlib import Path

import hydra

import pl_lossy.experiment.app

CONF = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    pl_lossy.experiment.app.main(cfg)


if __name__ == "__main__":
    pl_lossy.experiment.app.check_command_line(sys.argv[1:], CONF)  # an unknown group option: one line, exit 2
    main()
