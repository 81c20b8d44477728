"""Files Corral writes: atomic writes, output paths checked before work starts, one writer each.

- `atomic_open` / `atomic_write_text`: a reader (or a crash) never sees a half-written file; the
  file gets the permissions a plain `open()` would give it (0666 less the umask), and temporary
  files left behind by a killed writer are removed by the next write to the same output.
- `check_output_path`: an output that cannot be written (a directory, an unwritable folder) or that
  is one of the command's inputs (also through a symlink or `..`) stops the command before any work.
- `exclusive_output`: one process at a time writes an output; a second one is refused with the pid
  of the first, and a lock left by a killed process never blocks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from corral.errors import UsageError

_TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask (read without changing it where the system allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _temporary_prefix(target: Path) -> str:
    # The writer's pid in the name: the next writer can tell a dead writer's leftovers.
    return f".{target.name}.{os.getpid()}."


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporary files (or folders) of writes to `target` whose writer process is gone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.")
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if match and not _process_alive(int(match.group(1))):
                if entry.is_dir() and not entry.is_symlink():
                    import shutil

                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        entry.unlink()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"
) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=_temporary_prefix(target), suffix=_TEMP_SUFFIX, dir=target.parent
    )
    binary = "b" in mode
    try:
        # mkstemp creates 0600; a written output is as readable as a plain open() would make it.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def temporary_folder_beside(target: Path) -> Path:
    """A new folder next to `target`, to build it in and rename into place when complete.

    Folders of a killed build are removed first; the folder gets a plain mkdir's permissions
    (0777 less the umask), not mkdtemp's 0700.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    folder = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    folder.chmod(0o777 & ~current_umask())
    return folder


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (symlinks and `..` resolved; hard links by inode)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    with contextlib.suppress(OSError):
        return a.exists() and b.exists() and os.path.samefile(a, b)
    return False


def check_output_path(
    output: str | os.PathLike,
    *,
    inputs: tuple[str | os.PathLike | None, ...] = (),
    what: str = "output",
    folder: bool = False,
) -> Path:
    """Refuse, before any work, an output that would overwrite an input or cannot be written.

    `folder`: the output is a directory (a run directory, an export), else a file.
    """
    path = Path(output)
    for source in inputs:
        if source is not None and same_file(path, source):
            raise UsageError(f"{path}: the {what} would overwrite the input {source}")
        if source is not None and folder and Path(source).resolve().is_relative_to(path.resolve()):
            raise UsageError(f"{path}: the {what} folder holds the input {source}")
    if not folder and path.is_dir():
        raise UsageError(f"{path}: is a directory; the {what} must be a file path")
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{path}: is a file; the {what} must be a folder")
    parent = path if folder and path.is_dir() else path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot write in {existing} (permission denied)")
    return path


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file `exclusive_output` holds for `output`: `OUTPUT.lock` beside it."""
    target = Path(output)
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def exclusive_output(output: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive lock on `output` (a file or folder) for as long as this block runs.

    The lock is `flock` on `OUTPUT.lock` beside it: the kernel releases it when the holder dies, so
    a stale lock never blocks a resume. A second writer is refused, naming the holder's pid. The
    lock file is removed on release.
    """
    target = Path(output)
    lock_file = lock_path(target)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = _lock(lock_file, target, what)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield target
    finally:
        # Unlink while still holding the lock: a waiter that opened the old file sees it gone
        # and retries on a new one (see _lock), so two writers never hold different files.
        with contextlib.suppress(OSError):
            lock_file.unlink()
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        handle.close()


def _lock(lock_path: Path, target: Path, what: str) -> IO:
    while True:
        handle = open(lock_path, "a+")  # noqa: SIM115 - returned to the caller, who closes it
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UsageError(
                f"{target}: another corral process (pid {holder}) is writing this {what}; wait "
                "for it to finish or stop it first"
            ) from None
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        handle.close()  # the holder removed this file as we opened it: lock the new one
