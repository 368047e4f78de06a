import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# ns-3 rounds are simulated in every test (a stored round would hide a dead bridge); store tests name their own file
os.environ["PL_LOSSY_STORE"] = "off"

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


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _kept_on_purpose(pid: int) -> bool:
    """A bridge a fixture keeps running (ns3_fixtures.RUNNING), or one of its descendants."""
    from ns3_fixtures import RUNNING

    while pid > 1:
        if pid in RUNNING:
            return True
        pid = _parent(pid)
    return False


def _our_processes() -> dict[int, str]:
    """Live (not zombie) bridge and simulation processes on this machine, but those kept on purpose: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and ("ns3_bridge.server" in cmd or "spawn_main" in cmd) and not _kept_on_purpose(int(entry)):
            found[int(entry)] = cmd
    return found


def _ipc_files() -> set[str]:
    import glob
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pl-lossy-*.ipc")))


@pytest.fixture(autouse=True)
def nothing_left_behind(request):
    """After every test that may start a bridge: no bridge or simulation process and no ipc socket file
    it started remains within a few seconds (issue: hardening)."""
    module = request.node.module.__name__
    if not os.path.isdir("/proc") or not any(word in module for word in ("ns3", "app", "background")):
        yield
        return
    before, files_before = set(_our_processes()), _ipc_files()
    yield
    import time

    deadline = time.monotonic() + 10
    while True:
        left = {pid: cmd for pid, cmd in _our_processes().items() if pid not in before}
        files = _ipc_files() - files_before
        if not left and not files or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for pid in left:  # so that one leak does not cascade into the next tests
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not left and not files, f"left behind: processes {left}, ipc files {sorted(files)}"
