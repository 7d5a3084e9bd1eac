"""Atomic writes: a new version is written beside the old one and swapped in only when complete.

A write that fails half-way (a full disk: ENOSPC, a quota, a lost mount) removes its partial copy and raises an
error that names the file it was writing; the previous version, if there was one, stays where it was, whole and
loadable, and a rerun once the cause is fixed writes the new version as if nothing had happened.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def named_failure(target: str | Path, partial: str | Path):
    """Run a write of `target` into `partial`: if it raises, `partial` (file or folder) is removed and the error
    names `target`. An OSError becomes an OSError of the same errno whose message starts with the target (its
    strerror kept, so 'No space left on device' reads as such); any other error gets a note naming it."""
    try:
        yield
    except BaseException as err:
        partial = Path(partial)
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"{target}: writing the new version failed ({err.strerror or err}); "
                                     "the previous version, if any, is kept") from err
        err.add_note(f"while writing {target} (the previous version, if any, is kept)")
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write `path` whole or not at all (a `.tmp` sibling renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with named_failure(path, tmp):
        tmp.write_text(text)
    tmp.replace(path)
