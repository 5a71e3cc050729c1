"""Writing outputs without losing anything.

* Every output is written beside its target and moved into place only once complete: a file through a
  temporary sibling and a rename, a model directory through a temporary sibling directory.
* A directory this toolkit writes carries a manifest, :data:`MANIFEST`, that lists what it wrote. An
  existing target is replaced only when it is ours (a directory whose every entry the manifest lists, or a
  JSON report whose ``written_by`` says so) and the caller asked for it (``--overwrite``). Anything else
  is never deleted, renamed or written into: the command refuses in one line.
* Files and directories get the user's umask (temporary files are created private by the libraries
  that write them).

The ``check_*`` functions run before any model or data is loaded, so a refusal costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import OutputError

MANIFEST = ".indexcache-output.json"
WRITTEN_BY = "indexcache"


# ------------------------------------------------------------------------------------------- modes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the modes a plain ``open``/``mkdir``
    would have given it under the current umask."""
    mask = _umask()
    paths = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


# --------------------------------------------------------------------------------------- ownership
def read_manifest(path: Path) -> dict | None:
    """The manifest of a directory this toolkit wrote, or None."""
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("written_by") == WRITTEN_BY else None


def _temporary(name: str) -> bool:
    """Names this module gives its temporary siblings and files (left by an interrupted write)."""
    return name.endswith(".tmp") or name.startswith(".indexcache-")


def foreign_entries(path: Path) -> list[str]:
    """Entries of directory ``path`` that this toolkit did not write (all of them when it has no manifest)."""
    m = read_manifest(path)
    ours = set(m.get("files", [])) if m else set()
    return sorted(p.name for p in Path(path).iterdir()
                  if p.name != MANIFEST and p.name not in ours and not _temporary(p.name))


