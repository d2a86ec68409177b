"""Crash-safe writes: outputs appear whole or not at all, and bad input is a one-line `DataError`.

`staged_dir` and `staged_file` write under a temporary sibling name and rename it into place at the
end, so a failing or killed command leaves no partial output (the next run on the same output removes
the temporaries of killed ones). `check_output_dir` and `check_writable` refuse an output location
before anything is computed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence


class DataError(ValueError):
    """A malformed input. The message names the file and the row or key at fault."""


def first_line(e: BaseException) -> str:
    """An exception's first message line (its type when it has none), for a one-line DataError."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_output_dir(out: Path, overwrite: bool = False, inputs: Sequence[Path | str] = ()) -> None:
    """Refuse an output folder that replacing would be wrong for: the filesystem root, the working
    directory or a folder holding it, a plain file, a folder holding one of the command's `inputs`,
    or (without `overwrite`) any existing path."""
    target = out.resolve()
    if target.parent == target:
        raise DataError(f"{out}: is the filesystem root; choose a folder to create")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise DataError(f"{out}: is the working directory or holds it; choose a folder to create")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: is a file, not an output folder; refusing to replace it")
    check_writable(out.parent, out)
    for given in inputs:
        source = Path(given).resolve()
        if source == target or target in source.parents:
            raise DataError(f"{out}: holds the input {given}; choose an output folder outside the inputs")
    if out.exists() and not overwrite:
        raise DataError(f"{out}: output folder exists (pass --overwrite to replace it)")


def check_writable(folder: Path | str, out: Path | str) -> None:
    """Refuse output `out` when `folder` (where it is written) cannot be created or written: a plain
    file on its way, or the nearest existing folder read-only (a read-only mount, or permissions)."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise DataError(f"{out}: cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{out}: cannot be written: {existing} is read-only")


@contextmanager
def creating(out: Path) -> Iterator[None]:
    """What creating `out`'s folders raises (a location the checks above cannot see is read-only,
    e.g. a kernel file system) as one line naming `out`."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{out}: cannot be written: {e.strerror or e}") from None


def _remove_stale(out: Path) -> None:
    """Remove temporary siblings of `out` (.NAME.tmp-PID-* / .NAME.old-PID-*) whose process is gone:
    what a killed run on the same output left behind."""
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            pid = path.name[len(prefix):].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def staged_dir(out: Path | str, overwrite: bool = False, inputs: Sequence[Path | str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `out` only if the block finishes.

    On any exception the temporary folder is removed and `out` is left as it was. `out` is checked
    first (`check_output_dir`), and temporary siblings left by killed runs are removed.
    """
    out = Path(out)
    check_output_dir(out, overwrite, inputs)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with creating(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def staged_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path in the same folder; it replaces `path` only on success."""
    path = Path(path)
    check_writable(path.parent, path)
    with creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
