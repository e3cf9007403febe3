"""Writing an output folder safely, shared by ``convert`` and the synthetic-checkpoint writer.

    check_destination(dst, force, foreign, kind)   # early: refuse before any slow work
    with write_folder(dst, force, foreign, kind, needed) as tmp:
        ...                                          # write everything into tmp

The rules:

- ``dst`` must not be a symbolic link or a file. An existing folder is replaced only with
  ``force``, and then only when it is empty or ``foreign(dst)`` finds nothing that the writer
  would not have written itself (each writer says what its earlier outputs look like).
- ``.DST.lock`` next to ``dst`` (``flock``-ed for the whole run, holding the writer's pid)
  keeps a second writer out; one left by a run that was killed is free again (the kernel
  drops the lock with its process) and is taken over with a warning.
- Files are built in ``.DST.<pid>.<random>.partial`` next to ``dst`` and renamed into place at
  the end, so ``dst`` holds the old output or the new one, never a mix. A failure, Ctrl-C or
  SIGTERM removes the partial folder; after ``kill -9`` the next run removes it (its pid names
  a process that is gone) and says so.
- A full disk is one line naming the file, what the output needs and what is free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The command-line flag first: most readers come from the CLI.
FORCE_HINT = "pass --force to replace it (force=True from Python)"
TEMPORARY_SUFFIX = ".tmp"  # write_file's temporary files: ".<name>.<mkstemp's 8>.tmp"


def format_size(n: int) -> str:
    """Bytes in decimal units with one decimal: ``512 B``, ``4.0 KB``, ``6.1 MB``, ``9.3 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def check_destination(
    dst: Path, force: bool, foreign: Callable[[Path], str | None], kind: str
) -> None:
    """Refuse a ``dst`` that this write must not replace (see the module docstring).

    ``foreign(dst)`` names the first thing in an existing ``dst`` that is not part of an
    earlier output (None when there is none); ``kind`` names such an output in messages.
    """
    if dst.is_symlink():
        raise FileExistsError(
            f"{dst} is a symbolic link; outputs are never written through a link: "
            "choose another folder"
        )
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; choose another folder or remove it yourself")
    if not dst.exists():
        return
    if not force:
        raise FileExistsError(f"{dst} already exists; {FORCE_HINT}")
    found = foreign(dst)
    if found is not None:
        raise FileExistsError(
            f"{dst} holds files that are not {kind} (e.g. {found}); "
            "choose another folder or remove it yourself"
        )


@contextmanager
def write_folder(
    dst: Path,
    force: bool,
    foreign: Callable[[Path], str | None],
    kind: str,
    needed: int = 0,
) -> Iterator[Path]:
    """Yield an empty partial folder next to ``dst``; rename it to ``dst`` when the block ends.

    ``needed`` is the size of the whole output in bytes, checked against the free space once.
    Raises ``FileExistsError`` (see ``check_destination``; also when ``dst`` appears while
    writing) and ``OSError`` for a full disk.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    with locked(dst), sigterm_exits():
        check_destination(dst, force, foreign, kind)
        remove_stale(dst)
        check_free_space(dst, needed)
        tmp = Path(
            tempfile.mkdtemp(
                prefix=f".{dst.name}.{os.getpid()}.", suffix=".partial", dir=dst.parent
            )
        )
        try:
            yield tmp
            if (dst.exists() or dst.is_symlink()) and not force:
                raise FileExistsError(
                    f"{dst} appeared while it was being written; it was left as it is: {FORCE_HINT}"
                )
            check_destination(dst, force, foreign, kind)
            move_into_place(tmp, dst)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
                raise OSError(no_space_message(e, tmp, dst, needed)) from None
            raise


def check_free_space(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst.parent).free
    if needed > free:
        raise OSError(
            f"{dst}: the output needs {format_size(needed)}, {format_size(free)} are free; "
            f"free {format_size(needed - free)} or choose another folder"
        )


def no_space_message(e: OSError, tmp: Path, dst: Path, needed: int) -> str:
    """One line: the file (under its final name in ``dst``), the size and the free space."""
    path = Path(e.filename) if e.filename else tmp
    if path.is_relative_to(tmp):
        path = dst / path.relative_to(tmp)
    free = shutil.disk_usage(dst.parent).free  # the partial folder is already removed
    return (
        f"no space left writing {path}; the output needs {format_size(needed)}, "
        f"{format_size(free)} are free: free space or choose another folder"
    )


def move_into_place(tmp: Path, dst: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dst``, replacing an existing ``dst`` only at the
    very end, so an interruption leaves either the old or the new folder, never a mix."""
    if not dst.exists():
        os.rename(tmp, dst)  # fails if a non-empty dst appeared since the caller looked
        return
    old = Path(
        tempfile.mkdtemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=".old", dir=dst.parent)
    )
    os.rename(dst, old / "replaced")
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Owners: the lock file and the partial folders name the process that writes.


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


