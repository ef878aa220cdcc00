"""Atomic, umask-honouring file and folder writes: the one place the library stages and renames.

Every output the library writes (wavs, converted checkpoints, tokenizer files, jsonl results, data
shards) goes through here, so that

* a reader never sees a half-written file or folder: data goes to a hidden staging name in the
  destination folder and is renamed over the final name only once complete (and fsynced);
* the result gets the permissions a plain `open()` / `mkdir()` would give under the current umask
  (`tempfile` creates 0600 files and 0700 folders, which other users and services on shared storage
  cannot read);
* an interrupted write leaves only a staging entry whose name says what it is
  (`.<name>.tmp-<random>`), which `stale_staging` finds and `remove_stale_staging` cleans up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

STAGING_MARK = ".tmp-"


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_tree(root: Path) -> None:
    """Gives `root` and everything under it the modes `mkdir`/`open` would give (umask applied)."""
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if root.is_dir():
        for dirpath, _, filenames in os.walk(root):
            os.chmod(dirpath, dir_mode)
            for name in filenames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.chmod(p, file_mode)
    else:
        os.chmod(root, file_mode)


def staging_name(path: Path) -> str:
    return f".{path.name}{STAGING_MARK}"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows opening a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[object]:
    """`with atomic_file(p) as f: f.write(...)` writes `p` atomically with umask permissions.

    On an exception the staging file is removed and `p` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=staging_name(path), dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _chmod_tree(Path(tmp))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_file(path, "wb") as f:
        f.write(data)  # type: ignore[attr-defined]
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_dir(out) as stage: <write into stage>` publishes `stage` as `out` at the end.

    The folder appears complete or not at all. With `overwrite`, an existing `out` is replaced (the
    old one is moved aside first and removed after the rename); without, an existing `out` is an
    error raised before anything is written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=staging_name(path), dir=path.parent))
    try:
        yield stage
        _chmod_tree(stage)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(stage, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def stale_staging(path: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Staging entries left next to `path` by interrupted writes of it: [(entry, bytes)]."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = staging_name(path)
    return [(p, dir_size(p)) for p in sorted(path.parent.iterdir()) if p.name.startswith(prefix)]


def remove_stale_staging(path: str | os.PathLike[str]) -> list[tuple[Path, int]]:
    """Removes what `stale_staging` finds; returns what was removed (for the caller to report)."""
    found = stale_staging(path)
    for p, _ in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ResultLog:
    """An append-only jsonl of rows keyed by "id": ids already done, and atomic per-line appends.

    Used for batch results (inference/batch.py), evaluation predictions and judge caches. Each
    append is one `write` per line on an O_APPEND descriptor, then fsync, so a killed writer loses
    at most the rows in flight; a torn last line is cut off when the file is next opened. `arg`
    names the file in errors (the launcher flag it came from).
    """

    def __init__(self, path: str | os.PathLike[str], arg: str = "--output"):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"{arg} {self.path} is a folder, not a jsonl file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # bytes up to the last complete, valid line
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn by a kill
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                break
            self.done[str(row["id"])] = row
            good += len(raw)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        # One write per line on an O_APPEND descriptor (files get the umask's mode), then fsync.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            for row in rows:
                os.write(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                self.done[str(row["id"])] = dict(row)
            os.fsync(fd)
        finally:
            os.close(fd)
