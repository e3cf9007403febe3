"""Writing output folders (ideogram4_mlx/files.py): locks, partial folders, signals, sizes.

The writers' own rules (what ``force`` may replace) are tested with them: test_convert.py and
test_synthetic.py.
"""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ideogram4_mlx.files import (
    format_size,
    lock_path,
    locked,
    move_into_place,
    remove_stale,
    sigterm_exits,
    write_file,
    write_folder,
)


def nothing_foreign(dst):
    return None


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (999, "999 B"),
        (4096, "4.1 KB"),
        (6_100_000, "6.1 MB"),
        (9_300_000_000, "9.3 GB"),
    ],
)
def test_format_size_picks_a_unit_that_shows_small_sizes(n, text):
    assert format_size(n) == text


def test_write_folder_builds_a_partial_folder_and_renames_it(tmp_path):
    dst = tmp_path / "sub" / "out"
    with write_folder(dst, False, nothing_foreign, "an output") as tmp:
        assert tmp.parent == dst.parent and tmp.name.startswith(f".out.{os.getpid()}.")
        assert lock_path(dst).read_text() == f"{os.getpid()}\n"
        (tmp / "a.txt").write_text("a")
    assert (dst / "a.txt").read_text() == "a"
    assert [p.name for p in dst.parent.iterdir()] == ["out"]


def test_sigterm_inside_write_folder_cleans_up_and_exits_143(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        with write_folder(tmp_path / "out", False, nothing_foreign, "an output") as tmp:
            (tmp / "a.txt").write_text("a")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
    assert info.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_sigterm_handler_only_in_the_main_thread_and_only_over_the_default():
    seen = []
    with sigterm_exits():
        seen.append(signal.getsignal(signal.SIGTERM))
    assert seen[0] not in (signal.SIG_DFL, None)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def in_thread():
        with sigterm_exits():  # signal.signal would raise ValueError outside the main thread
            seen.append("ran")

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert seen[1] == "ran"

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    try:
        with sigterm_exits():
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_held_lock_refuses_and_a_stale_one_is_taken_over(tmp_path):
    dst = tmp_path / "out"
    lock = lock_path(dst)
    with locked(dst):  # a second open of the file conflicts, even in this process
        held = rf"another process \(pid {os.getpid()}\), which holds {lock}; wait for it"
        with pytest.raises(FileExistsError, match=held):
            with locked(dst):
                pass
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()
    lock.write_text(f"{dead_pid()}\n")  # left by a killed run: nobody holds it
    with pytest.warns(UserWarning, match="took over a stale lock"):
        with locked(dst):
            assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError, match="is a symbolic link, not a lock file"):
        with locked(dst):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_a_lock_held_by_a_killed_process_is_free_at_once(tmp_path):
    """The kernel drops the flock with its process: no pid check, so no window in which two
    writers that both found a dead owner could both proceed."""
    dst = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from ideogram4_mlx.files import locked\n"
         f"with locked(__import__('pathlib').Path({str(dst)!r})):\n"
         "    print('held', flush=True); time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FileExistsError, match=rf"\(pid {holder.pid}\)"):
            with locked(dst):
                pass
    finally:
        holder.kill()
        holder.wait(30)
    with pytest.warns(UserWarning, match=rf"pid {holder.pid} no longer holds it"):
        with locked(dst):
            assert lock_path(dst).read_text() == f"{os.getpid()}\n"


def test_stale_folders_go_a_replaced_one_comes_back_unknown_ones_are_only_reported(tmp_path):
    dst = tmp_path / "out"
    old = tmp_path / f".out.{dead_pid()}.abcd1234.old"
    (old / "replaced").mkdir(parents=True)
    (old / "replaced" / "a.txt").write_text("old output")
    unknown = tmp_path / ".out.abcd1234.partial"  # an earlier version's: no pid in the name
    unknown.mkdir()
    with pytest.warns(UserWarning) as warned:
        remove_stale(dst)
    messages = " | ".join(str(w.message) for w in warned)
    assert "restored" in messages and "no owner recorded" in messages
    assert (dst / "a.txt").read_text() == "old output" and not old.exists() and unknown.exists()


def test_move_into_place_swaps_the_folders_and_leaves_no_sibling(tmp_path):
    tmp, dst = tmp_path / "tmp", tmp_path / "dst"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    dst.mkdir()
    (dst / "theirs.txt").write_text("x")
    move_into_place(tmp, dst)
    assert [p.name for p in dst.iterdir()] == ["new.txt"] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


class WriteFailed(Exception):
    pass


def failing_write(error):
    """A ``write(f)`` that puts some bytes in the file, then raises ``error``."""

    def write(f):
        f.write(b"half of the new file")
        f.flush()
        raise error

    return write


@pytest.mark.parametrize("error", [WriteFailed("disk gone"), KeyboardInterrupt()])
def test_write_file_that_fails_mid_write_leaves_no_temp_file_and_no_destination(tmp_path, error):
    (tmp_path / "theirs.txt").write_text("x")
    path = tmp_path / "out.png"
    with pytest.raises(type(error)):
        write_file(path, failing_write(error))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs.txt"]


@pytest.mark.parametrize("error", [WriteFailed("disk gone"), KeyboardInterrupt()])
def test_write_file_that_fails_mid_write_leaves_an_existing_file_intact(tmp_path, error):
    path = tmp_path / "out.png"
    path.write_bytes(b"the old file")
    os.chmod(path, 0o640)
    with pytest.raises(type(error)):
        write_file(path, failing_write(error), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert path.read_bytes() == b"the old file" and path.stat().st_mode & 0o777 == 0o640


def test_write_file_refuses_a_destination_that_appeared_while_writing(tmp_path):
    path = tmp_path / "out.png"

    def write(f):
        f.write(b"new")
        path.write_bytes(b"someone else's")  # created while we were writing

    with pytest.raises(FileExistsError, match="out.png already exists"):
        write_file(path, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert path.read_bytes() == b"someone else's"


def test_write_file_replaces_a_link_and_never_writes_through_it(tmp_path):
    target = tmp_path / "target.txt"
    target.write_bytes(b"the link's target")
    path = tmp_path / "out.png"
    path.symlink_to(target)
    with pytest.raises(FileExistsError, match="out.png already exists"):
        write_file(path, lambda f: f.write(b"new"))
    assert write_file(path, lambda f: f.write(b"new"), force=True) == path
    assert not path.is_symlink() and path.read_bytes() == b"new"
    assert target.read_bytes() == b"the link's target"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "target.txt"]
