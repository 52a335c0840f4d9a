"""Publishing a folder under a kill at each step: the old or the new version is in place, and the next start's
sweep leaves nothing else behind. Kills are real (SIGKILL in a child, at the step $TIPSEN_IO_FAULT names)."""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tipsen import io
from tipsen.errors import ConfigError
from tipsen.io import publish_dir, sweep_stale, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent
OLD = {"v": "old", "sub/w": "old", "gone": "only in the old version"}
NEW = {"v": "new", "sub/w": "new"}
# Publishes NEW at argv[1], on the exchange path or (argv[2] == "fallback") by two renames.
CHILD = f"""
import sys
from pathlib import Path
import tipsen.io as io
io._EXCHANGE = sys.argv[2] == "exchange"
with io.publish_dir(sys.argv[1]) as tmp:
    for rel, text in {NEW!r}.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
"""
exchange = pytest.mark.skipif(io._renameat2() is None, reason="no renameat2 on this system")


def _write(root: Path, tree: dict[str, str]) -> None:
    for rel, text in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _tree(root: Path) -> dict[str, str] | None:
    """The files under `root` and their text; None where there is no `root`."""
    if not root.exists():
        return None
    return {p.relative_to(root).as_posix(): p.read_text() for p in root.rglob("*") if p.is_file()}


def _leftovers(final: Path) -> dict[str, dict[str, str] | None]:
    """What lies beside `final`, by kind ("tmp", "old"), with its files."""
    kinds = {f".{final.name}.tmp-": "tmp", f".{final.name}.old-": "old"}
    return {next(k for pre, k in kinds.items() if p.name.startswith(pre)): _tree(p)
            for p in final.parent.iterdir() if p.name != final.name}


def _killed_publish(final: Path, path: str, step: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TIPSEN_IO_FAULT": step}
    return subprocess.run([sys.executable, "-c", CHILD, str(final), path], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("path, step, live, left", [
    pytest.param("exchange", "after-write", OLD, {"tmp": NEW}, marks=exchange),
    pytest.param("exchange", "before-swap", OLD, {"tmp": NEW}, marks=exchange),
    pytest.param("exchange", "after-swap", NEW, {"tmp": OLD}, marks=exchange),  # the old version, under tmp's name
    pytest.param("exchange", "after-remove", NEW, {}, marks=exchange),
    ("fallback", "after-write", OLD, {"tmp": NEW}),
    ("fallback", "before-swap", OLD, {"tmp": NEW}),
    ("fallback", "after-first-rename", None, {"old": OLD, "tmp": NEW}),  # the one instant with no version
    ("fallback", "after-swap", NEW, {"old": OLD}),
    ("fallback", "after-remove", NEW, {}),
])
def test_a_kill_at_each_step_of_a_publish_leaves_the_old_or_the_new_version(path, step, live, left, tmp_path):
    final = tmp_path / "gimjang"
    with publish_dir(final) as tmp:
        _write(tmp, OLD)
    r = _killed_publish(final, path, step)
    assert r.returncode == -signal.SIGKILL, r.stderr  # the kill really came, at that step
    assert _tree(final) == live  # on the exchange path, always a whole version
    assert _leftovers(final) == left
    assert sweep_stale(final) == len(left) - (live is None)  # the next start; an .old copy put back is kept
    assert _tree(final) == (live or OLD) and os.listdir(tmp_path) == ["gimjang"]


@pytest.mark.parametrize("path", [pytest.param("exchange", marks=exchange), "fallback"])
@pytest.mark.parametrize("step, live", [("after-write", None), ("before-swap", None), ("after-swap", NEW)])
def test_a_kill_during_a_first_publish_leaves_nothing_or_the_new_version(path, step, live, tmp_path):
    final = tmp_path / "gimjang"
    r = _killed_publish(final, path, step)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _tree(final) == live
    sweep_stale(final)
    assert _tree(final) == live and os.listdir(tmp_path) == (["gimjang"] if live else [])


@exchange
def test_a_reader_always_finds_the_folder_while_it_is_republished(tmp_path):
    final, done, missing = tmp_path / "gimjang", threading.Event(), []
    with publish_dir(final) as tmp:
        _write(tmp, OLD)

    def read() -> None:
        while not done.is_set():
            if not final.is_dir():
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            with publish_dir(final) as tmp:
                _write(tmp, {"v": str(i)})
    finally:
        done.set()
        reader.join()
    assert missing == [] and _tree(final) == {"v": "199"} and os.listdir(tmp_path) == ["gimjang"]


def test_a_filesystem_that_cannot_swap_publishes_by_two_renames_and_says_so_once(tmp_path, monkeypatch, caplog):
    def unsupported(*args) -> int:  # what renameat2 answers on a filesystem without RENAME_EXCHANGE
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(io, "_renameat2", lambda: unsupported)
    monkeypatch.setattr(io, "_told_two_renames", False)
    final = tmp_path / "gimjang"
    with caplog.at_level(logging.DEBUG, logger="tipsen.io"):
        for text in ("old", "new", "newer"):
            with publish_dir(final) as tmp:
                (tmp / "v").write_text(text)
    assert _tree(final) == {"v": "newer"} and os.listdir(tmp_path) == ["gimjang"]
    said = [r.getMessage() for r in caplog.records if r.name == "tipsen.io"]
    assert len(said) == 1 and "two renames" in said[0] and "EINVAL" in said[0], said


def test_a_file_or_a_link_where_a_folder_is_published_is_refused_and_kept(tmp_path):
    mine, target = tmp_path / "export", tmp_path / "target"
    mine.write_text("the user's own file")
    target.mkdir()
    (target / "v").write_text("kept")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for final, why in ((mine, "is a file, not a folder"), (tmp_path / "link", "is a symbolic link"),
                       (tmp_path / "dangling", "is a symbolic link")):
        with pytest.raises(ConfigError, match=f"^{re.escape(str(final))}: {why}; pass a"):
            with publish_dir(final):
                pytest.fail("the body of a refused publish ran")
    assert mine.read_text() == "the user's own file" and _tree(tmp_path / "link") == {"v": "kept"}
    assert sorted(os.listdir(tmp_path)) == ["dangling", "export", "link", "target"]  # no tmp folder either


def test_demo_data_over_a_file_is_a_one_line_error_and_the_file_is_kept(tmp_path):
    mine = tmp_path / "export"
    mine.write_text("the user's own file")
    r = subprocess.run([sys.executable, "-m", "tipsen.cli", "demo-data", str(mine)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"tipsen demo-data: error: {mine}: is a file, not a folder; pass a folder path (it is replaced whole)"]
    assert mine.read_text() == "the user's own file" and os.listdir(tmp_path) == ["export"]


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_published_files_follow_the_umask(mask, mode, tmp_path):
    old = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with publish_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == mode | (0o111 & ~mask & 0o777)


def test_a_kill_between_the_two_renames_of_a_publish_keeps_the_old_version(tmp_path):
    final = tmp_path / "gimjang"
    with publish_dir(final) as tmp:
        (tmp / "v").write_text("old")
    # The state a kill leaves after `final -> .old-PID` and before `tmp -> final`: no live version at all.
    final.rename(tmp_path / ".gimjang.old-4242")
    (tmp_path / ".gimjang.tmp-abc").mkdir()
    (tmp_path / ".gimjang.tmp-abc" / "v").write_text("new, never published")
    assert sweep_stale(final) == 1  # the next writer's start puts the old version back, then sweeps
    assert (final / "v").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["gimjang"]
    with publish_dir(final) as tmp:
        (tmp / "v").write_text("new")
    assert (final / "v").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["gimjang"]
