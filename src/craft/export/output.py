"""Write outputs so that a failed or refused run never damages what is already there.

Everything is written to a hidden temporary sibling of the destination and renamed into place at the end; an
existing non-empty destination is refused unless `force` is given, and is only removed after the new output is
complete. A file where a directory output goes (or a directory where a file goes) is refused even with `force`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from craft.errors import UserError


def _check_destination(path: Path, force: bool) -> None:
    occupied = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if occupied and not force:
        raise UserError(f"output {path} already exists and is not empty; pass --force to replace it")
    if path.exists() and not path.is_dir() and not path.is_file():
        raise UserError(f"output {path} exists and is not a regular file or directory")


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it replaces `path` (refused if occupied, unless `force`)."""
    path = Path(path)
    if path.is_file():  # never replaced, even with --force: a file where a directory goes is a mistyped path
        raise UserError(f"output {path} is a file; give a directory")
    _check_destination(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, path)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success it is renamed to `path`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name")
    _check_destination(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.partial-{os.getpid()}"
    try:
        yield staging
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, path)


def _replace(staging: Path, path: Path) -> None:
    """Rename the finished directory `staging` to `path`; an existing `path` (a directory: `staged_directory`
    refuses anything else) is removed only after the new output is in place."""
    if not path.exists():
        staging.rename(path)
        return
    retired = path.parent / f".{path.name}.old-{os.getpid()}"
    path.rename(retired)
    staging.rename(path)
    shutil.rmtree(retired)
