"""Audio files of the data pipeline: read, validate and write 16 kHz mono wavs.
Every other module goes through here, so a bad file fails once, early, and names itself."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import soundfile as sf

from fac import atomic

SAMPLE_RATE = 16000
# Below this peak a clip holds no speech (16-bit PCM rounds it to a few LSBs at most).
SILENCE_PEAK = 1e-4


class AudioError(ValueError):
    """An audio file that is missing, unreadable, empty or silent; the message starts with its path."""


def read_wav(path) -> np.ndarray:
    """Return the file's samples as float32 mono at 16 kHz (downmixed and resampled if needed)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file; expected a wav file at this path")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: is an empty file (0 bytes); expected a wav file holding speech")
    return _decode(path, str(path))


def decode_audio(data: bytes, name: str = "the audio") -> np.ndarray:
    """read_wav on bytes (an upload): float32 mono at 16 kHz, an empty, unreadable, sample-less or silent clip
    refused with an AudioError whose message starts with `name`."""
    if not data:
        raise AudioError(f"{name}: is empty (0 bytes); expected a wav file holding speech")
    return _decode(io.BytesIO(data), name)


def _decode(source, name: str) -> np.ndarray:
    try:
        samples, sample_rate = sf.read(source, dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as error:
        reason = str(error).replace(f"Error opening {source!r}: ", "")  # libsndfile's words, not a buffer's repr
        raise AudioError(f"{name}: not a readable audio file ({reason}); expected a wav, flac or ogg file") from error
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: holds 0 samples; expected a clip of speech")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    mono = resample(mono, sample_rate, SAMPLE_RATE)  # as it is at 16 kHz
    peak = float(np.max(np.abs(mono)))
    if peak < SILENCE_PEAK:
        raise AudioError(f"{name}: is silent (peak {peak:.2e} < {SILENCE_PEAK:.0e}); expected a clip of speech")
    return np.ascontiguousarray(mono, dtype=np.float32)


def resample(samples, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono samples at `rate` -> at `target` (torchaudio's band-limited resampling; e.g. a 24 kHz
    detokenizer's speech for a 16 kHz ASR scorer); at the same rate, the samples as they are."""
    if int(rate) == int(target):
        return np.asarray(samples, dtype=np.float32)
    # torch is imported only where a clip needs resampling: the workflow imports this module (through the voice
    # check) while it parses, and loading torch there would cost every `snakemake -n` ~2 s and ~700 MB.
    import torch
    import torchaudio.functional

    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return torchaudio.functional.resample(wave, int(rate), int(target)).numpy()


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block, its thread count as it was after: for the per-clip signal work (fbank,
    mel, Griffin-Lim), whose small ops gain nothing from a second thread and lose much when another job holds the
    other core (the tests' two workers). Measured on the 2-core machine, 100 clips of 2.5 s: kaldi fbank 0.11 s on
    one or two threads alone, 1.23 s on two beside a one-thread job; Griffin-Lim of 40 answers 1.1 s against 5.3 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_wav(path, samples, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono samples in [-1, 1] as 16-bit PCM, atomically, creating parent folders."""
    path = Path(path)
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"{path}: samples have shape {samples.shape}; expected a 1-D mono array")
    if not np.all(np.isfinite(samples)):
        raise ValueError(f"{path}: samples contain NaN or infinity; expected finite values in [-1, 1]")
    # Atomically: a killed job leaves either the old file or the new one, never half a wav that a later resume
    # would trust. libsndfile wraps values outside [-1, 1] around instead of clipping them.
    atomic.write_file(path, lambda temporary: sf.write(temporary, np.clip(samples, -1.0, 1.0), sample_rate,
                                                       subtype="PCM_16", format="WAV"))


def encode_wav(samples, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono samples in [-1, 1] as the bytes of a 16-bit PCM wav (write_wav's format, in memory: an upload's answer,
    a page's data URI)."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1 or not np.all(np.isfinite(samples)):
        raise ValueError(f"samples of shape {samples.shape}: expected a 1-D mono array of finite values")
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def duration_seconds(path) -> float:
    """Length of an audio file in seconds, read from its header."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file; expected a wav file at this path")
    try:
        return float(sf.info(path).duration)
    except (sf.SoundFileError, RuntimeError) as error:
        raise AudioError(f"{path}: not a readable audio file ({error}); expected a wav, flac or ogg file") from error


def speech_seconds(samples, sample_rate: int = SAMPLE_RATE, floor_db: float = 35.0, frame_ms: float = 10.0) -> float:
    """The voiced span of a clip in seconds: from the first to the last `frame_ms` frame whose RMS lies within
    `floor_db` of the loudest frame's (the leading and trailing silence cut, as a listener times an answer).
    0.0 for no samples or a silent clip."""
    samples = np.asarray(samples, dtype=np.float32)
    frame = max(1, int(sample_rate * frame_ms / 1000))
    frames = len(samples) // frame
    if frames == 0:
        return 0.0
    rms = np.sqrt(np.mean(samples[: frames * frame].reshape(frames, frame) ** 2, axis=1))
    loudest = float(rms.max())
    if loudest < SILENCE_PEAK:
        return 0.0
    voiced = np.flatnonzero(rms >= loudest * 10 ** (-floor_db / 20))
    return float((voiced[-1] - voiced[0] + 1) * frame / sample_rate)
