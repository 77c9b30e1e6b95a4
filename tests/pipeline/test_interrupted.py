"""A build that is stopped, killed or raced leaves nothing behind: SIGTERM cleans up like Ctrl-C, the
next build removes what a SIGKILL left, two builds of one model take turns, and a failed final
rename keeps the previous folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aim import files
from aim.files import StagedFolder
from aim.pipeline.builder import build
from aim.pipeline.model_source import FamilySource
from aim.pipeline.request import BuildRequest
from aim.runtime.folder import Build

ROOT = Path(__file__).resolve().parents[2]


def start(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aim.cli", *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def staging_with(out: Path, model: str, pid: int, name: str, timeout: float = 120) -> Path:
    """The build's staging folder, once `name` is in it (the build is past that step)."""
    staging = out / f".{model}.staging-{pid}"
    deadline = time.monotonic() + timeout
    while not (staging / name).is_file():
        assert time.monotonic() < deadline, f"{staging / name} never appeared"
        time.sleep(0.05)
    return staging


def test_sigterm_cleans_up_sigkill_leftover_is_removed_and_concurrent_builds_take_turns(tmp_path):
    stopped, killed = tmp_path / "stopped", tmp_path / "killed"
    term, kill = start("engine", "segformer", "--out", str(stopped)), start("engine", "segformer", "--out", str(killed))
    staging_with(stopped, "segformer", term.pid, "exported.onnx")
    leftover = staging_with(killed, "segformer", kill.pid, "exported.onnx")
    term.send_signal(signal.SIGTERM)
    kill.send_signal(signal.SIGKILL)
    _, err = term.communicate(timeout=60)
    kill.communicate(timeout=60)
    assert term.returncode == 128 + signal.SIGTERM and "interrupted" in err and "Traceback" not in err, err
    assert not stopped.exists()  # the staging folder and the OUT it created are gone
    assert kill.returncode == -signal.SIGKILL and leftover.is_dir() and any(leftover.iterdir())

    # Two builds of the same model into that OUT at once (another process and this one): both succeed,
    # the killed build's leftover is removed, and the folder left is one whole build (every hash checks).
    other = start("engine", "resnet", "--out", str(killed))
    build(FamilySource("resnet"), BuildRequest(killed), log=lambda _: None)
    _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert sorted(p.name for p in killed.iterdir()) == ["resnet"]
    Build.open(killed / "resnet")


PUBLISHER = textwrap.dedent(
    """
    import os, sys, time
    from aim.files import StagedFolder
    final, start, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    rename = os.replace
    def slow_rename(source, target):  # a slow disk: the window between the two renames of a swap widens
        rename(source, target)
        time.sleep(0.002)
    os.replace = slow_rename
    while time.time() < start:  # both processes publish over the same second
        time.sleep(0.001)
    rounds = 0
    while time.time() < start + seconds:
        with StagedFolder(final, lambda folder: (folder / "part0").is_file()) as staged:  # its own kind
            for index in range(3):
                (staged.path / f"part{index}").write_text(f"{os.getpid()} {rounds}")
            staged.publish()
        rounds += 1
    """
)


def test_two_processes_publishing_one_folder_take_turns(tmp_path):
    """Two processes replace one folder again and again over the same second. Without the lock, one's
    rename lands on the other's fresh folder (ENOTEMPTY) or finds it gone midway, or a .old-<pid> stays."""
    final = tmp_path / "out" / "model"
    start = time.time() + 1  # after both have imported
    publishers = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, str(final), str(start), "0.7"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for publisher in publishers:
        _, err = publisher.communicate(timeout=120)
        assert publisher.returncode == 0, err
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]
    contents = {(final / f"part{index}").read_text() for index in range(3)}
    assert len(contents) == 1  # one publisher's whole folder, not a mix


def test_a_failed_final_rename_keeps_the_previous_folder(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("the previous build")
    real_replace = os.replace

    def failing(source, target):
        if Path(source).name.startswith(".model.staging-"):
            raise OSError(28, "No space left on device", str(source))
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        with StagedFolder(final, lambda folder: (folder / "old").is_file()) as staged:
            (staged.path / "new").write_text("the new build")
            staged.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging, no .old-<pid>
    assert (final / "old").read_text() == "the previous build"


def test_a_file_of_that_name_is_not_replaced_and_leftovers_of_the_living_stay(tmp_path):
    (tmp_path / "model").write_text("the user's notes")
    with pytest.raises(FileExistsError):
        with StagedFolder(tmp_path / "model"):
            pass
    assert (tmp_path / "model").read_text() == "the user's notes"
    # leftovers: a dead process's are removed, a running one's (ours) stay
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    for name in (f".model.staging-{dead}", f".x.onnx.tmp-{dead}", f".model.staging-{os.getpid()}"):
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in files.remove_leftovers(tmp_path)) == [f".model.staging-{dead}", f".x.onnx.tmp-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.staging-{os.getpid()}", "model"]


def test_a_folder_swapped_during_the_unlocked_check_is_asked_again_under_the_lock(tmp_path):
    """The entry check runs without the lock: another publisher may move the folder away between its
    lstat and the `ours` test (its first rename), then put its own in place (its second). That is no
    reason to refuse: the check is asked again while no swap is under way."""
    final = tmp_path / "out" / "model"
    final.mkdir(parents=True)
    (final / "part0").write_text("theirs")
    swaps = []

    def ours(folder: Path) -> bool:
        if not swaps:  # the other publisher's swap, between this check's lstat and this test
            fresh = folder.with_name(".fresh")
            fresh.mkdir()
            (fresh / "part0").write_text("other publisher")
            os.replace(folder, folder.with_name(".old"))
            swaps.append(folder.exists())
            os.replace(fresh, folder)
            files.remove(folder.with_name(".old"))
            return swaps[0]
        return (folder / "part0").is_file()

    with StagedFolder(final, ours) as staged:
        (staged.path / "part0").write_text("mine")
        staged.publish()
    assert swaps == [False] and (final / "part0").read_text() == "mine"
