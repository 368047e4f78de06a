"""What one round is to the simulator: its sizes in, its per-packet outcome out (no ns-3 needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# udp: lossy, paced datagrams (RPS); tcp: the reliable baseline; none: no training traffic on the
# fabric (blocks are delivered outside it at once), to measure the background traffic alone
TRANSPORTS = ("udp", "tcp", "none")

#: Training packets per wall second one simulation process gets through, the slowest measured here
#: (leaf-spine, 32 workers; the star simulates 57-66k/s): what round budgets are sized with.
SIM_PACKETS_PER_S = 40_000


def packet_budget(seconds: float) -> int:
    """The most training packets a round may have to simulate within ``seconds`` at :data:`SIM_PACKETS_PER_S`."""
    return int(seconds * SIM_PACKETS_PER_S)


@dataclass(frozen=True)
class RoundShape:
    """The sizes the simulator needs (the bridge's copy of ``pl_lossy.network.RoundSpec``)."""

    round: int
    n_workers: int
    n_servers: int
    packets_per_block: int
    packet_bytes: int
    colocated_servers: bool = True
    transport: str = "udp"  # one of TRANSPORTS
    deadline_s: float | None = None  # udp: each phase ends at the latest this long after it starts
    start_offsets_ns: tuple[int, ...] | None = None  # when each worker's uplink starts (stragglers), from the phase's start
    down_workers: tuple[int, ...] | None = None  # workers (and their co-located servers) down this round: no flow from or to them

    @property
    def n_hosts(self) -> int:
        return self.n_workers if self.colocated_servers else self.n_workers + self.n_servers

    def server_host(self, j: int) -> int:
        return j if self.colocated_servers else self.n_workers + j

    @property
    def training_packets(self) -> int:
        """Packets of training traffic the round sends (both phases; TCP adds ACKs and retransmissions)."""
        if self.transport == "none":
            return 0
        local = min(self.n_workers, self.n_servers) if self.colocated_servers else 0
        return 2 * (self.n_workers * self.n_servers - local) * self.packets_per_block

    def remote_pairs(self) -> list[tuple[int, int]]:
        """(worker, server) pairs whose traffic crosses the network (none from or to a host that is down)."""
        down = set(self.down_workers or ())
        return [
            (i, j)
            for i in range(self.n_workers)
            for j in range(self.n_servers)
            if not (self.colocated_servers and i == j) and i not in down and not (self.colocated_servers and j in down)
        ]


@dataclass
class SimulatedRound:
    up: np.ndarray  # bool [W, S, P]
    down: np.ndarray  # bool [S, W, P]
    up_time_s: float
    down_time_s: float
    stats: dict[str, float] = field(default_factory=dict)


def fail_outcome(up: np.ndarray, down: np.ndarray, down_hosts: Sequence[int], colocated_servers: bool) -> None:
    """Apply a round's failures to its masks in place: worker ``d`` down loses ``up[d, :, :]`` (it sends
    nothing) and ``down[:, d, :]`` (it receives nothing); with co-located servers its server is down too:
    ``up[:, d, :]`` and ``down[d, :, :]``. A co-located pair's own copies (``[d, d]``) never cross the
    network and stay: the down worker keeps its own block, which is its frozen replica's."""
    if not len(down_hosts):
        return
    d = np.asarray(down_hosts)
    up[d] = False
    down[:, d] = False
    if colocated_servers:
        servers = d[d < up.shape[1]]
        up[:, servers] = False
        down[servers] = False
        up[servers, servers] = True
        down[servers, servers] = True
