"""fac.data.augment: noise lands at the requested SNR, pink noise is pink, and nothing clips."""

import numpy as np
import pytest

from fac.data import augment

RATE = 16000


def speech_like(seconds=1.0, amplitude=0.1, seed=0):
    """A modulated tone: non-stationary like speech, quiet enough that no peak guard triggers."""
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (amplitude * envelope * np.sin(2 * np.pi * (200 + 50 * seed) * t)).astype(np.float32)


def measured_snr_db(clean, noisy):
    clean = clean.astype(np.float64)
    noise = noisy.astype(np.float64) - clean
    return 10 * np.log10(np.mean(clean ** 2) / np.mean(noise ** 2))


def band_power(x, low, high):
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    frequencies = np.fft.rfftfreq(len(x), 1 / RATE)
    return spectrum[(frequencies >= low) & (frequencies < high)].mean()


@pytest.mark.parametrize("kind", ["white", "pink", "babble"])
@pytest.mark.parametrize("snr_db", [0.0, 10.0, 25.0])
def test_add_noise_hits_the_requested_snr_within_a_tenth_of_a_db(kind, snr_db):
    clean = speech_like()
    sources = [speech_like(0.7, seed=s) for s in range(1, 5)]
    noisy = augment.add_noise(clean, snr_db, np.random.default_rng(0), kind=kind, babble_sources=sources)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert measured_snr_db(clean, noisy) == pytest.approx(snr_db, abs=0.1)


def test_pink_noise_has_more_power_at_low_frequencies_than_white():
    clean = speech_like(2.0)
    pink = augment.add_noise(clean, 0.0, np.random.default_rng(0), kind="pink") - clean
    white = augment.add_noise(clean, 0.0, np.random.default_rng(0), kind="white") - clean
    # 1/f: the 100-200 Hz band has about 40x the power density of the 4-8 kHz band.
    assert band_power(pink, 100, 200) / band_power(pink, 4000, 8000) > 10
    assert 0.5 < band_power(white, 100, 200) / band_power(white, 4000, 8000) < 2


def test_babble_needs_at_least_three_other_utterances():
    with pytest.raises(ValueError, match="at least 3 babble_sources"):
        augment.add_noise(speech_like(), 10.0, np.random.default_rng(0), kind="babble",
                          babble_sources=[speech_like(seed=1), speech_like(seed=2)])


def test_babble_loops_sources_shorter_than_the_clip():
    clean = speech_like(2.0)
    babble = augment.add_noise(clean, 0.0, np.random.default_rng(0), kind="babble",
                               babble_sources=[speech_like(0.3, seed=s) for s in range(1, 4)]) - clean
    assert np.mean(babble[-4000:] ** 2) > 0.1 * np.mean(babble[:4000] ** 2)  # no silent tail


def test_unknown_noise_kind_is_rejected():
    with pytest.raises(ValueError, match=r"'brown'; expected one of \['white', 'pink', 'babble'\]"):
        augment.add_noise(speech_like(), 10.0, np.random.default_rng(0), kind="brown")


def test_add_noise_to_silence_is_rejected():
    with pytest.raises(ValueError, match="silent"):
        augment.add_noise(np.zeros(RATE, dtype=np.float32), 10.0, np.random.default_rng(0))


def test_add_noise_is_reproducible_with_the_same_seed():
    first = augment.add_noise(speech_like(), 5.0, np.random.default_rng(7), kind="pink")
    second = augment.add_noise(speech_like(), 5.0, np.random.default_rng(7), kind="pink")
    assert np.array_equal(first, second)


def test_peak_guard_rescales_the_whole_clip_instead_of_clipping():
    quiet, loud = speech_like(amplitude=0.1), speech_like(amplitude=0.9)
    from_quiet = augment.add_noise(quiet, 0.0, np.random.default_rng(0))
    from_loud = augment.add_noise(loud, 0.0, np.random.default_rng(0))
    assert np.max(np.abs(from_loud)) == pytest.approx(augment.PEAK_LIMIT, abs=1e-6)
    # Same noise draw, scaled with the signal: the loud result is the quiet one times a constant.
    ratio = from_loud / np.where(np.abs(from_quiet) > 1e-3, from_quiet, np.nan)
    assert np.nanstd(ratio) / np.nanmean(ratio) < 1e-3


def test_apply_gain_changes_the_level_by_the_gain():
    clean = speech_like()
    assert augment.rms_db(augment.apply_gain(clean, -6.0)) - augment.rms_db(clean) == pytest.approx(-6.0, abs=0.01)


def test_apply_gain_never_exceeds_the_peak_limit():
    louder = augment.apply_gain(speech_like(amplitude=0.5), 20.0)
    assert np.max(np.abs(louder)) == pytest.approx(augment.PEAK_LIMIT, abs=1e-6)


def test_rms_db_of_a_full_scale_sine_is_minus_3_db():
    t = np.arange(RATE) / RATE
    assert augment.rms_db(np.sin(2 * np.pi * 100 * t)) == pytest.approx(-3.01, abs=0.01)


def test_rms_db_of_silence_is_minus_infinity():
    assert augment.rms_db(np.zeros(100)) == float("-inf")
