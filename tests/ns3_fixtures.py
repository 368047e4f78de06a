"""A bridge per test session (the real server, the real ns-3), and helpers to start more."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

from ns3_bridge.client import BridgeClient


#: pids of bridges a test fixture keeps running on purpose (the leak check ignores them and their children)
RUNNING: set[int] = set()


class RunningBridge:
    def __init__(self, tmp_dir, workers=1):
        self.endpoint = f"ipc://{tmp_dir}/bridge-{uuid.uuid4().hex[:8]}.ipc"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ns3_bridge.server", "--endpoint", self.endpoint, "--parent-pid", str(os.getpid()),
             "--workers", str(workers)],
            stdin=subprocess.DEVNULL,
        )
        RUNNING.add(self.process.pid)
        self.client = BridgeClient(self.endpoint, timeout_s=300, alive=lambda: self.process.poll() is None)
        self.client.ping(timeout_s=300)

    def stop(self):
        RUNNING.discard(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)
        self.client.close()


def simulate(bridge, config, shapes):
    bridge.client.configure(config)
    return bridge.client.outcomes(shapes)


def in_order_and_reversed_elsewhere(bridge, tmp_path, config, shapes):
    """The rounds asked in order from the shared bridge, and in reverse from a fresh bridge process."""
    forward = simulate(bridge, config, shapes)
    other = RunningBridge(tmp_path)
    try:
        backward = simulate(other, config, shapes[::-1])[::-1]
    finally:
        other.stop()
    return forward, backward
