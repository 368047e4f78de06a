"""Processes that die with their parent, even when they are stopped or hung.

A bridge or simulation process watching its parent's pid cannot act while it is stopped (SIGSTOP) or
stuck in a long simulation; on Linux the kernel can do it instead: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``
makes the parent's death SIGKILL the child, which works on a stopped process too. Elsewhere this is a
no-op and the pid watchdog (``--parent-pid``) remains.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> bool:
    """Ask the kernel to SIGKILL this process when its parent exits. Returns False where unsupported.

    If ``expected_parent`` is given and the parent is already another process (it died before this
    call: the child was re-parented), exit now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent is already gone
    return True


def private_ipc_endpoint(name: str) -> str:
    """An ipc endpoint that leaves no file behind: Linux's abstract socket namespace (``ipc://@name``)
    vanishes with the last process that holds it, even one killed with SIGKILL. Elsewhere a file in the temp dir."""
    if sys.platform.startswith("linux"):
        return f"ipc://@{name}"
    import tempfile

    return f"ipc://{tempfile.gettempdir()}/{name}.ipc"
