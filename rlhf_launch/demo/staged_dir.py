"""Folders that are built once: made beside their target, stamped, and renamed into place.

An interrupted build never leaves half a folder behind, and a finished one is not redone while
its stamp (a hash of what determines the build) still matches.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

STAMP_NAME = ".complete"


def stamp_matches(directory: Path, expected: str) -> bool:
    """Whether ``directory`` holds a finished build stamped ``expected``."""
    stamp = directory / STAMP_NAME
    return stamp.is_file() and stamp.read_text().strip() == expected


def build_once(out_dir: Path, stamp: str, build_into: Callable[[Path], None], label: str, force: bool = False) -> Path:
    """``build_into(staging)`` unless ``out_dir`` already carries ``stamp``; returns ``out_dir``."""
    out_dir = Path(out_dir).resolve()
    if not force and stamp_matches(out_dir, stamp):
        print(f"[{label}] {out_dir} is up to date", flush=True)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        build_into(staging)
        (staging / STAMP_NAME).write_text(stamp + "\n")
        _make_shareable(staging)
        _replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"[{label}] wrote {out_dir}", flush=True)
    return out_dir


def command_line(build: Callable[[Path, bool], Path], default_out: Path, description: str, argv: list[str] | None) -> int:
    """``--out DIR`` and ``--force`` for a module that builds a folder once."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument("--force", action="store_true", help="build again even if DIR is up to date")
    args = parser.parse_args(argv)
    build(args.out, args.force)
    return 0


def _make_shareable(root: Path) -> None:
    """mkdtemp creates a 0700 directory and the weights are written 0600: open them up for reading,
    since a build directory is often shared between users and jobs."""
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def _replace_directory(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; a previous ``target`` is only removed once ``new`` is in place."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.replace(old)  # rename(2) may replace an empty directory
    new.replace(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
