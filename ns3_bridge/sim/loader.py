"""Load ns-3 (the pip wheel's cppyy bindings) safely and fast, in the simulation process only.

- Fast: a cling precompiled header of the standard and ns-3 module headers, built once per
  (ns3, cppyy-cling, Python, machine) into a cache folder, cuts the import from ~11 s / 650 MB to
  ~2 s / 390 MB. Set ``PL_LOSSY_CACHE`` to choose the folder (default ``~/.cache/pl-lossy``).
- Safe: the wheel's loader globs the current directory and PATH recursively for libraries (from ``/``
  it never finishes), so the import runs from the cache folder with PATH narrowed to Python's folder
  and the system bin folders (it shells out to ``sed`` and ``ldd``).
- Clear: a missing or broken ns-3 raises :class:`Ns3Unavailable` with what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
_HEADERS = ("gilbert_elliott.hpp", "learning_class.hpp", "round_engine.hpp", "tcp_engine.hpp", "background.hpp")
_ns: ModuleType | None = None

# Macros the wheel's loader defines when the matching library is present (ns3/ns/__init__.py).
_LIBRARY_DEFINES = {
    "libgsl": ["HAVE_GSL"],
    "libxml2": ["HAVE_LIBXML2"],
    "libsqlite3": ["HAVE_SQLITE3"],
    "openflow": ["NS3_OPENFLOW", "ENABLE_OPENFLOW"],
    "click": ["NS3_CLICK"],
}


class Ns3Unavailable(RuntimeError):
    """ns-3 cannot be loaded here."""


def cache_dir() -> Path:
    path = Path(os.environ.get("PL_LOSSY_CACHE", Path.home() / ".cache" / "pl-lossy"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        raise Ns3Unavailable(f"the {dist!r} package is missing: install ns-3's bindings with `pip install ns3`") from None


def _ns3_prefix() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ns3")
    if spec is None or not spec.submodule_search_locations:
        raise Ns3Unavailable("ns-3 is not installed: `pip install ns3` (the official wheel, 3.44)")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _safe_import_environment(workdir: Path):
    old_cwd, old_path = os.getcwd(), os.environ.get("PATH", "")
    os.chdir(workdir)
    # the loader shells out to sed and ldd, which live in the system bin folders (not globbed deeply)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ["PATH"] = old_path


def _build_pch(prefix: Path, pch: Path) -> None:
    """Run cppyy-backend's makepch.py with the ns-3 module headers as extra headers."""
    import cppyy_backend

    backend = Path(cppyy_backend.__file__).resolve().parent
    libs = " ".join(os.listdir(prefix / "lib64")) if (prefix / "lib64").is_dir() else ""
    defines = [d for key, names in _LIBRARY_DEFINES.items() if key in libs for d in names]
    header = pch.with_suffix(".h")
    lines = [f"#define {d} 1" for d in defines]
    lines += [f'#include "ns3/{h.name}"' for h in sorted((prefix / "include" / "ns3").glob("*-module.h"))]
    header.write_text("\n".join(lines) + "\n")
    tmp = pch.with_suffix(".tmp")
    proc = subprocess.run(
        [sys.executable, str(backend / "etc" / "dictpch" / "makepch.py"), str(tmp), f"-I{prefix / 'include'}", str(header)],
        cwd=backend,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not tmp.is_file():
        raise Ns3Unavailable(f"building the precompiled header failed: {(proc.stderr or proc.stdout)[-500:]}")
    tmp.replace(pch)


def precompiled_header() -> Path | None:
    """The cached PCH for this ns-3 + cppyy + Python + machine, built (under a lock) if missing."""
    if os.environ.get("PL_LOSSY_NO_PCH"):
        return None
    prefix = _ns3_prefix()
    key = "-".join(
        [f"ns3_{_version('ns3')}", f"cling_{_version('cppyy-cling')}", f"py{sys.version_info[0]}{sys.version_info[1]}", platform.machine()]
    )
    pch = cache_dir() / f"{key}.pch"
    if not pch.is_file():
        with open(cache_dir() / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
            if not pch.is_file():
                print(f"pl-lossy: building the ns-3 precompiled header once ({pch}); ~20 s", file=sys.stderr)
                _build_pch(prefix, pch)
    return pch


def load_ns() -> ModuleType:
    """Import ns-3 once per process and define pl-lossy's C++ classes; returns the ``ns`` namespace."""
    global _ns
    if _ns is not None:
        return _ns
    _version("ns3")
    pch = None
    if "cppyy" not in sys.modules:  # the PCH only takes effect before cppyy's first import
        pch = precompiled_header()
        if pch is not None:
            os.environ["CLING_STANDARD_PCH"] = str(pch)
    try:
        with _safe_import_environment(cache_dir()):
            from ns import ns  # noqa: PLC0415  (the import is the expensive, risky part)
    except SystemExit as exc:  # the wheel's stub exits when it cannot find ns3
        raise Ns3Unavailable("ns-3 failed to load: `pip install ns3` (the official wheel, 3.44)") from exc
    except ImportError as exc:
        raise Ns3Unavailable(f"ns-3 failed to load: {exc}") from exc
    import cppyy

    cppyy.add_include_path(str(HERE))  # the headers include each other (tcp_transfer.hpp)
    for name in _HEADERS:
        if not cppyy.cppdef(f'#include "{name}"'):
            raise Ns3Unavailable(f"compiling {name} failed")
    _ns = ns
    return ns
