"""The ``pl-lossy`` console script: ``pl-lossy compare ...``, ``pl-lossy store ...`` (training itself is ``examples/train.py``)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {
    "compare": "runs or -m sweeps in one table (markdown, CSV) and one figure",
    "store": "the outcome store of simulated ns-3 rounds: show it, or prune it (--older-than DAYS or --all)",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pl-lossy COMMAND [args]\n\ncommands:")
        print("\n".join(f"  {name:10} {what}" for name, what in COMMANDS.items()))
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if argv[0] == "store":
        from ..network import outcome_store

        return outcome_store.main(argv[1:])
    from . import compare

    return compare.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
