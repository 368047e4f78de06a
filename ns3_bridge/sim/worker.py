"""The simulation process: owns one ns-3 and answers the bridge server over a pipe.

It runs as a child of the server so that an ns-3 abort (NS_FATAL_ERROR kills the whole process)
costs a restart, not the server. Messages are tuples between our own two processes:
``("configure", settings)`` -> ``("ok",)``; ``("simulate", shape)`` -> ``("round", SimulatedRound)``;
anything failing -> ``("error", message)``.
"""

from __future__ import annotations

import os
import signal
import traceback
from multiprocessing.connection import Connection

from .config import NetworkConfig


def serve(conn: Connection) -> None:
    from ..lifetime import die_with_parent

    die_with_parent()  # a simulation in progress must not outlive a killed server
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    simulator = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        kind = message[0]
        try:
            if kind == "configure":
                from .simulator import RoundSimulator

                if simulator is not None:
                    simulator.close()
                simulator = RoundSimulator(NetworkConfig.from_dict(message[1]))
                simulator.warm_up()
                conn.send(("ok",))
            elif kind == "simulate":
                if simulator is None:
                    conn.send(("error", "the bridge is not configured: send 'configure' first"))
                else:
                    conn.send(("round", simulator.simulate(message[1])))
            elif kind == "stop":
                return
            else:
                conn.send(("error", f"unknown simulation request {kind!r}"))
        except Exception as exc:  # noqa: BLE001  (reported to the server, which replies with it)
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            conn.send(("error", detail))
