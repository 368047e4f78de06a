"""Why did TCP flows take tens of seconds at 1% loss? One TCP round under ns-3's defaults, then with
one setting changed at a time, printing each phase's time and the slowest flow.

    python benchmarks/tcp_under_loss.py                 # 4 workers, 1,000 packets a block, 1% loss, 3 rounds
    python benchmarks/tcp_under_loss.py --loss-rate 0.02 --rounds 5

"ns-3 defaults" means what ns-3 3.44 ships: MinRto 1 s, ConnTimeout 3 s, DelAckCount 2 with a
200 ms DelAckTimeout, timestamps on, SACK on, TcpCubic. pl-lossy's own settings are the last row.
"""

from __future__ import annotations

import argparse

import numpy as np

from ns3_bridge.sim.config import NetworkConfig
from ns3_bridge.sim.round import RoundShape
from ns3_bridge.sim.simulator import RoundSimulator

NS3_DEFAULTS = {
    "ns3::TcpSocketBase::MinRto": ("time", 1.0),
    "ns3::TcpSocket::ConnTimeout": ("time", 3.0),
    "ns3::TcpSocket::DelAckCount": ("uint", 2),
    "ns3::TcpSocketBase::Timestamp": ("bool", True),
    "ns3::TcpSocketBase::Sack": ("bool", True),
}
VARIANTS = [
    ("ns-3 defaults", {}),
    ("SACK off", {"ns3::TcpSocketBase::Sack": ("bool", False)}),
    ("timestamps off", {"ns3::TcpSocketBase::Timestamp": ("bool", False)}),
    ("MinRto 1 ms", {"ns3::TcpSocketBase::MinRto": ("time", 1e-3)}),
    ("ACK every segment", {"ns3::TcpSocket::DelAckCount": ("uint", 1)}),
    ("ConnTimeout 3 ms", {"ns3::TcpSocket::ConnTimeout": ("time", 3e-3)}),
    ("MinRto 1 ms + ConnTimeout 3 ms", {"ns3::TcpSocketBase::MinRto": ("time", 1e-3), "ns3::TcpSocket::ConnTimeout": ("time", 3e-3)}),
    ("... + ACK every segment", {"ns3::TcpSocketBase::MinRto": ("time", 1e-3), "ns3::TcpSocket::ConnTimeout": ("time", 3e-3),
                                 "ns3::TcpSocket::DelAckCount": ("uint", 1)}),
    ("... + timestamps off", {"ns3::TcpSocketBase::MinRto": ("time", 1e-3), "ns3::TcpSocket::ConnTimeout": ("time", 3e-3),
                              "ns3::TcpSocketBase::Timestamp": ("bool", False)}),
]


class TunedSimulator(RoundSimulator):
    """A RoundSimulator whose TCP defaults are replaced by ``overrides`` (None: pl-lossy's own)."""

    overrides: dict | None = None

    def _tcp_defaults(self) -> None:
        super()._tcp_defaults()
        if self.overrides is None:
            return
        ns = self.ns
        for name, (kind, value) in {**NS3_DEFAULTS, **self.overrides}.items():
            attr = {"time": lambda v: ns.TimeValue(ns.Seconds(v)), "uint": ns.UintegerValue, "bool": ns.BooleanValue}[kind](value)
            ns.Config.SetDefault(name, attr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--packets-per-block", type=int, default=1000)
    p.add_argument("--loss-rate", type=float, default=0.01)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    W = args.workers
    print(f"{W} workers, {args.packets_per_block} x 1400 B blocks, {args.loss_rate:.0%} loss, 10 Gb/s star; "
          f"phase times over {args.rounds} rounds")
    sim = None
    for label, overrides in VARIANTS + [("pl-lossy settings", None)]:
        TunedSimulator.overrides = overrides
        if sim is not None:
            sim.close()
        sim = TunedSimulator(NetworkConfig(loss_rate=args.loss_rate, seed=1))
        times = []
        for r in range(args.rounds):
            out = sim.simulate(RoundShape(r, W, W, args.packets_per_block, 1400, transport="tcp"))
            assert out.stats["failed_connections"] == 0
            times += [out.up_time_s, out.down_time_s]
        times = np.asarray(times)
        print(f"{label:32} median {np.median(times) * 1e3:9.2f} ms   max {times.max() * 1e3:10.2f} ms")


if __name__ == "__main__":
    main()
