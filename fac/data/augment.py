"""Noisy and louder/quieter copies of clips: white, pink or babble noise at a set SNR, and gain.
The SNR is exact (signal power over noise power) and no output clips: a peak guard rescales the clip."""

from __future__ import annotations

import numpy as np

NOISE_KINDS = ("white", "pink", "babble")
MIN_BABBLE_TALKERS = 3
MAX_BABBLE_TALKERS = 6
# Headroom under full scale, so that 16-bit PCM never saturates after rounding.
PEAK_LIMIT = 0.99


def _mono(samples, name: str = "samples") -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"{name} have shape {samples.shape}; expected a non-empty 1-D mono array")
    return samples


def _power(samples: np.ndarray) -> float:
    return float(np.mean(samples.astype(np.float64) ** 2))


def rms_db(samples) -> float:
    """Level of a clip in dB relative to full scale (a full-scale square wave is 0 dB; silence is -inf)."""
    power = _power(_mono(samples))
    return 10.0 * np.log10(power) if power > 0 else float("-inf")


def _peak_guard(samples: np.ndarray) -> np.ndarray:
    # Scaling the whole clip keeps its SNR and its shape; clipping would add distortion.
    peak = float(np.max(np.abs(samples)))
    if peak > PEAK_LIMIT:
        samples = samples * (PEAK_LIMIT / peak)
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def apply_gain(samples, gain_db: float) -> np.ndarray:
    """The clip made gain_db louder, but never beyond the peak limit (then the gain is smaller)."""
    return _peak_guard(_mono(samples) * 10.0 ** (gain_db / 20.0))


def _pink(length: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequencies = np.fft.rfftfreq(length)
    # Power falls as 1/f, so amplitude as 1/sqrt(f); no DC, which would only shift the clip.
    shaping = np.zeros_like(frequencies)
    shaping[1:] = 1.0 / np.sqrt(frequencies[1:])
    return np.fft.irfft(spectrum * shaping, n=length)


def _babble(length: int, rng: np.random.Generator, sources) -> np.ndarray:
    if sources is None or len(sources) < MIN_BABBLE_TALKERS:
        count = 0 if sources is None else len(sources)
        raise ValueError(f"babble noise needs at least {MIN_BABBLE_TALKERS} babble_sources (other utterances); "
                         f"got {count}")
    talkers = rng.choice(len(sources), size=min(len(sources), MAX_BABBLE_TALKERS), replace=False)
    babble = np.zeros(length)
    for index in talkers:
        talker = _mono(sources[index], f"babble_sources[{index}]")
        power = _power(talker)
        if power == 0:
            raise ValueError(f"babble_sources[{index}] is silent; expected speech")
        # Loop the talker from a random point, then crop, so that every talker covers the whole clip.
        start = int(rng.integers(len(talker)))
        looped = np.resize(np.roll(talker, -start), length)
        # Equal loudness per talker: no single voice stands out of the crowd.
        babble += looped / np.sqrt(power)
    return babble


def add_noise(samples, snr_db: float, rng: np.random.Generator, kind: str = "white",
              babble_sources=None) -> np.ndarray:
    """The clip with noise of the given kind added at exactly snr_db (signal power / noise power)."""
    signal = _mono(samples)
    signal_power = _power(signal)
    if signal_power == 0:
        raise ValueError("samples are silent; an SNR needs a signal with power above 0")
    if kind == "white":
        noise = rng.standard_normal(len(signal))
    elif kind == "pink":
        noise = _pink(len(signal), rng)
    elif kind == "babble":
        noise = _babble(len(signal), rng, babble_sources)
    else:
        raise ValueError(f"noise kind {kind!r}; expected one of {list(NOISE_KINDS)}")
    noise_power = _power(noise)
    if noise_power == 0:
        raise ValueError(f"{kind} noise came out silent for a clip of {len(signal)} samples; expected a longer clip")
    noise *= np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return _peak_guard(signal + noise)
