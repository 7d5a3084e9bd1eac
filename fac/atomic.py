"""Atomic writes: a new version is written beside the old one and swapped in only when complete.

A write that fails half-way (a full disk: ENOSPC, a quota, a lost mount) removes its partial copy and raises an
error that names the file it was writing; the previous version, if there was one, stays where it was, whole and
loadable, and a rerun once the cause is fixed writes the new version as if nothing had happened.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from fac import faults


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


def write_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write `path` whole or not at all: `write(temporary)` fills a hidden temporary file in the same folder (its
    own name), which is renamed over `path` when `write` returns. Hidden temporaries of the same file left by a
    writer killed before its rename are removed first, so one file has one writer at a time (rank 0 in a
    distributed job). Parent folders are created; a folder that cannot hold the file is named."""
    path = Path(path)
    # Left by a writer killed before its rename (SIGKILL): mkstemp's names are the prefix, 8 random characters and
    # the suffix, so this matches this file's temporaries only, not those of a file whose name extends this one.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"):
        stale.unlink(missing_ok=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OSError(error.errno, f"{path.parent}: cannot write {path.name} in this folder ({error}); "
                                   "expected a writable folder") from error
    os.close(handle)
    with named_failure(path, temporary):
        write(Path(temporary))
    faults.point(f"write.{path.name}")
    os.replace(temporary, path)


@contextmanager
def folder(out_dir: str | Path):
    """Write a checkpoint folder under a temporary name and swap it in only when complete.

    A job killed while writing leaves the previous folder (or none), never a half-written one.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with named_failure(out, tmp):  # a failed write (a full disk) removes tmp and names out
        yield tmp
    faults.point(f"write.{out.name}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file whole or not at all (`write_file`)."""
    write_file(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
