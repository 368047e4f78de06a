"""Draws docs/img/round.png, the README's picture of one round: python docs/tools/round_figure.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402


def box(ax, x, y, w, h, text, color):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333333", lw=1.2))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)


def arrow(ax, a, b, text="", color="#333333", style="-|>"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=14, color=color, lw=1.4))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.1, text, ha="center", va="bottom", fontsize=8.5, color=color)


def main() -> Path:
    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 11), ax.set_ylim(0, 4.2), ax.axis("off")
    box(ax, 0.2, 2.6, 2.3, 1.2, "Lightning workers\n(processes x replicas)\nlocal optimizer step", "#dbe9f6")
    box(ax, 4.2, 2.6, 2.6, 1.2, "ns-3 packet simulation\n(bridge over ZeroMQ)\nstar / leaf-spine, TCP, tenants", "#fde2c8")
    box(ax, 8.5, 2.6, 2.3, 1.2, "RoundOutcome\nup / down masks\nphase times", "#e2f0d9")
    box(ax, 0.2, 0.4, 2.3, 1.2, "RPS exchange on the\nreal tensors: one\nall_reduce, keep-own", "#dbe9f6")
    box(ax, 4.2, 0.4, 2.6, 1.2, "simulated clock\nsim_time += compute\n+ up + down", "#ececec")
    box(ax, 8.5, 0.4, 2.3, 1.2, "metrics.csv,\nsummary.json, run.png:\naccuracy vs simulated time", "#ececec")
    arrow(ax, (2.5, 3.2), (4.2, 3.2), "RoundSpec\n(sizes only)")
    arrow(ax, (6.8, 3.2), (8.5, 3.2), "which packets\narrive, when")
    arrow(ax, (9.6, 2.6), (2.2, 1.6), "masks applied to the model blocks", color="#2e7d32")
    arrow(ax, (2.5, 1.0), (4.2, 1.0))
    arrow(ax, (6.8, 1.0), (8.5, 1.0))
    ax.text(5.5, 4.05, "one round per optimizer step: spec -> outcome -> failures -> exchange -> buffers -> clock -> record",
            ha="center", fontsize=9.5, style="italic")
    out = Path(__file__).resolve().parents[1] / "img" / "round.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


if __name__ == "__main__":
    print(main())
