"""Tables in the docs that their command writes, and the check that the numbers still hold.

A generated block in a docs page (or the README) looks like this::

    <!-- generated: cmd="python examples/paper_grid.py --out outputs/docs/paper_grid" file="outputs/docs/paper_grid/compare.md" tolerance="0.02" fast -->
    ...the file's text, as the command wrote it...
    <!-- end generated -->

    python docs/tools/docs_check.py             # make docs-check: re-run the fast blocks' commands, compare every number
    python docs/tools/docs_check.py --all       # every block (slow ones too: an hour and more)
    python docs/tools/docs_check.py --write     # re-run, then write each block from its file (for a docs update)
    python docs/tools/docs_check.py --list      # the blocks, their commands and whether make docs-check runs them

``tolerance`` is relative (|new - quoted| <= tolerance x max(|quoted|, 1e-12)), 0 by default: a command whose
numbers are a pure function of its config and seed gives them exactly. Columns whose values are this
machine's wall clock are listed in ``wall="col1,col2"`` and skipped. The check exits 1 naming every number
that drifted (page, block, row, column, quoted, measured), 0 when all hold.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- generated: (?P<attrs>.*?) -->\n(?P<body>.*?)<!-- end generated -->", re.S)
ATTR = re.compile(r'(\w+)="([^"]*)"|(\w+)')
NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*(?:e[-+]?\d+)?")


@dataclass
class Block:
    page: Path
    cmd: str
    file: Path
    tolerance: float
    fast: bool
    wall: tuple[str, ...]
    body: str
    header: str  # the block's opening comment line, as written

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}: {self.file.relative_to(ROOT)}"


def blocks(pages: list[Path]) -> list[Block]:
    found = []
    for page in pages:
        for m in BLOCK.finditer(page.read_text()):
            attrs = {a or flag: v for a, v, flag in ATTR.findall(m.group("attrs"))}
            found.append(Block(page, attrs["cmd"], ROOT / attrs["file"], float(attrs.get("tolerance", 0)), "fast" in attrs,
                               tuple(c for c in attrs.get("wall", "").split(",") if c), m.group("body"),
                               f"<!-- generated: {m.group('attrs')} -->\n"))
    return found


def table(text: str) -> list[dict[str, str]]:
    """The first markdown table in ``text`` as rows of column -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return []
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    head = cells(lines[0])
    return [dict(zip(head, cells(line))) for line in lines[2:]]


def numbers(cell: str) -> list[float]:
    return [float(x.replace(",", "")) for x in NUMBER.findall(cell)]


def drifts(block: Block, measured: str) -> list[str]:
    """Every number of the quoted table that the measured one does not give within the tolerance."""
    quoted_rows, measured_rows = table(block.body), table(measured)
    if len(quoted_rows) != len(measured_rows):
        return [f"{block.name}: {len(quoted_rows)} rows quoted, {len(measured_rows)} measured"]
    out = []
    for i, (q, m) in enumerate(zip(quoted_rows, measured_rows)):
        for column, cell in q.items():
            if column in block.wall:
                continue
            qn, mn = numbers(cell), numbers(m.get(column, ""))
            if len(qn) != len(mn) or any(abs(a - b) > block.tolerance * max(abs(a), 1e-12) for a, b in zip(qn, mn)):
                out.append(f"{block.name}: row {i + 1}, {column}: quoted {cell!r}, measured {m.get(column)!r}")
    return out


def run(block: Block) -> None:
    """Run the block's command from the repository's root (``python`` is this interpreter)."""
    argv = shlex.split(block.cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    started = time.monotonic()
    print(f"$ {block.cmd}", flush=True)
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # its progress lines show
    if done.returncode != 0:
        raise SystemExit(f"error: {block.cmd!r} exited {done.returncode} ({block.name})")
    print(f"  done in {time.monotonic() - started:.0f} s", flush=True)


def write(block: Block, measured: str) -> None:
    """Replace the block's text in its page with ``measured`` (the markers stay)."""
    end = "<!-- end generated -->"
    text = block.page.read_text()
    old = block.header + block.body + end
    assert old in text, f"{block.name}: the block changed on disk"
    block.page.write_text(text.replace(old, block.header + measured.rstrip("\n") + "\n" + end, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="slow blocks too")
    p.add_argument("--write", action="store_true", help="write each block from its command's file instead of checking")
    p.add_argument("--list", action="store_true", help="list the blocks and exit")
    args = p.parse_args(argv)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = blocks(pages)
    if args.list:
        for b in found:
            print(f"{'fast' if b.fast else 'slow'}  {b.name}\n      {b.cmd}")
        return 0
    chosen = [b for b in found if b.fast or args.all]
    if not chosen:
        print("error: no generated block to check (see docs/tools/docs_check.py)", file=sys.stderr)
        return 2
    problems, ran = [], set()
    for b in chosen:
        if b.cmd not in ran:  # blocks that quote two files of one command run it once
            run(b)
            ran.add(b.cmd)
        measured = b.file.read_text()
        if args.write:
            write(b, measured)
            print(f"  wrote {b.name}")
        else:
            problems += drifts(b, measured)
    if args.write:
        print(f"docs-check: wrote {len(chosen)} tables from their commands' files")
        return 0
    for line in problems:
        print(f"drift: {line}")
    print(f"docs-check: {len(chosen)} tables, {len(problems)} numbers drifted")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
