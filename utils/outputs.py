"""Writing results without harming files that are already there.

* ``refuse_overwrite``: the scripts find out, before they compute anything, which of the files
  they are about to write exist already, and stop with one line naming them unless the user
  passed ``--overwrite``. Other files in the same folder are never touched.
* ``atomic_write``: a file is written under a temporary name in its own folder
  (``.<name>.<random>.tmp``) and renamed over the target once complete, so an interrupted write
  leaves the previous version, never a torn file. ``temp_files`` finds such leftovers of a
  process that was killed mid-write.
"""
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

OVERWRITE_HELP = "replace result files of an earlier run that are in the way (default: stop and name them)"


def refuse_overwrite(paths: Iterable[str | os.PathLike], overwrite: bool, what: str, instead: str = "") -> None:
    """Raise FileExistsError naming the ``paths`` that exist, unless ``overwrite``.

    ``what`` says whose files they are (e.g. "--save-pred preds"); ``instead`` what else the user
    can do. Two entries of ``paths`` naming one file would overwrite each other within a single
    run: that is an error even with ``overwrite``.
    """
    paths = [Path(p) for p in paths]
    seen = set()
    for path in paths:
        if path in seen:
            raise FileExistsError(f"{what}: {path} would be written twice in this run (two inputs with one "
                                  f"name); rename one of them")
        seen.add(path)
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise FileExistsError(f"{what}: {shown} exist{'s' if len(existing) == 1 else ''} already; pass "
                              f"--overwrite to replace {'it' if len(existing) == 1 else 'them'}"
                              + (f", or {instead}" if instead else ""))


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` writes the content into the temporary file ``tmp``, which then replaces
    ``path`` in one rename. The folder is created when missing. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def temp_files(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Temporary files ``atomic_write`` left in ``folder`` for the targets ``names`` (glob
    patterns allowed): a process killed mid-write cannot remove its own."""
    folder = Path(folder)
    return sorted({p for name in names for p in folder.glob(f".{name}.*.tmp") if p.is_file()})
