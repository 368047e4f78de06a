import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bridge(tmp_path_factory):
    """One bridge server (with its ns-3 simulation process) shared by the ns-3 tests."""
    from ns3_fixtures import RunningBridge

    running = RunningBridge(tmp_path_factory.mktemp("bridge"))
    yield running
    running.stop()
