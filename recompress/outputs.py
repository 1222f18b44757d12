"""Every file and folder recompress writes goes through here, so no command can destroy data.

Rules:
- A folder recompress writes holds a marker file (``.recompress.json``) that lists every file it wrote
  there. Only a marked folder that holds nothing else, or an empty folder, is ever replaced, and only when
  the caller passes ``overwrite``. A plain file, a symbolic link or a folder holding anything recompress
  did not write (a file added by hand, in any subfolder) is never replaced or deleted.
- A file output (a results JSON) replaces only a file recompress wrote: a JSON object with a
  ``"recompress"`` key.
- An output may not be, contain or lie inside an input (``inputs``).
- New content is built in a temporary sibling; it takes the target's place in one atomic exchange
  (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames rolled back on failure), and the old content
  is removed only afterwards. An interrupted command leaves the old state or nothing.
- Missing parent folders are created, and removed again if the command fails. Permissions follow the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UserError

MARKER = ".recompress.json"
PathLike = str | os.PathLike


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def marker(kind: str) -> dict[str, Any]:
    """The stamp recompress puts in what it writes (folder marker file, or a key of a JSON output)."""
    return {"written_by": "recompress", "version": __version__, "kind": kind}


def _marker_of(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("written_by") == "recompress" else None


def kind_of(folder: Path) -> str | None:
    """What recompress wrote ``folder`` as (export, checkpoint, dataset, run...), by its marker; None if not ours."""
    m = _marker_of(folder)
    return m.get("kind") if m else None


def _write_marker(folder: Path, m: dict[str, Any]) -> None:
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(m) + "\n")
    os.replace(tmp, folder / MARKER)


def _walk(folder: Path) -> list[str]:
    """Every file under ``folder`` at any depth (relative, posix), the nested markers included; a link is
    listed as a file (never followed)."""
    files: list[str] = []
    for root, dirs, names in os.walk(folder):
        r = Path(root)
        names += [d for d in dirs if (r / d).is_symlink()]
        dirs[:] = [d for d in dirs if not (r / d).is_symlink()]
        files += [(r / n).relative_to(folder).as_posix() for n in names]
    return sorted(f for f in files if f != MARKER)


def foreign(folder: PathLike) -> list[str]:
    """What lies in the marked ``folder`` that recompress did not write there (relative paths, sorted)."""
    folder = Path(folder)
    listed = (_marker_of(folder) or {}).get("files")
    files = _walk(folder)
    if not isinstance(listed, list):  # no marker, or one from a version that did not list its files
        return files
    known = set(listed)
    # a marked folder inside, whose marker recompress wrote there, accounts for its own files
    subs = sorted({f[:-len(MARKER) - 1] for f in known if f.endswith("/" + MARKER) and (folder / f).is_file()},
                  key=len, reverse=True)
    bad_in = {sub: set(foreign(folder / sub)) for sub in subs}
    out = []
    for f in files:
        if f in known:
            continue
        sub = next((x for x in subs if f.startswith(x + "/")), None)
        if sub is None or f[len(sub) + 1:] in bad_in[sub]:
            out.append(f)
    return out


def _record(folder: Path, kind: str) -> None:
    """Write the marker of ``folder``, a folder this command wrote whole, listing every file in it."""
    _write_marker(folder, {**marker(kind), "files": _walk(folder)})


def _tell_owner(target: Path, names: Iterable[str] = ("",), home: Path | None = None) -> None:
    """Add ``names`` (paths relative to ``target``; "" is ``target`` itself), just written by recompress, to
    the files listed by ``home`` or else by the nearest marked folder above ``target``, if there is one."""
    if home is None:
        home = next((p for p in _real(target).parents if is_ours(p)), None)
        if home is None:
            return
    rel = _real(target).relative_to(home)
    m = _marker_of(home) or marker("dir")
    _write_marker(home, {**m, "files": sorted({*m.get("files", []), *((rel / n).as_posix() for n in names)})})


def _foreign_error(target: Path, found: list[str]) -> UserError:
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return UserError(f"output {target} holds files recompress did not write ({shown})",
                     "recompress never replaces it; move those files out or pass a new path")


def is_ours(path: PathLike) -> bool:
    """True for a folder with recompress's marker, or a JSON file recompress wrote."""
    p = Path(path)
    if p.is_symlink():
        return False
    if p.is_dir():
        return _marker_of(p) is not None
    if p.is_file():
        try:
            with open(p, "rb") as f:
                if f.read(1) != b"{":
                    return False
            return json.loads(p.read_text()).get("recompress", {}).get("written_by") == "recompress"
        except (OSError, ValueError, AttributeError):
            return False
    return False


