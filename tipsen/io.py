"""File helpers shared by every stage: hashing, and the only atomic writers.

Every file tipsen publishes is written to a temporary sibling and renamed over its final name, so a reader (or a
rerun after a kill) sees the old file or the new one, never a partial one. Temporary names all start with
`.<name>.tmp-`, so a sweep can recognise what a killed run left behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tipsen.errors import ConfigError


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


def sweep_stale(final: str | Path) -> int:
    """Remove what a killed writer of `final` left beside it; returns how many were removed.

    A writer killed between publish_dir's two renames leaves no `final`, only its `.old-*` copy: that copy is
    put back first, so the previous version is never lost."""
    final = Path(final)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        olds.pop().rename(final)
    stale = [*final.parent.glob(_tmp_prefix(final) + "*"), *olds]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(stale)


@contextmanager
def publish_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `final` by rename, on failure it is removed.

    Leftovers of an earlier writer that was killed are swept first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_tmp_prefix(final)))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700 folders
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
