"""fac.data.audio: wavs are read as 16 kHz mono float32, bad files fail naming themselves, writes are atomic."""

import numpy as np
import pytest
import soundfile as sf

from fac.data import audio


def tone(seconds=0.5, rate=audio.SAMPLE_RATE, amplitude=0.5, frequency=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def test_write_then_read_round_trips_within_16_bit_precision(tmp_path):
    samples = tone()
    audio.write_wav(tmp_path / "a.wav", samples)
    back = audio.read_wav(tmp_path / "a.wav")
    assert back.dtype == np.float32 and back.shape == samples.shape
    assert np.max(np.abs(back - samples)) < 1.0 / 32767
    assert sf.info(tmp_path / "a.wav").subtype == "PCM_16"


def test_read_wav_resamples_22050_hz_to_16_khz(tmp_path):
    sf.write(tmp_path / "espeak.wav", tone(1.0, rate=22050), 22050, subtype="PCM_16")
    assert len(audio.read_wav(tmp_path / "espeak.wav")) == 16000


def test_resample_changes_the_length_by_the_rate_ratio_and_leaves_a_clip_at_its_own_rate_as_it_is():
    clip = tone(1.0, rate=24000)
    assert len(audio.resample(clip, 24000, 16000)) == 16000
    same = audio.resample(clip, 16000, 16000)
    assert same.dtype == np.float32 and np.array_equal(same, clip.astype(np.float32))


def test_read_wav_downmixes_stereo_to_mono(tmp_path):
    left = tone()
    sf.write(tmp_path / "stereo.wav", np.stack([left, np.zeros_like(left)], axis=1), audio.SAMPLE_RATE)
    mono = audio.read_wav(tmp_path / "stereo.wav")
    assert mono.ndim == 1
    assert np.allclose(mono, left / 2, atol=2.0 / 32767)


def test_read_wav_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(audio.AudioError, match=r"nothere\.wav: no such audio file"):
        audio.read_wav(tmp_path / "nothere.wav")


def test_read_wav_corrupt_file_is_not_readable(tmp_path):
    (tmp_path / "noise.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(audio.AudioError, match=r"noise\.wav: not a readable audio file"):
        audio.read_wav(tmp_path / "noise.wav")


def test_read_wav_zero_byte_file_is_empty(tmp_path):
    (tmp_path / "empty.wav").touch()
    with pytest.raises(audio.AudioError, match=r"empty\.wav: is an empty file"):
        audio.read_wav(tmp_path / "empty.wav")


def test_read_wav_header_without_samples_holds_zero_samples(tmp_path):
    sf.write(tmp_path / "header.wav", np.zeros(0, dtype=np.float32), audio.SAMPLE_RATE, subtype="PCM_16")
    with pytest.raises(audio.AudioError, match=r"header\.wav: holds 0 samples"):
        audio.read_wav(tmp_path / "header.wav")


def test_read_wav_silent_file_raises(tmp_path):
    audio.write_wav(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32))
    with pytest.raises(audio.AudioError, match=r"silent\.wav: is silent"):
        audio.read_wav(tmp_path / "silent.wav")


def test_write_wav_creates_parent_folders(tmp_path):
    audio.write_wav(tmp_path / "a" / "b" / "c.wav", tone())
    assert (tmp_path / "a" / "b" / "c.wav").is_file()


def test_write_wav_into_unwritable_folder_names_the_folder(tmp_path):
    # Tests run as root, which ignores read-only modes: a folder "under a file" is unwritable for anyone.
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match=r"file: cannot write x\.wav in this folder"):
        audio.write_wav(tmp_path / "file" / "x.wav", tone())


def test_write_wav_interrupted_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "a.wav"
    audio.write_wav(target, tone())
    before = target.read_bytes()

    def half_write(path, samples, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"RIFF half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(audio.sf, "write", half_write)
    with pytest.raises(KeyboardInterrupt):
        audio.write_wav(target, tone(amplitude=0.1))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


def test_write_wav_clips_values_beyond_full_scale(tmp_path):
    audio.write_wav(tmp_path / "loud.wav", np.array([2.0, -2.0, 0.5], dtype=np.float32))
    back, _ = sf.read(tmp_path / "loud.wav", dtype="float32")
    assert back[0] > 0.99 and back[1] < -0.99  # clipped, not wrapped around to the other sign


def test_write_wav_rejects_nan(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        audio.write_wav(tmp_path / "nan.wav", np.array([0.1, np.nan], dtype=np.float32))


def test_duration_seconds_reads_the_header(tmp_path):
    audio.write_wav(tmp_path / "a.wav", tone(1.25))
    assert audio.duration_seconds(tmp_path / "a.wav") == pytest.approx(1.25)


def test_duration_seconds_of_corrupt_file_names_it(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(audio.AudioError, match=r"bad\.wav: not a readable audio file"):
        audio.duration_seconds(tmp_path / "bad.wav")


def test_speech_seconds_is_the_voiced_span_without_leading_and_trailing_silence():
    quiet = 1e-4 * np.random.default_rng(0).standard_normal(int(0.3 * audio.SAMPLE_RATE))  # ~74 dB below the tone
    clip = np.concatenate([quiet, tone(), quiet[:1600], tone(), quiet]).astype(np.float32)
    assert audio.speech_seconds(clip) == pytest.approx(1.1, abs=0.011)  # tone, 0.1 s gap, tone; 0.6 s of edges cut
    assert audio.speech_seconds(tone()) == pytest.approx(0.5, abs=0.011)
    assert audio.speech_seconds(np.zeros(audio.SAMPLE_RATE, dtype=np.float32)) == 0.0
    assert audio.speech_seconds(np.zeros(0, dtype=np.float32)) == 0.0
