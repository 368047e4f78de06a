"""Adaptive round deadlines, in the spirit of OptiReduce (NSDI'25).

A fixed ``deadline_s`` cuts every phase at the same time. The adaptive rule sets round ``r + 1``'s
deadline from what round ``r`` saw. OptiReduce estimates how long a transfer needs as the elapsed
time divided by the fraction received; read when half of what arrived had arrived (the median
arrival, ``t50``, which the networks report for rounds with a deadline), that is ``t50 / 0.5``. The
phase that needs longer sets the pace, with a margin ``slack``, never above the cap::

    D_0     = cap
    D_{r+1} = min(cap, slack x max(2 t50_up, 2 t50_down))

A straggler that holds every round sends a minority of a phase's packets, so the median ignores it:
the deadline settles near the other workers' time and the straggler's late packets are cut. If most
packets come later (congestion, a slower network), the median follows and the deadline grows, up to
the cap. A phase where nothing arrived reads as "needs the cap".

The deadline is a pure function of earlier rounds' outcomes, so a run stays reproducible; it is part
of the simulated clock's state (saved in checkpoints: a resumed run continues with the same deadline).
"""

from __future__ import annotations

from ..network import RoundOutcome


def next_deadline(outcome: RoundOutcome, cap_s: float, slack: float) -> float:
    """The next round's deadline after ``outcome`` (a round that had a deadline; see the module docstring)."""
    medians = [outcome.stats.get(f"{phase}_t50_s", 0.0) for phase in ("up", "down")]
    if min(medians) <= 0:  # a phase where nothing arrived (or a network that does not say): wait as long as allowed
        return cap_s
    return min(cap_s, slack * 2 * max(medians))
