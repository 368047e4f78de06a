"""The README and docs/: every relative link and anchor resolves, and the docs site builds with --strict."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """The anchor GitHub and mkdocs give a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert text.index("make run") < 200 and text.index("make test") < 300  # the two commands come first


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs is a dev extra")
def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs --strict fails on a page missing from the nav, a broken link or anchor between pages."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "api" / "index.html").is_file()


def _docs_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_check", ROOT / "docs" / "tools" / "docs_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_docs_check_finds_a_drifted_number_and_skips_wall_clock_columns(tmp_path):
    check = _docs_check()
    page = tmp_path / "page.md"
    page.write_text('<!-- generated: cmd="python x.py" file="out/compare.md" tolerance="0.01" wall="wall_time_s" fast -->\n'
                    "| p | val_acc | wall_time_s |\n|---|---|---|\n| 0.1 | 0.7225 ± 0.067 | 10.5 |\n<!-- end generated -->\n")
    check.ROOT = tmp_path
    (block,) = check.blocks([page])
    assert block.fast and block.tolerance == 0.01 and block.wall == ("wall_time_s",)
    same = "| p | val_acc | wall_time_s |\n|---|---|---|\n| 0.1 | 0.7230 ± 0.0671 | 99 |\n"
    assert check.drifts(block, same) == []  # within 1%; the wall clock is not compared
    moved = same.replace("0.7230", "0.688")
    (line,) = check.drifts(block, moved)
    assert "row 1, val_acc: quoted '0.7225 ± 0.067', measured '0.688 ± 0.0671'" in line
    check.write(block, moved)
    assert "0.688" in page.read_text() and "<!-- end generated -->" in page.read_text()


def test_every_generated_block_names_a_command_and_the_file_it_writes():
    check = _docs_check()
    found = check.blocks(PAGES)
    assert found, "the docs quote at least one table their command writes"
    for block in found:
        script = block.cmd.split()[1]
        assert (ROOT / script).is_file(), f"{block.name}: {block.cmd!r} runs no script of this repository"
        assert f"--out {block.file.parent.relative_to(ROOT)}" in block.cmd, f"{block.name}: the command must write {block.file}"
        assert check.table(block.body), f"{block.name}: no table between the markers"
