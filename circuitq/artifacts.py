"""Atomic outputs: everything is written to a temporary sibling and renamed into place, so a
failure never leaves a half-written file or directory, and nothing is overwritten without
``overwrite=True``. Temporary names carry the writer's process id (``.OUT.tmp-PID-*``), so a
later writer removes what a killed one left behind; outputs get the user's umask, not the
owner-only modes of ``tempfile``.

The final rename never replaces an output that another process created while this one worked,
unless ``overwrite`` was given (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a hard link for
files and an exclusive ``mkdir`` for folders). A full disk ends in :class:`OutOfSpace`, one line
that names the output and the sizes."""
from __future__ import annotations

import csv
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from circuitq.errors import Busy, CircuitqError, OutOfSpace, UsageError, human_bytes, is_out_of_space


class OutputExists(CircuitqError, FileExistsError):
    pass


class OutputNotWritable(CircuitqError, ValueError):
    pass


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _renameat2(src: Path, dst: Path) -> bool:
    """``rename(src, dst)`` that fails with ``FileExistsError`` when ``dst`` exists (atomic, Linux).
    False where the call or the file system does not support it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically, refusing (``FileExistsError``) an existing ``dst``."""
    if _renameat2(src, dst):
        return
    if src.is_dir():
        os.mkdir(dst)             # the claim: exactly one writer's mkdir succeeds
        os.replace(src, dst)      # replaces the empty folder just made
    else:
        os.link(src, dst)
        os.unlink(src)


def _finish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Put the finished ``tmp`` at ``out``: never over an ``out`` that appeared meanwhile unless
    ``overwrite``; with ``overwrite`` the old one goes aside first, then away."""
    if not overwrite:
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise OutputExists(f"{out} was created by another process while this one worked; it was left as it is "
                               "and this result discarded (pass --overwrite to replace it, or choose another --out)"
                               ) from None
        return
    if not tmp.is_dir():
        os.replace(tmp, out)      # atomic for a file, whatever is there
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    try:
        for i in range(5):        # a folder cannot be renamed over a full one: move the old one aside first
            if out.exists() or out.is_symlink():
                try:
                    os.replace(out, trash / str(i))
                except FileNotFoundError:
                    pass
            try:
                rename_noreplace(tmp, out)
                return
            except FileExistsError:
                continue          # another writer put one there between the two renames
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    raise OutputExists(f"{out} keeps being recreated by another process; choose another --out")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _out_of_space(out: Path, tmp: Path, need_bytes: int | None) -> OutOfSpace:
    written = _size(tmp)
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:
        free = 0
    need = (f"needed about {human_bytes(need_bytes)}" if need_bytes and need_bytes > written
            else f"{human_bytes(written)} were written before it ran out")
    return OutOfSpace(f"no space left on device while writing {out} ({need}, {human_bytes(free)} free there); "
                      "nothing was left behind: free some space or choose an --out on another disk")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _modes(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID-*`` siblings of ``out`` whose writer process
    is gone (a kill -9 leaves them). Returns what was removed."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _probe(folder: Path) -> None:
    """Create and remove one empty file in ``folder``: raises the ``OSError`` a real write would."""
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=folder)
    os.close(fd)
    os.remove(probe)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read 4 MB at a time."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing ``out`` without ``overwrite``, and an ``out`` whose folder cannot be
    created or written (found before any work, not at export time)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _probe(parent)
    except OSError as e:
        raise OutputNotWritable(f"cannot write next to {out} ({e.strerror or e.__class__.__name__}); choose an --out "
                                "in a writable folder") from None
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block succeeds. ``need_bytes``:
    the expected size, named if the disk fills up."""
    out = check_writable(out, overwrite)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    _modes(tmp, True)
    try:
        try:
            yield tmp
            _finish(tmp, out, overwrite)
        except Exception as e:
            if is_out_of_space(e) and not isinstance(e, OutOfSpace):
                raise _out_of_space(out, tmp, need_bytes) from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: str | Path, overwrite: bool = False, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path that is renamed to ``out`` when the block succeeds."""
    out = check_writable(out, overwrite)
    clean_stale(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            if os.path.exists(tmp):
                _modes(Path(tmp), False)
            _finish(Path(tmp), out, overwrite)
        except Exception as e:
            if is_out_of_space(e) and not isinstance(e, OutOfSpace):
                raise _out_of_space(out, Path(tmp), need_bytes) from None
            raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path, flag: str):
    """A JSON file a user named with ``flag``; one line for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{flag} {p}: no such file")
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{flag} {p} is not readable JSON ({e.__class__.__name__}: {e}); pass the .json a circuitq "
                         "command wrote") from None


# an indented list of numbers: only indentation puts a raw newline after "[" (JSON strings escape theirs)
_NUMBER_LIST = re.compile(r"\[\n\s*((?:-?[0-9][0-9.eE+-]*|null|NaN|-?Infinity)(?:,\n\s*(?:-?[0-9][0-9.eE+-]*|null|NaN|-?Infinity))*)\n\s*\]")


def write_json(path: str | Path, obj, overwrite: bool = True, compact_lists: bool = False) -> None:
    """``obj`` as indented JSON, written atomically. ``compact_lists``: lists of plain numbers on one
    line each (per-item vectors stay readable and the file ~5x smaller); the same JSON value."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    if compact_lists:
        text = _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(text + "\n")


def csv_text(rows: list[dict]) -> str:
    """Rows as CSV text; the columns are the union of the rows' keys, in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | Path, rows: list[dict], overwrite: bool = True) -> None:
    """The one CSV writer (atomic)."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(csv_text(rows))


def check_dir_writable(folder: str | Path, flag: str = "--out", create: bool = False) -> Path:
    """Prove ``folder`` writable with a probe file, before any work. A folder that does not exist yet
    is created with ``create``, else its nearest existing parent is probed (nothing left behind)."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe_in = folder
        while not probe_in.exists() and probe_in != probe_in.parent:
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise NotADirectoryError(20, "not a directory")
        _probe(probe_in)
    except OSError as e:
        raise OutputNotWritable(f"cannot write in {folder} ({e.strerror or e.__class__.__name__}); choose a {flag} in a "
                                "writable folder") from None
    return folder


LOCK_NAME = ".circuitq.lock"


@contextmanager
def exclusive(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on ``FOLDER/.circuitq.lock``, released when
    the block ends or the process dies) so that two processes never write one run at once."""
    folder = check_dir_writable(folder, create=True)
    fh = open(folder / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"

            raise Busy(f"another circuitq process (pid {pid}) is writing the {what} in {folder}; wait for it to "
                       "finish, or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()


def safe_name(text: str, limit: int = 60) -> str:
    """A file-name part made from user text (a task name, a job name): letters, digits, ``-``, ``_``
    and ``.`` only, no leading dot, at most ``limit`` characters. Text that had to change gets a
    short hash of the original, so two different names never share a file."""
    slug = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-_." else "-" for ch in text)
    slug = "-".join(p for p in slug.split("-") if p).lstrip(".")[:limit] or "x"
    if slug != text:
        slug = f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return slug


def inside(folder: str | Path, name: str) -> Path:
    """``folder / name``, refused (``ValueError``) unless it stays inside ``folder`` once resolved."""
    base = Path(folder).resolve()
    p = (base / name).resolve()
    if p.parent != base and base not in p.parents:
        raise OutputNotWritable(f"{name!r} would be written outside {base}; refusing")
    return p
