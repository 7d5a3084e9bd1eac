"""Fault injection for the reliability tests: SIGKILL at a named point of the work, once.

The kill matrix (tests/test_kill_matrix.py, tests/test_reliability.py) kills a job in the middle of its work and
checks that rerunning the same command ends with the outputs of a run that was never killed. Code marks the places
where a kill is worth testing with `point("<place>")`; nothing happens unless `FAC_FAULTS` is set:

    FAC_FAULTS="tts@3,group:saved.encoder@1,write.stage1"   FAC_FAULTS_FIRED=/some/folder

Each item is `[group:]place[@n]`: on the n-th `point(place)` of a process (n = 1 when left out), SIGKILL the process
itself, or with `group:` its whole process group (a `snakemake` started in its own session, and all its jobs). Each
item fires once across processes and reruns: its marker is created in `FAC_FAULTS_FIRED` (O_EXCL) just before the
kill, holding the pid and the command line, so that a rerun with the same environment passes the point and the test
can see which faults fired.

Places: `tts` (a clip spoken), `asr` (a chunk of clips judged), `speech_tokens` (a clip tokenised),
`saved.<stage>` (a training stage's resume point written), `write.<name>` (a file or checkpoint folder written
whole, before its rename: `write.stage1`, `write.report.html`), `answers` (an evaluation question answered),
`preferences` (a batch of preference candidates generated).
"""
from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

_SPEC = re.compile(r"^(group:)?([A-Za-z0-9_.\-]+)(?:@([1-9][0-9]*))?$")
_seen: dict[str, int] = {}


def planned(spec: str | None = None) -> list[tuple[bool, str, int]]:
    """The items of `FAC_FAULTS` (or `spec`) as (whole group, place, n); a malformed item is named."""
    spec = os.environ.get("FAC_FAULTS", "") if spec is None else spec
    items = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        match = _SPEC.match(item)
        if not match:
            raise ValueError(f"FAC_FAULTS: {item!r} is not [group:]place[@n] (n >= 1)")
        items.append((bool(match.group(1)), match.group(2), int(match.group(3) or 1)))
    return items


def marker_name(group: bool, place: str, n: int) -> str:
    return f"{'group-' if group else ''}{place}@{n}"


def point(place: str) -> None:
    """A place where the reliability tests may kill this process (see the module's docstring)."""
    if not os.environ.get("FAC_FAULTS"):
        return
    _seen[place] = count = _seen.get(place, 0) + 1
    for group, where, n in planned():
        if where != place or n != count:
            continue
        fired = os.environ.get("FAC_FAULTS_FIRED")
        if not fired:
            raise RuntimeError("FAC_FAULTS is set without FAC_FAULTS_FIRED (the folder of the faults' markers)")
        Path(fired).mkdir(parents=True, exist_ok=True)
        try:
            handle = os.open(Path(fired) / marker_name(group, place, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # fired in an earlier run: this rerun goes on
        os.write(handle, f"{os.getpid()} {' '.join(sys.argv)}\n".encode())
        os.fsync(handle)
        os.close(handle)
        if group:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
