"""Speech synthesis, one component with two engines (`tts.engine`): `espeak-ng` (the tiny world: many voices, rates,
pitches and loudnesses) or `command` (any synthesiser, e.g. a CosyVoice 3 install, run from a command template).
Clips are written as 16 kHz wavs; a batch resumes after a kill without redoing finished clips."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from fac import faults
from fac.data import audio, templates
from fac.data.voices import ESPEAK, check_voices, run_espeak

log = logging.getLogger("fac.data")

# espeak-ng's documented ranges; outside them it clamps silently or (amplitude 0) writes silence.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 99)
AMPLITUDE_RANGE = (1, 200)
JOB_KEYS = ("id", "text", "voice", "rate", "pitch", "amplitude")


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
        result = run_espeak("-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "-a", str(int(amplitude)),
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


class EspeakEngine:
    """engine `espeak-ng`: voices are espeak-ng voice specs (checked against the installed ones), rate in words per
    minute, pitch 0-99, amplitude linear (100 = default)."""

    folder = "wavs"  # where its clips live under tts/

    def check_voices(self, voices) -> None:
        check_voices(voices)

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, amplitude: int, out_path) -> float:
        return synthesize(text, voice, rate, pitch, amplitude, out_path)


class CommandEngine:
    """engine `command`: an external synthesiser run through bash from a template with `{text}`, `{voice}` and
    `{out}` (a wav path to write, any sample rate), optionally `{rate}`, `{pitch}`, `{amplitude}`; every value is
    shell-quoted. Voices are whatever the synthesiser accepts: each is checked by speaking one short clip with it."""

    KEY, FIELDS, REQUIRED = templates.TTS_COMMAND
    CHECK_TEXT = "hello"

    def __init__(self, template: str):
        self.template = templates.check_template(template, self.KEY, self.FIELDS, self.REQUIRED)
        # Clips of another synthesiser are other clips: each command template has its own folder.
        self.folder = f"wavs-command-{hashlib.sha256(template.encode()).hexdigest()[:10]}"

    def check_voices(self, voices) -> None:
        with tempfile.TemporaryDirectory(prefix="fac-tts-check-") as folder:
            for voice in dict.fromkeys(voices):
                self.synthesize(self.CHECK_TEXT, voice, 160, 50, 100, Path(folder) / "check.wav")

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, amplitude: int, out_path) -> float:
        with tempfile.TemporaryDirectory(prefix="fac-tts-") as folder:
            raw = Path(folder) / "out.wav"
            values = {"text": text, "voice": voice, "rate": int(rate), "pitch": int(pitch),
                      "amplitude": int(amplitude), "out": str(raw)}
            command = templates.fill(self.template, values)
            templates.run(command, self.KEY, f" on text {text!r} with voice {voice!r}")
            try:
                samples = audio.read_wav(raw)
            except audio.AudioError as error:
                raise RuntimeError(f"tts.command wrote no usable speech for text {text!r} with voice {voice!r}: "
                                   f"{error} (command: {command})") from error
        audio.write_wav(out_path, samples)
        return len(samples) / audio.SAMPLE_RATE


def engine(tts_params: dict):
    """The synthesiser that `tts_params` (the `tts` section) names."""
    name = tts_params["engine"]
    if name == "espeak-ng":
        return EspeakEngine()
    if name == "command":  # a missing template is refused by CommandEngine, naming what it lacks
        return CommandEngine(tts_params.get("command", ""))
    raise ValueError(f"tts.engine {name!r}: unknown; expected espeak-ng or command")


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


def synthesize_all(jobs: list[dict], out_dir, workers: int = 2, desc: str = "tts", synthesiser=None) -> list[dict]:
    """Synthesise every job to out_dir/{id}.wav with `synthesiser` (default espeak-ng), skipping wavs that already
    exist and read fine. Returns the jobs in input order with `path` (the file name, relative to out_dir) and
    `duration` added.
    """
    synthesiser = synthesiser or EspeakEngine()
    _check_jobs(jobs)
    synthesiser.check_voices([job["voice"] for job in jobs])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = []

    def run(job: dict) -> dict:
        name = f"{job['id']}.wav"
        target = out_dir / name
        if target.exists():
            try:
                # A finished clip from an earlier (killed) run: keep it. A broken one is redone.
                done = dict(job, path=name, duration=len(audio.read_wav(target)) / audio.SAMPLE_RATE)
                kept.append(name)
                return done
            except audio.AudioError:
                pass
        duration = synthesiser.synthesize(job["text"], job["voice"], job["rate"], job["pitch"], job["amplitude"], target)
        faults.point("tts")
        return dict(job, path=name, duration=duration)

    # Threads suffice: the work happens in the synthesiser's subprocesses, outside the GIL.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = list(tqdm(pool.map(run, jobs), total=len(jobs), desc=desc, unit="clip"))
    if kept:
        log.info("%s: %d of %d clips kept from an earlier run (not spoken again)", desc, len(kept), len(jobs))
    return done
