"""``pl-lossy compare``: runs of the main job, or whole ``-m`` sweeps, in one table and one figure.

    pl-lossy compare multirun/2026-11-26/10-00-00            # every run of a sweep
    pl-lossy compare outputs/a outputs/b --target 0.9        # and the simulated time to 90% accuracy
    pl-lossy compare multirun/... --over seed                # runs differing only in seed: mean +- std

A run is a folder holding ``summary.json`` (and its ``logs/version_*/metrics.csv``); a folder without
one is searched for runs. The table's first columns are the settings that differ between the runs
(from each run's resolved config), then the results. It is printed as markdown and written, with a CSV
of the same rows and ``compare.png`` (accuracy against simulated time and against steps, training
loss, delivered fractions, and background completion times where the runs had tenants), to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .runs import RunResult

# the results, in table order: (column, what it is)
RESULTS = (
    ("val_acc", "final validation accuracy"),
    ("val_bpb", "final validation bits per byte (a language model)"),
    ("val_ppl", "final validation perplexity per byte"),
    ("val_loss", "final validation loss"),
    ("train_loss", "the last epoch's mean training loss (else the last logged one)"),
    ("train_eval_loss", "the whole training set's loss at the last validation (data.eval_train=true)"),
    ("steps", "optimizer steps"),
    ("n_workers", "RPS workers"),
    ("delivered_up", "fraction of network packets delivered, workers -> servers (mean over rounds)"),
    ("delivered_down", "same, servers -> workers"),
    ("sim_time_s", "simulated time of the run"),
    ("comm_time_s", "of which communication"),
    ("bg_flows", "background flows started over the run (summary.json: background.flows)"),
    ("bg_fct_mean_s", "their mean completion time (flow-weighted)"),
    ("bg_fct_p99_s", "the mean over rounds of each round's 99th percentile"),
    ("wall_time_s", "wall-clock time (not reproducible)"),
)
# not settings of the experiment, or a copy of one (strategy.network is the `network` group, resolved)
IGNORED_KEYS = ("hydra", "summary_file", "plot", "trainer.enable_progress_bar", "trainer.logger.save_dir", "strategy.network")


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder at or under ``paths``, in path order (sweep jobs numerically)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if (path / "summary.json").is_file():
            runs.append(path)
            continue
        found = sorted((p.parent for p in path.rglob("summary.json")), key=_natural)
        if not found:
            raise FileNotFoundError(f"no run (a folder with summary.json) at or under {path}")
        runs.extend(found)
    return list(dict.fromkeys(runs))


def _natural(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in path.parts]


def varying_settings(results: Sequence[RunResult]) -> list[str]:
    """The config keys whose values differ between the runs (not paths, progress bars, Hydra's own)."""
    configs = [r.settings for r in results]
    keys = sorted({k for c in configs for k in c})
    return [
        k for k in keys
        if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)
        and len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1
    ]


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last part where that is unambiguous (``network.loss_rate`` -> ``loss_rate``)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _copies_one_of(results: Sequence[RunResult], key: str, over: Sequence[str]) -> bool:
    """Whether ``key`` has, run by run, the values of a key in ``over`` (``network.seed: ${seed}``)."""
    return any(all(r.settings.get(key) == r.settings.get(o) for r in results) for o in over)


def run_row(result: RunResult, settings: Sequence[str], target: Optional[float] = None) -> dict[str, Any]:
    """One run's settings and results (None where the run has no such value)."""
    row: dict[str, Any] = {k: result.settings.get(k) for k in settings}
    s = result.summary
    losses = result.column("train_loss")
    row.update(
        {k: s.get(k) for k in ("val_acc", "val_bpb", "val_ppl", "val_loss", "steps", "n_workers", "delivered_up", "delivered_down", "sim_time_s",
                                "comm_time_s", "wall_time_s")}
    )
    row["train_eval_loss"] = s.get("train_eval_loss")
    row["train_loss"] = s.get("train_loss") if s.get("train_loss") is not None else (losses[-1][1] if losses else None)
    bg = s.get("background") or {}
    row.update(bg_flows=bg.get("flows"), bg_fct_mean_s=bg.get("fct_mean_s"), bg_fct_p99_s=bg.get("fct_p99_s"))
    if target is not None:
        row[f"time_to_{target:g}_s"] = result.time_to(target)
    row["run"] = str(result.run_dir)
    return row


