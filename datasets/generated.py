"""Where the generated sets (demo, demo_clips) may be written, and writing them atomically.

A generator writes only into a folder that is absent, empty, or carries the marker file it writes
itself (``demo_info.json``, ``demo_clips_info.json``: the last file of a complete set). Any other
folder belongs to the user: it is never written into, renamed or deleted, whatever its content.
An outdated set of our own (its marker records another version, seed or size) is replaced, and
only when the folder holds nothing but what the generator writes.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

from .base import DatasetError, DatasetNotFoundError


def read_marker(root: Path, marker: str) -> dict[str, Any] | None:
    """The marker's content when ``root`` is a set we generated (of any version), else None."""
    try:
        info = json.loads((root / marker).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("version"), int) else None


def set_version(root: Path, marker: str) -> int | None:
    """The generator version recorded in a set of ours, None for any other folder."""
    info = read_marker(root, marker)
    return None if info is None else info["version"]


def require_existing_root(root: str | os.PathLike, what: str, hint: str) -> Path:
    """An explicitly given data root must exist: a typo is an error, not a new set in a new place."""
    path = Path(root).expanduser()
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise DatasetNotFoundError(f"{what}: data root {path} {problem}. {hint}")
    return path


def ensure_generated(root: Path, marker: str, expected: Mapping[str, Any], entries: Collection[str],
                     build: Callable[[Path], object], what: str, hint: str) -> bool:
    """Make ``root`` hold the set whose marker records ``expected``, building it with
    ``build(path)`` if needed; returns whether it was (re)generated.

    ``entries``: the top-level names the generator writes (the marker among them); ``what`` names
    the set and ``hint`` says what to do instead, in the error for a folder that is not ours.
    """
    if _is_current(root, marker, expected):
        return False
    info = read_marker(root, marker)
    if root.exists():
        if not root.is_dir():
            raise DatasetError(f"{what}: {root} is a file, not a folder; nothing was written. {hint}")
        present = set(os.listdir(root))
        if info is None and present:
            raise DatasetError(f"{what}: {root} is neither empty nor a {what} made earlier (no {marker}); "
                               f"nothing was written into it. {hint}")
        foreign = sorted(present - set(entries))
        if foreign:
            raise DatasetError(f"{what}: {root} is an outdated {what} that also holds files it did not "
                               f"write ({', '.join(foreign[:5])}); nothing was changed. Move them elsewhere, "
                               f"or point to another folder. {hint}")
    generate_atomically(root, build, lambda path: _is_current(path, marker, expected))
    return True


def _is_current(root, marker, expected):
    info = read_marker(root, marker)
    return info is not None and all(info.get(k) == v for k, v in expected.items())


def generate_atomically(root: Path, build: Callable[[Path], object], is_current: Callable[[Path], bool]) -> Path:
    """Create ``root`` with ``build(path)`` without ever exposing half of it.

    ``build`` writes into a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half-written set, and concurrent processes (MPI ranks) race to
    rename: the loser deletes its own copy and uses the winner's. ``root`` is absent, an empty
    folder (a rename replaces it) or, vetted by ``ensure_generated``, an outdated set of ours,
    which is moved aside and deleted. Returns ``root``.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp / "set")
        if root.exists() and any(root.iterdir()):
            if is_current(root):                            # another process won the race
                return root
            os.replace(root, tmp / "outdated")              # deleted with tmp below
        try:
            os.replace(tmp / "set", root)
        except OSError:
            if not is_current(root):
                raise
        return root
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