def _real(p: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def _overlap(target: Path, inputs: Iterable[PathLike]) -> None:
    t = _real(target)
    for i in inputs:
        if i is None:
            continue
        s = _real(i)
        if t == s:
            raise UserError(f"output {target} is the input {i}", "write the result to a new path")
        if s in t.parents:
            raise UserError(f"output {target} lies inside the input {i}", "write the result outside the input")
        if t in s.parents:
            raise UserError(f"output {target} contains the input {i}", "write the result to a path that does "
                            "not hold the input")


def check_output(target: PathLike, *, kind: str = "dir", overwrite: bool = False,
                 inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse, before any work is done, an output that could not be written or would destroy data."""
    target = Path(target)
    _overlap(target, inputs)
    if target.is_symlink():
        raise UserError(f"output {target} is a symbolic link", "recompress never replaces links; pass another path")
    if kind == "dir":
        if target.exists() and not target.is_dir():
            raise UserError(f"output {target} is a file, not a folder recompress wrote",
                            "recompress never replaces it; pass another path")
        if target.is_dir():
            if any(target.iterdir()):
                found = foreign(target) if is_ours(target) else sorted(p.name for p in target.iterdir())
                if found:
                    raise _foreign_error(target, found)
            if not overwrite:
                raise UserError(f"output {target} already exists", "choose another path or pass --overwrite")
    else:
        if target.is_dir():
            raise UserError(f"output {target} is a folder", "pass a file path, e.g. results.json")
        if target.exists() and not is_ours(target):
            raise UserError(f"output {target} exists and was not written by recompress",
                            "recompress never replaces it; pass another path")
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"output {target}: {parent} is a file, not a folder", "pass another path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"output folder {parent} is not writable", "pass a path you can write to")
            break
    return target


def _make_parents(target: Path) -> list[Path]:
    """Create missing parents of ``target``; returns those created, deepest last."""
    missing = [p for p in reversed(target.absolute().parents) if not p.exists()]
    for p in missing:
        p.mkdir()
    return missing


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_in(tmp: Path, target: Path) -> Path | None:
    """Put ``tmp`` at ``target``. Returns where the old content now is (to delete), or None."""
    if not target.exists() and not target.is_symlink():
        os.rename(tmp, target)
        return None
    if exchange(tmp, target):
        return tmp  # tmp now holds the old content
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # roll back
        raise
    return old


def _discard(path: Path) -> None:
    """Delete a folder or file recompress itself staged or replaced (never called on foreign paths)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def output_dir(target: PathLike, *, kind: str, overwrite: bool = False,
               inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it becomes ``target`` (marked as ours)."""
    target = check_output(target, kind="dir", overwrite=overwrite, inputs=inputs)
    created = _make_parents(target)
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent))
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _record(tmp, kind)
        check_output(target, kind="dir", overwrite=overwrite, inputs=inputs)  # nothing changed meanwhile
        old = _swap_in(tmp, target)
        tmp = None
        if old is not None:
            _discard(old)
        _tell_owner(target, [MARKER, *_walk(target)])  # e.g. a cached step inside a run folder
    except BaseException:
        if tmp is not None:
            _discard(tmp)
        _remove_created(created)
        raise


@contextlib.contextmanager
def output_file(target: PathLike, *, inputs: Iterable[PathLike] = (), owner: PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success it replaces ``target``.

    ``owner``: a folder recompress wrote (marked) that holds ``target``; files inside it may be replaced.
    """
    target = Path(target)
    inside = owner is not None and is_ours(owner) and _real(owner) in _real(target).parents
    if inside:
        _overlap(target, inputs)
        name = _real(target).relative_to(_real(owner)).as_posix()
        listed = (_marker_of(Path(owner)) or {}).get("files") or []
        if (target.exists() or target.is_symlink()) and name not in listed and not is_ours(target):
            raise _foreign_error(Path(owner), [name])
    else:
        target = check_output(target, kind="file", inputs=inputs)
    created = _make_parents(target)
    tmp: Path | None = None
    try:
        fd, staged = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.absolute().parent)
        os.close(fd)
        tmp = Path(staged)
        os.chmod(tmp, 0o666 & ~_umask())
        yield tmp
        if owner is None:
            check_output(target, kind="file", inputs=inputs)
        os.replace(tmp, target)  # atomic for files
        tmp = None
        _tell_owner(target, home=_real(owner) if inside else None)
    except BaseException:
        if tmp is not None:
            _discard(tmp)
        _remove_created(created)
        raise


def write_json(obj: dict[str, Any], target: PathLike, kind: str, inputs: Iterable[PathLike] = (),
               owner: PathLike | None = None) -> Path:
    """Write a JSON object, stamped as recompress's, atomically to ``target``."""
    with output_file(target, inputs=inputs, owner=owner) as tmp:
        tmp.write_text(json.dumps({"recompress": marker(kind), **obj}, indent=2, default=str) + "\n")
    return Path(target)


@contextlib.contextmanager
def run_folder(target: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """A run folder, written step by step so that an interrupted run resumes.

    An existing run folder is resumed; with ``overwrite`` a new run is built aside and swapped in only
    when it completes. A new folder is created (marked); if the run fails before it holds anything but
    the marker, it is removed again.
    """
    target = Path(target)
    if target.is_dir() and is_ours(target) and not overwrite:
        _overlap(target, inputs)
        yield target  # what the run writes is added to the marker as it is written
        return
    if overwrite and target.exists():
        with output_dir(target, kind="run", overwrite=True, inputs=inputs) as tmp:
            _record(tmp, "run")
            yield tmp
        return
    check_output(target, kind="dir", overwrite=True, inputs=inputs)  # absent, or an empty folder
    created = _make_parents(target)
    existed = target.exists()
    target.mkdir(exist_ok=True)
    _record(target, "run")
    _tell_owner(target, [MARKER])  # a run inside a run (a bench of several recipes)
    try:
        yield target
    except BaseException:
        if {p.name for p in target.iterdir()} <= {MARKER, "cache"} and not any((target / "cache").glob("*")):
            _discard(target / "cache")
            (target / MARKER).unlink()
            if not existed:
                target.rmdir()
            _remove_created(created)
        raise
