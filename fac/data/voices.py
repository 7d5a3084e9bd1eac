"""The espeak-ng voices this machine has, and the check that params name only those.
Kept apart from synthesis (no numpy, no torch) because the workflow runs the check while it parses."""

from __future__ import annotations

import functools
import subprocess

ESPEAK = "espeak-ng"


def run_espeak(*args: str, text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([ESPEAK, *args], input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise RuntimeError(f"{ESPEAK} is not on PATH; install it (apt-get install espeak-ng)") from error


def _voice_table(option: str) -> list[tuple[str, str]]:
    """(language, voice file) rows of `espeak-ng --voices=...`."""
    listing = run_espeak(f"--voices={option}")
    if listing.returncode != 0:
        raise RuntimeError(f"{ESPEAK} --voices={option} failed: {listing.stderr.strip()}")
    rows = []
    # Columns: Pty Language Age/Gender VoiceName File [Other languages]; names use _ for spaces.
    for line in listing.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5:
            rows.append((fields[1], fields[4]))
    return rows


@functools.lru_cache(maxsize=1)
def _voices() -> tuple[str, ...]:
    # MBROLA voices (files under mb/) are listed but need the mbrola program, which is not installed.
    accents = sorted({language for language, file in _voice_table("en")
                      if language != "variant" and not file.startswith("mb/")})
    variants = sorted({file.split("/", 1)[1] for language, file in _voice_table("variant")
                       if file.startswith("!v/")})
    return tuple(accents + [f"{accent}+{variant}" for accent in accents for variant in variants])


def available_voices() -> list[str]:
    """English voice specs espeak-ng accepts: every accent, alone and as accent+variant."""
    return list(_voices())


def check_voices(voices) -> None:
    """Raise ValueError naming every voice espeak-ng does not have (it would fall back silently)."""
    known = set(_voices())
    unknown = list(dict.fromkeys(voice for voice in voices if voice not in known))  # in the order given
    if unknown:
        accents = [voice for voice in _voices() if "+" not in voice]
        raise ValueError(f"unknown espeak-ng voice(s) {unknown}; expected an English accent {accents}, "
                         f"optionally with a variant, e.g. en-us+f3, en-gb+m2")
