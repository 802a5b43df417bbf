"""Writing outputs so that an interrupted run never leaves a half-written one.

- `staging_directory(out)`: everything is written into a hidden folder beside OUT, which replaces OUT by
  one rename at the end; an error or Ctrl-C removes it, and OUT is left as it was.
- `atomic_file(path)`: the same for one file.
- `remove_directory(folder)`: one rename out of the way, then the deletion, so nobody finds it half deleted.
- `sigterm_as_interrupt()`: SIGTERM raises KeyboardInterrupt("SIGTERM"), so a terminated run still cleans up.

A SIGKILL cannot be caught: it leaves at most a hidden `.NAME.*.partial` folder beside OUT, never a partial OUT.
"""

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

from modeling_memory.choices import DEFAULT_MAX_SHARD_SIZE  # re-exported: the tools' default max_shard_size
from modeling_memory.tools.errors import ToolError


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(path, label: str) -> None:
    """Refuse, before any work, a `path` that cannot be created or written: its nearest existing ancestor is
    a file, or is not writable. `label` names it in the message (e.g. "OUT", "--output_dir")."""
    path = Path(os.path.abspath(path))
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ToolError(f"{label} {path} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ToolError(f"{label} {path} cannot be written: {existing} is not writable.")


def check_output_dir(out, overwrite: bool, sources=(), label: str = "OUT") -> None:
    """Refuse an output folder that would lose data or cannot be written, before any work: a file, a non-empty
    folder without `overwrite`, a folder that is or holds one of the `sources`, or an unwritable place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ToolError(f"{label} {str(out)!r} exists and is a file; pass a directory path.")
    resolved = out.resolve()
    for source in sources:
        source = Path(source).resolve()
        if resolved == source or resolved in source.parents:
            raise ToolError(f"{label} {str(out)!r} would overwrite the input {str(source)!r}; choose another {label}.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ToolError(f"{label} {str(out)!r} exists and is not empty; pass --overwrite to replace it.")
    check_writable(resolved.parent, f"the folder of {label}")


def _usual_mode(directory: bool) -> int:
    """The permissions a plain mkdir / open would give: mkdtemp and mkstemp make private ones."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def staging_directory(out, overwrite: bool = False):
    """Yield an empty staging folder beside `out`; when the block finishes it replaces `out` (an old `out` is
    moved aside first and deleted after). On any exception, Ctrl-C included, the staging folder is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(staging, _usual_mode(directory=True))
    try:
        yield staging
        if out.exists() and any(out.iterdir()):
            aside = _move_aside(out)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(aside, out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, out)  # rename(2) replaces a missing or empty folder atomically
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a staging path beside `path` (same suffix, so writers that look at it pick the right format);
    when the block finishes it is renamed to `path`. On any exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, _usual_mode(directory=False))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _move_aside(folder: Path) -> Path:
    aside = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(folder, aside)
    return aside


def remove_directory(folder) -> Path | None:
    """Delete `folder`: one rename out of the way, then the deletion. Returns the hidden folder it was moved
    to when that could not be deleted completely, else None."""
    aside = _move_aside(Path(os.path.abspath(folder)))
    shutil.rmtree(aside, ignore_errors=True)
    return aside if aside.exists() else None


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt("SIGTERM") for the block, so a terminated run still removes its
    staging files (only possible from the main thread; elsewhere the block runs unchanged)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "atomic_file",
    "check_output_dir",
    "check_writable",
    "remove_directory",
    "sigterm_as_interrupt",
    "staging_directory",
]
