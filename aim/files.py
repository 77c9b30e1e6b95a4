"""Writing files and folders so that a reader never sees half of one: atomic files, staged folders
published by rename under a lock, the clean-up of what a killed process left behind, and of what
this process has half-written when it is stopped (`remove_pending`, for a signal handler).

What a write may replace, the one rule every writer here obeys (docs/mistakes.md says it to users):
- a file (`atomic_path`): nothing, or a regular file; never a device (`-o /dev/null`), a pipe, a
  socket, a folder or a symbolic link;
- a folder (`StagedFolder`): nothing, an empty folder, or a folder its writer recognises as its own
  (`ours`: a build folder holds this project's build manifest); never a file or a symbolic link;
- never a folder that is, holds or lies inside what the output is made from (`sources`: a checkpoint
  folder, a user's ONNX file, a key file).
Anything else is refused before any work, with `WriteRefused` (an `error:` line, exit 2), and nothing is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from aim.errors import AimError

# Names of the temporary files and folders below: .<name>.<kind>-<pid>[.data]
_LEFTOVER = re.compile(r"^\..+\.(tmp|staging|old)-(\d+)(\.data)?$")


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


OURS = "a folder this tool wrote (a build folder holds this tool's manifest.json)"


class WriteRefused(AimError):
    """A write would replace what is not its own: a device, a user's folder, its own source."""


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def check_file_replaceable(path: str | os.PathLike) -> None:
    """A file is written only where nothing is, or over a regular file (the rule above)."""
    found = _lstat(Path(path))
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise WriteRefused(
            f"{path} is {_kind(found.st_mode)}, not a regular file: only a regular file is ever replaced. "
            "Give the path of a file to write"
        )


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_apart(folder: str | os.PathLike, sources: Iterable[str | os.PathLike | None]) -> None:
    """`folder` (to be replaced) neither is, holds nor lies inside any of `sources` (paths it is made
    from; None entries are skipped). Symbolic links are resolved: two spellings of one place are one."""
    target = Path(folder).resolve()
    for source in sources:
        if source is None:
            continue
        where = Path(source).resolve()
        if _within(target, where) or _within(where, target):
            relation = "is" if target == where else ("lies inside" if _within(target, where) else "holds")
            raise WriteRefused(
                f"the output folder {folder} {relation} {source}, which it is made from: writing it would replace "
                "its own source. Give an output folder outside it (--out elsewhere, e.g. --out build)"
            )


def check_folder_replaceable(
    folder: str | os.PathLike, ours: Callable[[Path], bool] | None = None, what: str = OURS
) -> None:
    """A folder is written only where nothing is, over an empty folder, or over a folder `ours`
    recognises as one this project wrote (the rule above). One lstat: another process may swap it."""
    folder = Path(folder)
    found = _lstat(folder)
    if found is None:
        return
    if not stat.S_ISDIR(found.st_mode):
        if stat.S_ISLNK(found.st_mode) or not stat.S_ISREG(found.st_mode):
            raise WriteRefused(
                f"{folder} is {_kind(found.st_mode)}: only {what} is ever replaced. Move it, or write elsewhere"
            )
        raise FileExistsError(errno.EEXIST, "a file, not a folder, has this name", str(folder))
    try:
        with os.scandir(folder) as entries:
            empty = next(entries, None) is None
    except OSError:
        empty = False
    if not empty and not (ours is not None and ours(folder)):
        raise WriteRefused(
            f"{folder} exists and is not {what}: it is never replaced. Move it, or write elsewhere "
            "(another --out, or rename the source)"
        )


def read_json(path: str | os.PathLike, error: type[Exception], advice: str):
    """The JSON in `path`, or `error` saying that it is not readable JSON, why, and `advice`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} is not readable JSON ({problem}): {advice}") from None


def _npy_fits(handle, data_bytes: int, name: str) -> None:
    """Reads an .npy header from `handle` (at its start) and raises ValueError unless the array it
    claims (shape x dtype) fits in the `data_bytes` the file holds, header included."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(handle)
        header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        shape, _, dtype = header(handle) if header else npy._read_array_header(handle, version)
    except (ValueError, SyntaxError, TypeError) as error:
        raise ValueError(f"{name}: its .npy header is not readable ({error})") from None
    needed = handle.tell() + math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and needed > data_bytes:
        raise ValueError(
            f"{name}: its header claims an array of shape {tuple(shape)} {dtype} ({_size(needed)}), but the file "
            f"holds {_size(data_bytes)}: the file is damaged or cut short"
        )