LOCK_ATTEMPTS = 8  # re-opens when the holder removed the file between our open and our lock


@contextmanager
def locked(dst: Path) -> Iterator[None]:
    """Hold ``.DST.lock`` for the block: an exclusive ``flock`` on it, which the kernel drops
    when its process ends however it ends, so exactly one writer holds it and a lock left by
    a killed run is free; the file names the holder's pid for the message others get."""
    path = lock_path(dst)
    fd = take_lock(path, dst)
    try:
        yield
    finally:
        # Removed while still held: a writer that opened this file meanwhile sees it is gone
        # once it holds the lock, and takes a new one.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def take_lock(path: Path, dst: Path) -> int:
    """The open, ``flock``-ed lock file with our pid in it; ``FileExistsError`` naming the
    holder when another process holds it."""
    for _ in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FileExistsError(
                    f"{path} is a symbolic link, not a lock file: remove it"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = read_pid(path)
            who = "another process" if owner is None else f"another process (pid {owner})"
            raise FileExistsError(
                f"{dst} is being written by {who}, which holds {path}; wait for it to "
                "finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:  # the holder removed it as we opened it
            os.close(fd)
            continue
        owner = read_pid(path)
        if owner is not None and owner != os.getpid():
            warnings.warn(
                f"{path}: took over a stale lock (pid {owner} no longer holds it)", stacklevel=3
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise FileExistsError(f"{path}: the lock kept changing hands; try again")


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def remove_stale(dst: Path) -> None:
    """Report the partial and replaced folders that earlier writes of ``dst`` left; remove
    those whose owner is gone (a replaced folder goes back to ``dst`` when ``dst`` is gone)."""
    named = re.compile(rf"\.{re.escape(dst.name)}\.(\d+)\.[a-z0-9_]{{8}}\.(partial|old)")
    unnamed = re.compile(rf"\.{re.escape(dst.name)}\.[a-z0-9_]{{8}}\.partial")
    for path in sorted(dst.parent.iterdir()):
        match = named.fullmatch(path.name)
        if match is None:
            if unnamed.fullmatch(path.name) and path.is_dir():
                warnings.warn(
                    f"{path}: a partial folder of an earlier write with no owner recorded; "
                    "remove it if no convert or synth is writing it",
                    stacklevel=2,
                )
            continue
        pid, kind = int(match[1]), match[2]
        if not path.is_dir() or path.is_symlink():
            continue
        if pid_alive(pid):
            warnings.warn(f"{path} is being written by pid {pid}; left as it is", stacklevel=2)
            continue
        replaced = path / "replaced"
        if kind == "old" and replaced.is_dir() and not dst.exists():
            os.rename(replaced, dst)
            warnings.warn(
                f"{dst}: restored from {path} (pid {pid} stopped mid-rename)", stacklevel=2
            )
        shutil.rmtree(path, ignore_errors=True)
        warnings.warn(
            f"removed {path}, left by a write that stopped (pid {pid} is gone)", stacklevel=2
        )


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` so cleanup runs as for Ctrl-C.

    Installed only in the main thread and only over the default action; restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous != signal.SIG_DFL:  # a handler of the caller's, or SIG_IGN: theirs to keep
        yield
        return

    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_file(path: Path | str, write: Callable[[BinaryIO], None], force: bool = False) -> Path:
    """Write one file atomically: ``write(f)`` fills a temporary file in the same folder,
    renamed onto ``path`` at the end, so ``path`` is never half-written and a link at ``path``
    is replaced, never written through. Missing parent folders are created; an existing
    ``path`` raises ``FileExistsError`` unless ``force``, checked again at the rename."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: a new file's usual mode
        if (path.exists() or path.is_symlink()) and not force:  # created while we were writing
            raise FileExistsError(f"{path} already exists")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_pattern(name: str) -> re.Pattern:
    """The names :func:`write_file` gives its temporary files for files named by the regular
    expression ``name`` (mkstemp adds 8 characters of ``[a-z0-9_]``)."""
    return re.compile(rf"\.{name}\.[a-z0-9_]{{8}}{re.escape(TEMPORARY_SUFFIX)}")


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