def _names(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_parent(path: Path, option: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot create {option} {path}: {parent} is a file, not a directory")
            return


def check_output_dir(path: str | Path, option: str = "--out", overwrite: bool = False,
                     resume_file: str | None = None, resume: bool = False) -> Path:
    """Refuse, before any work, an output directory that cannot be written without losing something.

    Missing or empty: fine. Ours (a manifest listing every entry): replaced with ``overwrite``, continued
    with ``resume``. A file, or a directory holding anything we did not write: refused. With ``resume``, a
    directory holding ``resume_file`` (a run's state) is continued even when an older version wrote it."""
    p = Path(path)
    if str(path).strip() in ("", "."):
        p = Path.cwd()
    _check_parent(p, option)
    if not p.exists():
        return p
    if not p.is_dir():
        raise OutputError(f"{option} {path} is an existing file; give a directory (a new one, or one indexcache "
                          "wrote) for the outputs")
    entries = [e.name for e in p.iterdir() if not _temporary(e.name)]
    if not entries:
        return p
    if resume and resume_file is not None and (p / resume_file).exists():
        return p
    foreign = foreign_entries(p)
    if foreign:
        raise OutputError(f"{option} {path} holds files indexcache did not write ({_names(foreign)}); they are never "
                          "replaced, with --overwrite or without: choose another directory")
    if resume:
        return p
    hint = " or --resume to continue it" if resume_file is not None and (p / resume_file).exists() else ""
    if not overwrite:
        raise OutputError(f"{option} {path} holds an earlier indexcache output; pass --overwrite to replace it{hint}")
    return p


def check_output_file(path: str | Path, option: str = "--out", overwrite: bool = False) -> Path:
    """Refuse, before any work, an output file that would replace something: an existing file is replaced
    only when it is a report this toolkit wrote and ``overwrite`` is given."""
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise OutputError(f"{option} {path} names a directory; give a file name (e.g. report.json)")
    _check_parent(p, option)
    if not p.exists():
        return p
    if p.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name inside it (e.g. {p / 'report.json'})")
    if not _written_by_us(p):
        raise OutputError(f"{option} {path} exists and indexcache did not write it; it is never replaced, with "
                          "--overwrite or without: choose another file name")
    if not overwrite:
        raise OutputError(f"{option} {path} holds an earlier indexcache report; pass --overwrite to replace it")
    return p


def _written_by_us(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    # every report starts with {"written_by": "indexcache ..."
    return head.lstrip().startswith("{") and f'"written_by": "{WRITTEN_BY}' in head[:200]


# ----------------------------------------------------------------------------------------- writing
def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp)`` then rename over ``path``: a reader (or a crash) never sees half a file.
    The file gets the user's umask."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(path: Path, report: dict) -> None:
    """A JSON report, marked as ours (so ``--overwrite`` may later replace it), written atomically."""
    body = {"written_by": f"{WRITTEN_BY} {_version()}", **{k: v for k, v in report.items() if k != "written_by"}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), lambda p: p.write_text(json.dumps(body, indent=1) + "\n"))


def _version() -> str:
    from . import __version__

    return __version__


def _write_manifest(directory: Path, files: Iterable[str], command: str = "") -> None:
    m = {"written_by": WRITTEN_BY, "version": _version(), "command": command,
         "files": sorted(set(files) - {MANIFEST})}
    write_atomic(directory / MANIFEST, lambda p: p.write_text(json.dumps(m, indent=1) + "\n"))


def new_temp_dir(target: Path) -> Path:
    """An empty directory beside ``target`` (same file system, so it can be renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".indexcache-{target.name}.", dir=target.parent))
    apply_umask(tmp)
    return tmp


def publish_dir(tmp: Path, target: Path, overwrite: bool = False, command: str = "") -> Path:
    """Move the complete directory ``tmp`` to ``target``, writing its manifest first. An existing
    ``target`` is replaced only if it is ours and ``overwrite`` is set; the previous one is kept until the
    new one is in place, and put back if that fails."""
    _write_manifest(tmp, (p.name for p in tmp.iterdir()), command)
    apply_umask(tmp)
    if target.exists() and target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(tmp, target)
        return target
    check_output_dir(target, "output", overwrite=overwrite)
    backup = Path(tempfile.mkdtemp(prefix=f".indexcache-{target.name}.old.", dir=target.parent))
    backup.rmdir()  # a unique free name: the rename below takes it
    os.replace(target, backup)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(backup, target)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return target


class OutputDir:
    """A directory of outputs written over a run (a search's state, then its report and plots).

    ``open()`` creates it (or takes over one of ours) with a manifest; every ``write`` goes through a
    temporary sibling and a rename and is recorded in the manifest, so a later run can tell our files from
    the user's. Call :func:`check_output_dir` before any work to refuse a target that is not ours."""

    def __init__(self, path: str | Path, command: str = ""):
        self.path = Path(path)
        self.command = command
        self.files: set[str] = set()

    def open(self, fresh: bool = False) -> OutputDir:
        """Create the directory; ``fresh`` removes what an earlier run of ours left there (only the files
        its manifest lists)."""
        m = read_manifest(self.path) if self.path.is_dir() else None
        earlier = set(m.get("files", [])) if m else set()
        if fresh:
            for name in earlier:
                p = self.path / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            earlier = set()
        if m is None and self.path.is_dir():  # a run of an older version, continued with --resume
            earlier = {p.name for p in self.path.iterdir() if not _temporary(p.name)}
        self.files = earlier
        if not self.path.exists():
            self.path.mkdir(parents=True)
            apply_umask(self.path)
        _write_manifest(self.path, self.files - {MANIFEST}, self.command)
        return self

    def record(self, name: str) -> None:
        if name not in self.files:
            self.files.add(name)
            _write_manifest(self.path, self.files, self.command)

    def write(self, name: str, write: Callable[[Path], None]) -> Path:
        p = self.path / name
        write_atomic(p, write)
        self.record(name)
        return p

    def write_text(self, name: str, text: str) -> Path:
        return self.write(name, lambda p: p.write_text(text))


__all__ = ["MANIFEST", "OutputDir", "apply_umask", "check_output_dir", "check_output_file", "foreign_entries",
           "new_temp_dir", "publish_dir", "read_manifest", "write_atomic", "write_report"]
