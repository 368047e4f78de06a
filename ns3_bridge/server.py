"""The ns-3 bridge: ``python -m ns3_bridge.server --endpoint ipc:///tmp/bridge.ipc [--workers K]``.

A ZeroMQ REP socket answers the requests of :mod:`ns3_bridge.protocol`. Rounds are simulated by a
pool of K supervised child processes (:mod:`ns3_bridge.sim.worker`), each with its own ns-3, and
cached by round. Rounds are independent, so the pool simulates several at once and ``prefetch``
queues rounds to simulate ahead of their ``outcome`` request (run-ahead); an ``outcome`` request's
rounds jump the queue. A malformed request gets an error reply and the server keeps serving; a
simulator that dies (an ns-3 abort) is restarted and its round simulated again, once, before the
error is reported. The server exits on ``shutdown``, on SIGINT/SIGTERM, or when the process given by
``--parent-pid`` is gone (on Linux the kernel kills it then, even stopped; see :mod:`ns3_bridge.lifetime`);
its simulation processes die with it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any, Optional

import zmq

from . import protocol
from .keys import CLIENTS, server_keys
from .lifetime import die_with_parent
from .sim.config import NetworkConfig
from .sim.round import SIM_PACKETS_PER_S, RoundShape, packet_budget

_LOCAL_TCP = re.compile(r"tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):\d+$")
MAX_ATTEMPTS = 2  # simulations of one round that may die before the round is reported as failed
_SOURCE_SUFFIXES = (".py", ".hpp", ".h", ".cc")


def simulator_identity(ns3_version: Optional[str] = None) -> str:
    """``"ns3 <version>; sim <hash>"``: what a round's outcome depends on besides its settings and shape.

    The version is ``ns3_version``, else the installed ns3 wheel's (``unknown`` without one: such a
    bridge simulates nothing). The hash covers the simulation sources (Python and C++ engines) of the
    ``ns3_bridge.sim`` THIS process imports, so a bridge reports the engine it runs, not the client's."""
    if ns3_version is None:
        try:
            ns3_version = importlib.metadata.version("ns3")
        except importlib.metadata.PackageNotFoundError:
            ns3_version = "unknown"
    from . import sim

    root = Path(sim.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return f"ns3 {ns3_version}; sim {digest.hexdigest()[:16]}"


class SimulationProcess:
    """One supervised simulation child, driven without blocking: ``send`` then ``receive`` when ready."""

    def __init__(self) -> None:
        self.started = 0
        self.proc = None
        self.conn = None
        self.task: Optional[RoundShape] = None  # the round it is simulating
        self.task_started = 0.0

    def start(self, settings: Optional[dict[str, Any]]) -> None:
        from .sim import worker

        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited sockets or threads
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=worker.serve, args=(child_end,), daemon=True, name="ns3-sim")
        self.proc.start()
        child_end.close()
        self.started += 1
        self.task = None
        if settings is not None:
            self.conn.send(("configure", settings))  # its reply is read before the next task is sent
            self.task = "configure"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.alive else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    @property
    def idle(self) -> bool:
        return self.alive and self.task is None

    def send(self, message: tuple, task) -> None:
        self.conn.send(message)
        self.task = task
        self.task_started = time.monotonic()

    def receive(self) -> tuple:
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            return ("died", "the simulator process closed its pipe")
        return reply

    def wait(self, timeout_s: float) -> tuple:
        """Block until this process answers (used for configure)."""
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.2):
            if not self.alive:
                return ("died", f"the simulator process died (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                self.stop()
                return ("error", f"the simulator did not answer within {timeout_s:g} s")
        return self.receive()

    def stop(self) -> None:
        if self.alive:
            try:
                self.conn.send(("stop",))
                self.proc.join(2)
            except (OSError, BrokenPipeError):
                pass
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(2)
        self.proc = None
        self.task = None


class BridgeServer:
    def __init__(self, workers: int = 1, sim_timeout_s: float = 3600.0, cache_rounds: int = 1024,
                 queue_rounds: int = 256, max_round_packets: Optional[int] = None) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.max_round_packets = packet_budget(sim_timeout_s) if max_round_packets is None else max_round_packets
        self.sims = [SimulationProcess() for _ in range(workers)]
        self.sim_timeout_s = sim_timeout_s
        self.cache_rounds = cache_rounds
        self.queue_rounds = queue_rounds
        self.config: Optional[NetworkConfig] = None
        self.cache: OrderedDict[RoundShape, tuple[dict, list[bytes]]] = OrderedDict()
        self.queue: deque[RoundShape] = deque()
        self.deaths: Counter[RoundShape] = Counter()
        self.failed: dict[RoundShape, str] = {}
        self.waiting: Optional[list[RoundShape]] = None  # the outcome request being answered
        self.stopping = False
        # hashed once, when the bridge starts (the sources it runs), so that a ping stays cheap
        self.identity = simulator_identity()

    # ------------------------------------------------------------------ requests

    def handle(self, parts: list[bytes]) -> Optional[list[bytes]]:
        """A request in; its reply, or None when the reply waits for simulations (see :meth:`pending_reply`)."""
        try:
            header, frames = protocol.decode(parts)
            kind = header["type"]
            if kind == "ping":
                return protocol.encode({
                    "type": "pong",
                    "pid": os.getpid(),
                    "configured": self.config is not None,
                    "workers": len(self.sims),
                    "simulator_pids": [s.pid for s in self.sims],
                    "simulator_restarts": sum(max(0, s.started - 1) for s in self.sims),
                    "queued": len(self.queue),
                    "cached": len(self.cache),
                    "simulator": self.identity,
                })
            if kind == "configure":
                return self._configure(header)
            if kind == "outcome":
                return self._outcome(header)
            if kind == "prefetch":
                return self._prefetch(header)
            if kind == "shutdown":
                self.stopping = True
                return protocol.encode({"type": "ok"})
            raise protocol.ProtocolError(f"unknown request type {kind!r}; expected one of {protocol.REQUESTS}")
        except Exception as exc:  # noqa: BLE001  (every failure becomes an error reply)
            return self._error(exc)

    @staticmethod
    def _error(exc: BaseException | str) -> list[bytes]:
        if isinstance(exc, str):
            message = exc
        elif isinstance(exc, (protocol.ProtocolError, ValueError)):
            message = str(exc)
        else:
            message = f"{type(exc).__name__}: {exc}"
        return protocol.encode({"type": "error", "message": message})

    def _configure(self, header: dict[str, Any]) -> list[bytes]:
        settings = header.get("network")
        if not isinstance(settings, dict):
            raise protocol.ProtocolError("'configure' needs a 'network' object")
        config = NetworkConfig.from_dict(settings)
        if config == self.config and all(s.alive for s in self.sims):
            return protocol.encode({"type": "ok"})
        # rounds of the old settings are of no use: drop them, let running ones finish, and reconfigure
        # the live processes in place (a new process would pay ns-3's import and JIT warm-up again)
        self.queue.clear()
        self.cache.clear()
        self.deaths.clear()
        self.failed.clear()
        self.config = None
        for sim in self.sims:
            if sim.alive and sim.task is not None:
                sim.wait(self.sim_timeout_s)
                sim.task = None
        for sim in self.sims:
            if sim.alive:
                sim.send(("configure", config.to_dict()), "configure")
            else:
                sim.start(config.to_dict())
        for sim in self.sims:
            reply = sim.wait(self.sim_timeout_s)
            sim.task = None
            if reply[0] != "ok":
                for other in self.sims:
                    other.stop()
                raise RuntimeError(f"configuring the simulator failed: {reply[1]}")
        self.config = config
        return protocol.encode({"type": "ok"})

    def _require_config(self) -> None:
        if self.config is None:
            raise protocol.ProtocolError("the bridge is not configured: send 'configure' first")

    def _rounds(self, header: dict[str, Any]) -> list[RoundShape]:
        """The request's rounds, each within this bridge's packet budget (checked before anything is queued)."""
        shapes = protocol.parse_rounds(header)
        for shape in shapes:
            if shape.training_packets > self.max_round_packets:
                raise protocol.ProtocolError(
                    f"round {shape.round} has {shape.training_packets:,} packets, over this bridge's budget of "
                    f"{self.max_round_packets:,} (--max-round-packets; at ~{SIM_PACKETS_PER_S:,} packets/s it would simulate "
                    f"for ~{shape.training_packets / SIM_PACKETS_PER_S:,.0f} s)"
                )
        return shapes

    def _known(self, shape: RoundShape) -> bool:
        return shape in self.cache or shape in self.queue or any(s.task == shape for s in self.sims)

    def _prefetch(self, header: dict[str, Any]) -> list[bytes]:
        self._require_config()
        queued = 0
        for shape in self._rounds(header):
            if len(self.queue) >= self.queue_rounds:
                break
            if not self._known(shape):
                self.queue.append(shape)
                queued += 1
        return protocol.encode({"type": "ok", "queued": queued})

    def _outcome(self, header: dict[str, Any]) -> Optional[list[bytes]]:
        self._require_config()
        shapes = self._rounds(header)
        for shape in reversed(shapes):  # the rounds asked for now go first, in request order
            if shape in self.cache or any(s.task == shape for s in self.sims):
                continue
            if shape in self.queue:
                self.queue.remove(shape)
            self.queue.appendleft(shape)
        self.waiting = shapes
        return self.pending_reply()

    def pending_reply(self) -> Optional[list[bytes]]:
        """The reply to the waiting outcome request once all its rounds are done (or one failed)."""
        if self.waiting is None:
            return None
        for shape in self.waiting:
            if shape in self.failed:
                self.waiting = None
                return self._error(self.failed.pop(shape))
        if not all(shape in self.cache for shape in self.waiting):
            return None
        metas, frames = [], []
        for shape in self.waiting:
            self.cache.move_to_end(shape)
            meta, masks = self.cache[shape]
            metas.append(meta)
            frames.extend(masks)
        self.waiting = None
        return protocol.encode({"type": "outcome", "rounds": metas}, frames)

    # ------------------------------------------------------------------ the pool

    def dispatch(self) -> None:
        for sim in self.sims:
            if not self.queue:
                return
            if sim.idle:  # a dead one is not idle: check() restarts it
                shape = self.queue.popleft()
                sim.send(("simulate", shape), shape)

    def collect(self, sim: SimulationProcess) -> None:
        reply = sim.receive()
        task, sim.task = sim.task, None
        if reply[0] == "died":
            sim.task = task
            self._reap(sim, reply[1])
        elif task == "configure":
            if reply[0] != "ok":
                print(f"ns3_bridge: a restarted simulator failed to configure: {reply[1]}", file=sys.stderr, flush=True)
        elif reply[0] == "round":
            self.cache[task] = protocol.encode_round(reply[1], task.round)
            while len(self.cache) > self.cache_rounds:
                self.cache.popitem(last=False)
        else:
            self.failed[task] = reply[1]

    def _reap(self, sim: SimulationProcess, why: str) -> None:
        task = sim.task
        code = sim.proc.exitcode if sim.proc is not None else None
        sim.stop()
        if isinstance(task, RoundShape):
            self.deaths[task] += 1
            print(f"ns3_bridge: {why} (exit code {code}) while simulating round {task.round}; restarting it",
                  file=sys.stderr, flush=True)
            if self.deaths[task] >= MAX_ATTEMPTS:
                self.failed[task] = f"the simulator died {self.deaths[task]} times while simulating round {task.round} (exit code {code})"
            else:
                self.queue.appendleft(task)
        if self.config is not None:
            sim.start(self.config.to_dict())

    def check(self) -> None:
        """Restart dead simulators (re-queueing their round) and stop ones past the time limit."""
        now = time.monotonic()
        for sim in self.sims:
            if sim.proc is None:
                continue
            if not sim.alive:
                self._reap(sim, "the simulator process died")
            elif isinstance(sim.task, RoundShape) and now - sim.task_started > self.sim_timeout_s:
                task = sim.task
                sim.stop()
                self.failed[task] = f"round {task.round} took longer than {self.sim_timeout_s:g} s to simulate"
                sim.start(self.config.to_dict() if self.config else None)

    def stop(self) -> None:
        for sim in self.sims:
            sim.stop()


def _check_endpoint(endpoint: str, allow_remote: bool, curve_keys: Optional[str]) -> None:
    if endpoint.startswith("ipc://") or _LOCAL_TCP.match(endpoint):
        return
    if not allow_remote:
        raise SystemExit(
            f"error: endpoint {endpoint!r} is neither ipc:// nor loopback tcp://127.0.0.1:PORT; "
            "pass --allow-remote (with --curve-keys) to listen on other addresses"
        )
    if not curve_keys:
        raise SystemExit(
            f"error: a bridge on {endpoint!r} (reachable from other machines) needs --curve-keys DIR: "
            "make them with python -m ns3_bridge.keys DIR"
        )


def _serve_curve(ctx: zmq.Context, sock: zmq.Socket, keys_dir: str):
    """Encrypt with the bridge's key pair and answer only clients whose public key is in ``keys_dir/clients``."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = server_keys(keys_dir)
    clients = os.path.join(keys_dir, CLIENTS)
    if not os.path.isdir(clients):
        raise SystemExit(f"error: no {clients}/ with the public keys of allowed clients (python -m ns3_bridge.keys makes one)")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=clients)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True
    return auth


def serve(server: BridgeServer, sock: zmq.Socket, parent_pid: Optional[int]) -> None:
    while not server.stopping:
        if parent_pid is not None and not _alive(parent_pid):
            print(f"ns3_bridge: parent {parent_pid} is gone; exiting", file=sys.stderr, flush=True)
            return
        poller = zmq.Poller()
        if server.waiting is None:  # REP: the next request only after the current reply
            poller.register(sock, zmq.POLLIN)
        busy = {sim.conn.fileno(): sim for sim in server.sims if sim.alive and sim.task is not None}
        for fd in busy:
            poller.register(fd, zmq.POLLIN)
        events = dict(poller.poll(200))
        for fd, sim in busy.items():
            if fd in events:
                server.collect(sim)
        server.check()
        if sock in events:
            reply = server.handle(sock.recv_multipart())
            if reply is not None:
                sock.send_multipart(reply)
        server.dispatch()
        reply = server.pending_reply()
        if reply is not None:
            sock.send_multipart(reply)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ns3_bridge.server", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", default=f"ipc:///tmp/pl-lossy-bridge-{os.getpid()}.ipc",
                   help="ZeroMQ endpoint to bind (ipc://PATH or tcp://127.0.0.1:PORT)")
    p.add_argument("--workers", type=int, default=1, help="simulation processes (rounds simulated at once)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--sim-timeout-s", type=float, default=3600.0, help="longest a single round may simulate")
    p.add_argument("--cache-rounds", type=int, default=1024, help="outcomes kept for repeated requests")
    p.add_argument("--queue-rounds", type=int, default=256, help="most rounds queued by prefetch")
    p.add_argument("--max-round-packets", type=int, default=None,
                   help=f"refuse rounds of more training packets (default: what --sim-timeout-s allows at ~{SIM_PACKETS_PER_S:,}/s)")
    p.add_argument("--allow-remote", action="store_true", help="allow binding non-loopback tcp addresses (needs --curve-keys)")
    p.add_argument("--curve-keys", default=None, help="folder from python -m ns3_bridge.keys: CURVE encryption and client keys")
    args = p.parse_args(argv)
    _check_endpoint(args.endpoint, args.allow_remote, args.curve_keys)
    if args.workers < 1:
        raise SystemExit(f"error: --workers must be >= 1, got {args.workers}")

    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)  # even stopped or hung, this process goes when the parent does
    server = BridgeServer(args.workers, args.sim_timeout_s, args.cache_rounds, args.queue_rounds, args.max_round_packets)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: setattr(server, "stopping", True))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    auth = None
    try:
        if args.curve_keys:
            auth = _serve_curve(ctx, sock, args.curve_keys)
        sock.bind(args.endpoint)
    except (zmq.ZMQError, OSError, ValueError) as exc:
        if auth is not None:
            auth.stop()
        raise SystemExit(f"error: cannot serve on {args.endpoint}: {exc}") from None
    print(f"ns3_bridge: serving on {args.endpoint} (pid {os.getpid()}, {args.workers} simulation workers)", flush=True)
    try:
        serve(server, sock, args.parent_pid)
    finally:
        server.stop()
        if auth is not None:
            auth.stop()
        sock.close(0)
        ctx.term()
        if args.endpoint.startswith("ipc://") and not args.endpoint.startswith("ipc://@"):  # @: abstract, no file
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