def _size(count: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def load_arrays(path: str | os.PathLike):
    """np.load(path, allow_pickle=False) (an array for .npy, an NpzFile for .npz) once every array's
    header has been checked against the bytes the file holds: a header that claims 12 TB is a
    ValueError saying so, not an allocation that fails (or succeeds) on the claim. OSError and
    ValueError as np.load raises them."""
    import zipfile

    import numpy as np

    path = Path(path)
    with open(path, "rb") as handle:
        is_npy = handle.read(6) == b"\x93NUMPY"
        if is_npy:
            handle.seek(0)
            _npy_fits(handle, os.fstat(handle.fileno()).st_size, str(path))
    if not is_npy and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    if member.filename.endswith(".npy"):
                        with archive.open(member) as handle:
                            _npy_fits(handle, member.file_size, f"{path}: {member.filename}")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as error:
            raise ValueError(f"{path}: not a readable .npz archive ({error})") from None
    return np.load(path, allow_pickle=False)


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
    check_file_replaceable(path)  # before anything is made
    created = make_folder(path.parent)
    remove_leftovers(path.parent)  # temporary files of killed writers
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    leftovers = (tmp, tmp.with_name(tmp.name + ".data"))  # torch.onnx and onnx may write weights beside it
    for leftover in leftovers:
        _PENDING[leftover] = created
    done = False
    try:
        yield tmp
        check_file_replaceable(path)  # again: the block may have run for minutes
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


class StagedFolder:
    """A folder built beside its final place and published by rename, so a reader sees the old
    folder or the new one, never a mix. Used as a context manager: on an error the staging folder and
    the folders made for it are removed (on Ctrl-C or SIGTERM, the CLI's handler removes them with
    remove_pending); `publish()` swaps it in under a lock, so two processes publishing the same folder
    take turns. Leftovers of killed processes are removed on entry.

    It replaces only what the rule above allows: `ours` recognises a folder of its writer's (default:
    none, so only an empty folder is replaced), and the folder must lie apart from `sources`. Both are
    checked on entry, before any work, and again under the lock when publishing."""

    def __init__(
        self,
        final: str | os.PathLike,
        ours: Callable[[Path], bool] | None = None,
        sources: Iterable[str | os.PathLike | None] = (),
        what: str = OURS,
    ):
        self.final = Path(final)
        self.ours, self.sources, self.what = ours, tuple(sources), what
        self.path = self.final.with_name(f".{self.final.name}.staging-{os.getpid()}")
        self.published: Path | None = None
        self.created: list[Path] = []

    def check(self, target: Path, locked: bool = False) -> None:
        """Raises unless a publish may replace `target` (the rule above). Unlocked, a refusal is asked
        again under the lock: another publisher may have been between the two renames of its swap."""
        check_apart(target, self.sources)
        try:
            check_folder_replaceable(target, self.ours, self.what)
        except WriteRefused:
            if locked or not target.parent.is_dir():
                raise
            with folder_lock(target.parent):
                check_folder_replaceable(target, self.ours, self.what)

    def __enter__(self) -> StagedFolder:
        self.check(self.final)
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
        self.check(target)  # before the lock: a refusal creates no folder for it
        with _held(), folder_lock(target.parent):
            self.check(target, locked=True)
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

    def discard(self, folder: str | os.PathLike) -> None:
        """Removes `folder` (a build's superseded `.failed` sibling) if it is one of this writer's own."""
        folder = Path(folder)
        found = _lstat(folder)
        if found is not None and stat.S_ISDIR(found.st_mode) and self.ours is not None and self.ours(folder):
            remove(folder)

    def __exit__(self, *exc) -> None:
        _PENDING.pop(self.path, None)
        if self.published is None:
            remove(self.path)
            remove_empty(self.created)  # the folders made for it: an error leaves nothing behind
