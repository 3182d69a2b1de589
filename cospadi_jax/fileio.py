"""The one atomic writer: a file is there whole or not at all, with the permissions the umask asks for."""

from __future__ import annotations

import json
import os
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
