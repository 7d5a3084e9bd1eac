"""Speech synthesis for the tiny world with espeak-ng: many voices, rates, pitches and loudnesses.
Clips are written as 16 kHz wavs; a batch resumes after a kill without redoing finished clips."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from fac.data import audio

ESPEAK = "espeak-ng"
# espeak-ng's documented ranges; outside them it clamps silently or (amplitude 0) writes silence.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 99)
AMPLITUDE_RANGE = (1, 200)
JOB_KEYS = ("id", "text", "voice", "rate", "pitch", "amplitude")


def _espeak(*args: str, text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([ESPEAK, *args], input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise RuntimeError(f"{ESPEAK} is not on PATH; install it (apt-get install espeak-ng)") from error


def _voice_table(option: str) -> list[tuple[str, str]]:
    """(language, voice file) rows of `espeak-ng --voices=...`."""
    listing = _espeak(f"--voices={option}")
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


def _check_range(name: str, value, allowed: tuple[int, int], text: str) -> None:
    low, high = allowed
    if not low <= value <= high:
        raise ValueError(f"{name} {value!r} for {text!r} is outside espeak-ng's range; expected {low} to {high}")


def synthesize(text: str, voice: str, rate: int, pitch: int, amplitude: int, out_path) -> float:
    """Speak `text` into a 16 kHz wav at `out_path`; returns the clip's duration in seconds."""
    # espeak-ng exits 0 with its default voice when given an unknown one, so check first.
    check_voices([voice])
    _check_range("rate", rate, RATE_RANGE, text)
    _check_range("pitch", pitch, PITCH_RANGE, text)
    _check_range("amplitude", amplitude, AMPLITUDE_RANGE, text)
    with tempfile.TemporaryDirectory(prefix="fac-tts-") as folder:
        raw = Path(folder) / "espeak.wav"
        # Text through stdin, so that a text starting with "-" is not read as an option.
        result = _espeak("-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "-a", str(int(amplitude)),
                         "-w", str(raw), "--stdin", text=text)
        if result.returncode != 0:
            raise RuntimeError(f"{ESPEAK} failed (exit {result.returncode}) on text {text!r} with voice {voice!r}: "
                               f"{result.stderr.strip()}")
        try:
            samples = audio.read_wav(raw)  # espeak writes 22.05 kHz; read_wav resamples to 16 kHz
        except audio.AudioError as error:
            raise RuntimeError(f"{ESPEAK} wrote no usable speech for text {text!r} with voice {voice!r}: "
                               f"{error}; expected text with speakable words") from error
    audio.write_wav(out_path, samples)
    return len(samples) / audio.SAMPLE_RATE


def _check_jobs(jobs: list[dict]) -> None:
    seen = set()
    for index, job in enumerate(jobs):
        missing = [key for key in JOB_KEYS if key not in job]
        if missing:
            raise ValueError(f"tts job {index} ({job.get('id', 'no id')!r}) lacks {missing}; expected keys {list(JOB_KEYS)}")
        name = str(job["id"])
        # The id becomes a file name in out_dir: it must not reach into another folder.
        if not name or Path(name).name != name or name.startswith("."):
            raise ValueError(f"tts job {index} has id {name!r}; expected a plain file name without / or leading dot")
        if name in seen:
            raise ValueError(f"tts job id {name!r} appears twice; expected unique ids (one wav each)")
        seen.add(name)
    check_voices([job["voice"] for job in jobs])


def synthesize_all(jobs: list[dict], out_dir, workers: int = 2, desc: str = "tts") -> list[dict]:
    """Synthesise every job to out_dir/{id}.wav, skipping wavs that already exist and read fine.

    Returns the jobs in input order with `path` (the file name, relative to out_dir) and `duration` added.
    """
    _check_jobs(jobs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def run(job: dict) -> dict:
        name = f"{job['id']}.wav"
        target = out_dir / name
        if target.exists():
            try:
                # A finished clip from an earlier (killed) run: keep it. A broken one is redone.
                return dict(job, path=name, duration=len(audio.read_wav(target)) / audio.SAMPLE_RATE)
            except audio.AudioError:
                pass
        duration = synthesize(job["text"], job["voice"], job["rate"], job["pitch"], job["amplitude"], target)
        return dict(job, path=name, duration=duration)

    # Threads suffice: the work happens in espeak-ng subprocesses, outside the GIL.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(run, jobs), total=len(jobs), desc=desc, unit="clip"))
