"""Writing files and folders so that a reader never sees half of one: atomic files, staged folders
published by rename under a lock, the clean-up of what a killed process left behind, and of what
this process has half-written when it is stopped (`remove_pending`, for a signal handler)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
from pathlib import Path

# Names of the temporary files and folders below: .<name>.<kind>-<pid>[.data]
_LEFTOVER = re.compile(r"^\..+\.(tmp|staging|old)-(\d+)(\.data)?$")


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, error: type[Exception], advice: str):
    """The JSON in `path`, or `error` saying that it is not readable JSON, why, and `advice`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not readable JSON ({problem}): {advice}") from None


def folder_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file directly in `folder` (a checkpoint: config, weights, tokenizer), by name."""
    return {path.name: sha256(path) for path in sorted(Path(folder).iterdir()) if path.is_file()}


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(
            FileNotFoundError, NotADirectoryError
        ):  # gone, or a file is where its folder should be
            path.unlink()


# This process's temporary files and staging folders now being written, each with the folders made
# for it: what a stopped process removes before it exits.
_PENDING: dict[Path, list[Path]] = {}


def remove_pending() -> None:
    """Removes this process's half-written files and staging folders (and the folders made for them).
    For a signal handler that exits right after: a swap in progress is never cut (see _held)."""
    for path, created in list(_PENDING.items()):
        remove(path)
        remove_empty(created)
    _PENDING.clear()


@contextlib.contextmanager
def _held():
    """SIGINT and SIGTERM wait until the block ends (the two renames of a swap are never parted)."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def make_folder(folder: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, deepest first (to remove them again on failure)."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (someone else's files): it stays
            folder.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yields a temporary path beside `path`; renames it to `path` only if the block succeeds. On a
    failure nothing is left: neither the temporary file nor the folders made for it."""
    path = Path(path)
    created = make_folder(path.parent)
    remove_leftovers(path.parent)  # temporary files of killed writers
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    leftovers = (tmp, tmp.with_name(tmp.name + ".data"))  # torch.onnx and onnx may write weights beside it
    for leftover in leftovers:
        _PENDING[leftover] = created
    done = False
    try:
        yield tmp
        os.replace(tmp, path)
        done = True
    finally:
        for leftover in leftovers:
            _PENDING.pop(leftover, None)
            if leftover.exists() or leftover.is_symlink():
                remove(leftover)
        if not done:
            remove_empty(created)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG at `path`, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def check_writable(folder: str | os.PathLike) -> None:
    """Raises now the OSError that writing into `folder` would raise later (a file where a folder
    should be, no permission), so that a long run does not fail only at its end."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files and staging folders in `folder` whose process is gone (a build
    killed by SIGKILL or the OOM killer cannot clean up after itself); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and not _alive(int(match.group(2))):
            remove(entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on `folder` itself (flock on the directory: no lock file left behind, and the
    kernel releases it if the holder dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def _not_a_file(folder: Path) -> None:
    """A folder is replaced by a new one; a file of the user's of that name is not. One stat: another
    process may swap the folder between two."""
    try:
        mode = os.stat(folder).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISDIR(mode):
        raise FileExistsError(errno.EEXIST, "a file, not a folder, has this name", str(folder))


class StagedFolder:
    """A folder built beside its final place and published by rename, so a reader sees the old
    folder or the new one, never a mix. Used as a context manager: on an error the staging folder and
    the folders made for it are removed (on Ctrl-C or SIGTERM, the CLI's handler removes them with
    remove_pending); `publish()` swaps it in under a lock, so two processes publishing the same folder
    take turns. Leftovers of killed processes are removed on entry."""

    def __init__(self, final: str | os.PathLike):
        self.final = Path(final)
        self.path = self.final.with_name(f".{self.final.name}.staging-{os.getpid()}")
        self.published: Path | None = None
        self.created: list[Path] = []

    def __enter__(self) -> StagedFolder:
        _not_a_file(self.final)
        self.created = make_folder(self.final.parent)
        _PENDING[self.path] = self.created
        try:
            remove_leftovers(self.final.parent)
            remove(self.path)
            self.path.mkdir()
        except BaseException:
            _PENDING.pop(self.path, None)
            remove_empty(self.created)
            raise
        return self

    def publish(self, target: str | os.PathLike | None = None) -> Path:
        """Replaces `target` (default: the final folder) by the staged one."""
        target = Path(target) if target is not None else self.final
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        with _held(), folder_lock(target.parent):
            _not_a_file(target)
            if target.exists() or target.is_symlink():
                os.replace(target, old)
            try:
                os.replace(self.path, target)
            except BaseException:
                if old.exists() or old.is_symlink():
                    os.replace(old, target)  # the previous folder stays where it was
                raise
            _PENDING.pop(self.path, None)
            _PENDING[old] = []  # if stopped now, the replaced folder goes too
            self.published = target
        remove(old)
        _PENDING.pop(old, None)
        return target

    def __exit__(self, *exc) -> None:
        _PENDING.pop(self.path, None)
        if self.published is None:
            remove(self.path)
            remove_empty(self.created)  # the folders made for it: an error leaves nothing behind
