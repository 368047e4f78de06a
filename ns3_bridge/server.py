"""The ns-3 bridge: ``python -m ns3_bridge.server --endpoint ipc:///tmp/bridge.ipc``.

A ZeroMQ REP socket answers the requests of :mod:`ns3_bridge.protocol`; rounds are simulated by a
supervised child process (:mod:`ns3_bridge.sim.worker`) and cached by round. A malformed request
gets an error reply and the server keeps serving; a simulator that dies (an ns-3 abort) is restarted
and its round simulated again once before the error is reported. The server exits on ``shutdown``,
on SIGINT/SIGTERM, or when the process given by ``--parent-pid`` is gone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import OrderedDict
from typing import Any

import zmq

from . import protocol
from .sim.config import NetworkConfig
from .sim.round import RoundShape, SimulatedRound

_LOCAL_TCP = re.compile(r"tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+$")


class SimulatorDied(RuntimeError):
    pass


class SimulationProcess:
    """One supervised simulation child; restarted (and re-configured) when it dies."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.settings: dict[str, Any] | None = None
        self.restarts = 0  # simulation processes started to replace one that died
        self._started = False
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        from .sim import worker

        if self._started:
            self.restarts += 1
        self._started = True
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited sockets or threads
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(target=worker.serve, args=(child_end,), daemon=True, name="ns3-sim")
        self._proc.start()
        child_end.close()

    def _call(self, message: tuple) -> tuple:
        if self._proc is None or not self._proc.is_alive():
            self._start()
            if self.settings is not None and message[0] != "configure":
                self._call(("configure", self.settings))
        self._conn.send(message)
        deadline = time.monotonic() + self.timeout_s
        while not self._conn.poll(0.2):
            if not self._proc.is_alive():
                code = self._proc.exitcode
                self._proc = None
                raise SimulatorDied(f"the simulator process died (exit code {code})")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the simulator took longer than {self.timeout_s:g} s")
        try:
            return self._conn.recv()
        except EOFError:
            self._proc = None
            raise SimulatorDied("the simulator process closed its pipe") from None

    def configure(self, settings: dict[str, Any]) -> None:
        reply = self._call(("configure", settings))
        if reply[0] != "ok":
            raise RuntimeError(reply[1])
        self.settings = settings

    def simulate(self, shape: RoundShape) -> SimulatedRound:
        for attempt in (1, 2):
            try:
                reply = self._call(("simulate", shape))
                break
            except SimulatorDied as exc:
                print(f"ns3_bridge: {exc} during round {shape.round}; restarting it", file=sys.stderr, flush=True)
                if attempt == 2:
                    raise RuntimeError(f"{exc} twice while simulating round {shape.round}") from None
        if reply[0] != "round":
            raise RuntimeError(reply[1])
        return reply[1]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def stop(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(("stop",))
                self._proc.join(2)
            except (OSError, BrokenPipeError):
                pass
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(2)
        self._proc = None


class BridgeServer:
    def __init__(self, sim_timeout_s: float = 3600.0, cache_rounds: int = 1024) -> None:
        self.sim = SimulationProcess(sim_timeout_s)
        self.config: NetworkConfig | None = None
        self.cache: OrderedDict[RoundShape, tuple[dict, list[bytes]]] = OrderedDict()
        self.cache_rounds = cache_rounds
        self.stopping = False

    def handle(self, parts: list[bytes]) -> list[bytes]:
        """One request in, one reply out; never raises."""
        try:
            header, frames = protocol.decode(parts)
            kind = header["type"]
            if kind == "ping":
                return protocol.encode({"type": "pong", "pid": os.getpid(), "configured": self.config is not None,
                                        "simulator_pid": self.sim.pid, "simulator_restarts": self.sim.restarts})
            if kind == "configure":
                return self._configure(header)
            if kind == "outcome":
                return self._outcome(header)
            if kind == "shutdown":
                self.stopping = True
                return protocol.encode({"type": "ok"})
            raise protocol.ProtocolError(f"unknown request type {kind!r}; expected one of {protocol.REQUESTS}")
        except Exception as exc:  # noqa: BLE001  (every failure becomes an error reply)
            return protocol.encode({"type": "error", "message": f"{type(exc).__name__}: {exc}" if not isinstance(exc, (protocol.ProtocolError, ValueError)) else str(exc)})

    def _configure(self, header: dict[str, Any]) -> list[bytes]:
        settings = header.get("network")
        if not isinstance(settings, dict):
            raise protocol.ProtocolError("'configure' needs a 'network' object")
        config = NetworkConfig.from_dict(settings)
        if config != self.config:
            self.sim.configure(config.to_dict())
            self.config = config
            self.cache.clear()
        return protocol.encode({"type": "ok"})

    def _outcome(self, header: dict[str, Any]) -> list[bytes]:
        if self.config is None:
            raise protocol.ProtocolError("the bridge is not configured: send 'configure' first")
        shapes = protocol.parse_rounds(header)
        metas, frames = [], []
        for shape in shapes:
            if shape not in self.cache:
                self.cache[shape] = protocol.encode_round(self.sim.simulate(shape), shape.round)
                while len(self.cache) > self.cache_rounds:
                    self.cache.popitem(last=False)
            self.cache.move_to_end(shape)
            meta, masks = self.cache[shape]
            metas.append(meta)
            frames.extend(masks)
        return protocol.encode({"type": "outcome", "rounds": metas}, frames)


def _check_endpoint(endpoint: str, allow_remote: bool) -> None:
    if endpoint.startswith("ipc://") or allow_remote or _LOCAL_TCP.match(endpoint):
        return
    raise SystemExit(
        f"error: endpoint {endpoint!r} is neither ipc:// nor loopback tcp://127.0.0.1:PORT; "
        "pass --allow-remote to listen on other addresses"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ns3_bridge.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default=f"ipc:///tmp/pl-lossy-bridge-{os.getpid()}.ipc",
                   help="ZeroMQ endpoint to bind (ipc://PATH or tcp://127.0.0.1:PORT)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--sim-timeout-s", type=float, default=3600.0, help="longest a single round may simulate")
    p.add_argument("--cache-rounds", type=int, default=1024, help="outcomes kept for repeated requests")
    p.add_argument("--allow-remote", action="store_true", help="allow binding non-loopback tcp addresses")
    args = p.parse_args(argv)
    _check_endpoint(args.endpoint, args.allow_remote)

    server = BridgeServer(args.sim_timeout_s, args.cache_rounds)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "stopping", True))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(args.endpoint)
    except zmq.ZMQError as exc:
        raise SystemExit(f"error: cannot bind {args.endpoint}: {exc}") from None
    print(f"ns3_bridge: serving on {args.endpoint} (pid {os.getpid()})", flush=True)
    try:
        while not server.stopping:
            if args.parent_pid is not None and not _alive(args.parent_pid):
                print(f"ns3_bridge: parent {args.parent_pid} is gone; exiting", file=sys.stderr, flush=True)
                break
            if sock.poll(500):
                sock.send_multipart(server.handle(sock.recv_multipart()))
    finally:
        server.sim.stop()
        sock.close(0)
        ctx.term()
        if args.endpoint.startswith("ipc://"):
            try:
                os.unlink(args.endpoint[len("ipc://"):])
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    main()
