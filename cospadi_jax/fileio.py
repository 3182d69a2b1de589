"""The atomic writers: a file (or a directory of files) is there whole or not at all, with the permissions the
umask asks for."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set back at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path`` to write into; renamed over ``path`` when the block succeeds,
    removed when it fails. ``mkstemp`` creates files 0600: the result gets 0666 & ~umask like any other file,
    so collaborators on shared storage read what the umask lets them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_replaceable(directory: str | Path, *, overwrite: bool, flag: str = "overwrite=True") -> Path:
    """Refuse, before any work, to write a directory over one that holds files unless ``overwrite``; a file in
    the way is always refused. ``flag`` is how the caller's user sets overwrite (named in the error)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another path or remove it.")
    if directory.is_dir() and not overwrite:
        entries = sorted(p.name for p in directory.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FileExistsError(f"{directory} is not empty ({len(entries)} entries: {shown}); nothing was "
                                  f"written. Pass {flag} to replace it, or choose another path.")
    if not can_create_in(directory.parent):
        raise PermissionError(f"cannot create {directory}: {directory.parent} is not writable; choose another path "
                              "or fix its permissions.")
    return directory


@contextmanager
def atomic_directory(directory: str | Path, *, overwrite: bool = False,
                     flag: str = "overwrite=True") -> Iterator[Path]:
    """A temporary sibling directory to write into; renamed into place when the block succeeds, removed when it
    fails, so ``directory`` holds either its old contents or the complete new ones, never a half-written mix.

    An existing ``directory`` that is non-empty needs ``overwrite`` (checked first, by
    :func:`check_replaceable`); it is moved aside, the new one renamed in, then the old one deleted. Both renames
    are on one filesystem (siblings), hence atomic. The new directory gets 0777 & ~umask (``mkdtemp`` makes 0700).
    """
    directory = check_replaceable(directory, overwrite=overwrite, flag=flag)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
            os.replace(directory, old)  # onto the empty placeholder mkdtemp made
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_json(path: str | Path, payload: Any) -> None:
    """``payload`` as indented JSON (keys sorted) at ``path``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())


def can_create_in(directory: str | Path) -> bool:
    """Whether files can be created in ``directory`` (or in the nearest existing parent that would hold it);
    no side effects, so a cache can be checked before the work whose result it would store."""
    path = Path(directory).absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def check_writable(directory: str | Path) -> Path:
    """Create ``directory`` if needed and prove that it can be written, with a clear error otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A unique probe name: the processes of a multi-process run probe the same directory at once.
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write to the output directory {directory}: {exc}. Choose a writable "
                              "output_dir=... (or fix its permissions).") from exc
    return directory