def group_rows(rows: Sequence[dict[str, Any]], settings: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with equal ``settings`` merged: numbers become their mean, with ``<column>_std`` and ``runs``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row.get(k) for k in settings], default=str), []).append(row)
    merged = []
    for members in groups.values():
        out: dict[str, Any] = {k: members[0].get(k) for k in settings}
        for column in members[0]:
            if column in settings or column == "run":
                continue
            values = [m.get(column) for m in members]
            numbers = [float(v) for v in values if _is_number(v)]
            if len(numbers) == len(values) and numbers:
                out[column] = statistics.fmean(numbers)
                out[f"{column}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else 0.0
            else:
                out[column] = None if any(v is None for v in values) else values[0]
        out["runs"] = len(members)
        merged.append(out)
    return merged


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def columns_of(rows: Sequence[dict[str, Any]], settings: Sequence[str]) -> list[str]:
    """Settings, then result columns that some row has a value for (``_std`` columns out: the cells carry them)."""
    present = {k for r in rows for k, v in r.items() if v is not None}
    results = [k for k, _ in RESULTS] + sorted(k for k in present if k.startswith("time_to_"))
    tail = [k for k in ("runs", "run") if k in present]
    return [*settings, *(k for k in results if k in present), *tail]


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return "-"
    if isinstance(value, float):
        text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
        std = row.get(f"{column}_std")
        return f"{text} ± {std:.2g}" if std and row.get("runs", 1) > 1 else text
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], names: dict[str, str]) -> str:
    head = [names.get(c, c) for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    full = [c for col in columns for c in (col, f"{col}_std") if c == col or any(c in r for r in rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=full, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


def label(row: dict[str, Any], settings: Sequence[str], names: dict[str, str]) -> str:
    return ", ".join(f"{names[k]}={_cell(row, k)}" for k in settings) or Path(str(row.get("run", "run"))).name


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, title: str = "") -> Path:
    """Title, lay out, write (creating the folder) and close a figure: every plot of the project ends so."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot(results: Sequence[RunResult], labels: Sequence[str], path: Path, target: Optional[float] = None, title: str = "") -> Path:
    """One figure: validation accuracy (bits per byte for language models) against simulated time and against steps, training loss against
    steps, each run's delivered fractions, and background completion times when any run had tenants."""
    plt = pyplot()
    background = any((r.summary.get("background") or {}).get("flows") for r in results)
    fig, axes = plt.subplots(1, 5 if background else 4, figsize=(21 if background else 17, 3.8))
    acc_time, acc_step, loss_step, delivered = axes[:4]
    longest = max((t for r in results for t, _ in r.accuracy_curve()), default=1.0)
    metric = "validation bits per byte" if results[0].metric == "val_bpb" else "validation accuracy"
    scale, unit = (1e3, "ms") if longest < 1 else (1.0, "s")
    for r, name in zip(results, labels):
        curve = r.accuracy_curve()
        if curve:
            acc_time.plot([t * scale for t, _ in curve], [a for _, a in curve], marker="o", markersize=3, label=name)
        steps = r.column(r.metric)
        if steps:
            acc_step.plot(*zip(*steps), marker="o", markersize=3, label=name)
        losses = r.column("train_loss")
        if losses:
            loss_step.plot(*zip(*losses), linewidth=1, label=name)
    if target is not None:
        for ax in (acc_time, acc_step):
            ax.axhline(target, color="gray", linestyle="--", linewidth=1)
    short = metric.removeprefix("validation ")
    acc_time.set(xlabel=f"simulated time ({unit})", ylabel=metric, title=f"{short} vs simulated time")
    acc_step.set(xlabel="step", ylabel=metric, title=f"{short} vs steps")
    loss_step.set(xlabel="step", ylabel="training loss", title="training loss")
    x = range(len(results))
    if len(results) == 1:  # one run: its rounds
        for name, phase in (("up (workers → servers)", "net/delivered_up"), ("down", "net/delivered_down")):
            per_round = results[0].column(phase)
            if per_round:
                delivered.plot(*zip(*per_round), linewidth=0.8, label=name)
        delivered.set(xlabel="round", ylabel="fraction delivered", title="delivered packets per round")
    else:  # several: their means over rounds
        up = [r.summary.get("delivered_up") or 0.0 for r in results]
        down = [r.summary.get("delivered_down") or 0.0 for r in results]
        delivered.bar([i - 0.2 for i in x], up, width=0.4, label="up (workers → servers)")
        delivered.bar([i + 0.2 for i in x], down, width=0.4, label="down")
        delivered.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
        delivered.set(ylabel="fraction delivered (mean over rounds)", title="delivered packets",
                      ylim=(min(up + down + [1.0]) * 0.98, 1.0005))
    delivered.legend(fontsize=7)
    if background:
        fct = axes[4]
        bg = [r.summary.get("background") or {} for r in results]
        fct.bar([i - 0.2 for i in x], [(b.get("fct_mean_s") or 0) * 1e3 for b in bg], width=0.4, label="mean")
        fct.bar([i + 0.2 for i in x], [(b.get("fct_p99_s") or 0) * 1e3 for b in bg], width=0.4, label="p99")
        fct.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=7)
        fct.set(ylabel="completion time (ms)", title="background flows")
        fct.legend(fontsize=7)
    if len(results) > 1:
        acc_step.legend(fontsize=7)
    return save_figure(fig, path, title)


def plot_run(run_dir: Path, path: Optional[Path] = None) -> Path:
    """The main job's picture of its own run (``run.png`` in its folder)."""
    result = RunResult.load(run_dir)
    s = result.summary
    title = f"{s.get('n_workers', s.get('world_size'))} workers, {s.get('network', '')}"
    return plot([result], [Path(run_dir).name], path or Path(run_dir) / "run.png", title=title[:160])


def compare(paths: Sequence[str | Path], out: Optional[Path] = None, target: Optional[float] = None,
            over: Sequence[str] = ()) -> tuple[str, Path]:
    """The table (markdown) of the runs at ``paths``, and the folder its files were written to."""
    results = [RunResult.load(p) for p in find_runs(paths)]
    metrics = {r.metric for r in results}
    if len(metrics) > 1:
        raise ValueError("these runs have different validation metrics (val_acc and val_bpb): compare classifiers and language models apart")
    if target is not None and results[0].metric == "val_acc" and not 0 < target <= 1:
        raise ValueError(f"--target must be an accuracy in (0, 1], got {target}")
    if target is not None and target <= 0:
        raise ValueError(f"--target must be bits per byte > 0 for these language-model runs, got {target}")
    settings = varying_settings(results)
    unknown = [k for k in over if k not in settings and not any(k in r.settings for r in results)]
    if unknown:
        raise ValueError(f"--over {unknown[0]}: no run has that setting (settings that vary: {', '.join(settings) or 'none'})")
    kept = [k for k in settings if k not in over and not _copies_one_of(results, k, over)]
    per_run = [run_row(r, kept, target) for r in results]
    rows = group_rows(per_run, kept) if over else per_run
    names = short_names(kept)  # for the figure's legends; tables say the keys in full, as overrides do
    columns = columns_of(rows, kept)
    table = markdown(rows, columns, {})
    if out is None:
        out = Path(paths[0]) if len(paths) == 1 and not (Path(paths[0]) / "summary.json").is_file() else Path("compare")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table + "\n")
    write_csv(rows, columns, out / "compare.csv")
    run_labels = [label(row, kept, names) for row in per_run]
    plot(results, run_labels, out / "compare.png", target)
    return table, out


def main(argv: Optional[Sequence[str]] = None) -> int:
    columns = "\n".join(f"  {name:16} {what}" for name, what in RESULTS)
    p = argparse.ArgumentParser(prog="pl-lossy compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"result columns (where some run has a value):\n{columns}")
    p.add_argument("paths", nargs="+", help="run folders, or folders holding runs (a -m sweep's multirun/<date>/<time>)")
    p.add_argument("--out", type=Path, help="where compare.md, compare.csv and compare.png go (default: the sweep's folder, or ./compare)")
    p.add_argument("--target", type=float, help="also report the simulated time at which validation accuracy first reached "
                   "this (language models: validation bits per byte first fell to this)")
    p.add_argument("--over", action="append", default=[], metavar="KEY",
                   help="merge runs that differ only in this setting (e.g. seed): mean +- std; repeatable")
    args = p.parse_args(argv)
    try:
        table, out = compare(args.paths, args.out, args.target, args.over)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwritten: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0
