"""File helpers shared by every stage: hashing, and the only atomic writers.

Every file tipsen publishes is written to a temporary sibling and renamed over its final name, so a reader (or a
rerun after a kill) sees the old file or the new one, never a partial one. A folder is written the same way and
swapped with the old one in a single step (Linux renameat2 RENAME_EXCHANGE), so its old or new version is in place
at every instant. Where the system or the filesystem cannot swap, it takes two renames (old aside to
`.<name>.old-`, new in place); a kill between them leaves no folder, and the next writer's sweep puts the old one
back. Temporary names all start with `.<name>.tmp-`, so a sweep can recognise what a killed run left behind.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tipsen.errors import ConfigError

log = logging.getLogger(__name__)

_EXCHANGE = True  # False: publish folders by two renames, as where renameat2 is missing (tests set it)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_told_two_renames = False


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _umask() -> int:
    """The process umask, read without changing it where the kernel says (os.umask alone must set it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside `path` for any writer (PIL, safetensors); on success it is renamed
    over `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path))
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a published file gets the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename == tmp:  # name the file the caller asked for, not ours
            exc.filename, exc.filename2 = str(path), None
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """JSON, indented and UTF-8, with a final newline."""
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def _fault(step: str) -> None:
    """Test hook: SIGKILL this process at publish_dir's `step` when $TIPSEN_IO_FAULT names it ("after-write",
    "before-swap", "after-first-rename" (two-rename path only), "after-swap", "after-remove"), so tests can show
    that a kill at any step leaves the old or the new version."""
    if os.environ.get("TIPSEN_IO_FAULT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2, or None where there is none (not Linux, or a C library without it)."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` in one step; False where the system or b's filesystem cannot (logged once)."""
    global _told_two_renames
    fn = _renameat2() if _EXCHANGE else None
    if fn is None:
        why = "no renameat2 here" if _EXCHANGE else "tipsen.io._EXCHANGE is False"
    elif fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    else:
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(b))
        why = f"the filesystem of {b.parent} does not support RENAME_EXCHANGE ({errno.errorcode[err]})"
    if not _told_two_renames:
        log.debug("publishing folders by two renames (%s); a kill between them is repaired by the next sweep", why)
        _told_two_renames = True
    return False


def _swap(tmp: Path, final: Path) -> Path | None:
    """Put `tmp` in place of `final`; returns where the old version now is (None: there was none)."""
    if not final.exists():
        tmp.rename(final)
        return None
    if _exchange(tmp, final):
        return tmp
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    final.rename(old)
    _fault("after-first-rename")
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    return old


def sweep_stale(final: str | Path) -> int:
    """Remove what a killed writer of `final` left beside it; returns how many were removed.

    A `.tmp-*` entry is never the only version: it is an unfinished one, or the old one after publish_dir's
    swap. Only a writer killed between the two renames of the fallback path leaves no `final`; its `.old-*`
    copy is put back first, so the previous version is never lost."""
    final = Path(final)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(final):
        olds.pop().rename(final)
    stale = [*final.parent.glob(_tmp_prefix(final) + "*"), *olds]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)


@contextmanager
def publish_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` whole (see the module docstring), on
    failure it is removed.

    `final` must be a folder or absent: a file there is refused rather than replaced, and so is a symbolic link
    (the swap would put a real folder in its place, not write where it points). Leftovers of an earlier writer
    that was killed are swept first."""
    final = Path(final)
    if final.is_symlink():
        raise ConfigError(f"{final}: is a symbolic link; pass a real folder path or a new one (it is replaced whole)")
    if final.exists() and not final.is_dir():
        raise ConfigError(f"{final}: is a file, not a folder; pass a folder path (it is replaced whole)")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix(final)))
    try:
        yield tmp
        _fault("after-write")
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders
        _fault("before-swap")
        old = _swap(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # unfinished, or (after a swap) the old version
        raise
    _fault("after-swap")
    if old is not None:
        shutil.rmtree(old)
        _fault("after-remove")


@contextmanager
def exclusive(lock: str | Path, *, what: str) -> Iterator[None]:
    """Hold the lock file `lock` while the block runs; if another process holds it, a ConfigError naming that
    process (two writers of one output would delete each other's work). The lock dies with its process."""
    import socket

    from filelock import FileLock, Timeout

    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = FileLock(str(lock), timeout=0)
    try:
        held.acquire()
    except Timeout:
        try:
            holder = lock.read_text(encoding="utf-8").strip()
        except OSError:
            holder = ""
        raise ConfigError(f"{what}: already running in process {holder or '(unknown)'}, which holds {lock}; "
                          "wait for it to finish or stop it") from None
    try:
        lock.write_text(f"{os.getpid()} on {socket.gethostname()}\n", encoding="utf-8")
        yield
    finally:
        held.release()
