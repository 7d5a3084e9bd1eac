"""fac.data.speech_tokenizer: 25 Hz units, int(25 * seconds) of them, reproducible and saved losslessly."""

import json

import numpy as np
import pytest

from fac.data import audio, speech_tokenizer, tts
from fac.data.speech_tokenizer import SpeechTokenizer

WORDS = ["apple", "river", "yellow", "window", "garden", "seven"]
VOICES = ["en-us", "en-gb+f3"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{(word, voice): samples} of espeak-ng speech."""
    folder = tmp_path_factory.mktemp("words")
    jobs = [dict(id=f"{word}-{voice}", text=word, voice=voice, rate=150, pitch=50, amplitude=100)
            for word in WORDS for voice in VOICES]
    done = tts.synthesize_all(jobs, folder)
    return {(job["text"], job["voice"]): audio.read_wav(folder / job["path"]) for job in done}


@pytest.fixture(scope="module")
def tokenizer(clips):
    return SpeechTokenizer.train([speech_tokenizer.frame_features(x) for x in clips.values()], 16, seed=0)


@pytest.mark.parametrize("num_samples", [640, 639, 15999, 16000, 16001, 12345, 40000])
def test_frame_features_have_int_25_seconds_units_of_four_stacked_frames(num_samples):
    samples = np.random.default_rng(0).standard_normal(num_samples).astype(np.float32) * 0.1
    features = speech_tokenizer.frame_features(samples, n_mels=40)
    assert features.shape == (int(25 * num_samples / audio.SAMPLE_RATE), 4 * 40)


def test_frame_features_are_normalised_per_utterance(clips):
    features = speech_tokenizer.frame_features(clips[("garden", "en-us")] * 0.01)
    mel = features.reshape(-1, 40)  # back to 10 ms frames
    assert np.abs(mel.mean(axis=0)).max() < 0.2
    assert mel.std(axis=0).mean() == pytest.approx(1.0, abs=0.1)


def test_frame_features_do_not_depend_on_loudness(clips):
    samples = clips[("garden", "en-us")]
    assert np.allclose(speech_tokenizer.frame_features(samples),
                       speech_tokenizer.frame_features(samples * 0.25), atol=1e-2)


def test_encode_gives_int_25_seconds_codes_below_the_codebook_size(tokenizer, clips):
    for samples in clips.values():
        codes = tokenizer.encode(samples)
        assert len(codes) == int(25 * len(samples) / audio.SAMPLE_RATE)
        assert all(isinstance(c, int) and 0 <= c < tokenizer.codebook_size for c in codes)


def test_training_is_deterministic_for_a_seed(tokenizer, clips):
    features = [speech_tokenizer.frame_features(x) for x in clips.values()]
    again = SpeechTokenizer.train(features, 16, seed=0)
    other = SpeechTokenizer.train(features, 16, seed=1)
    assert np.array_equal(again.centroids, tokenizer.centroids)
    assert not np.array_equal(other.centroids, tokenizer.centroids)


def test_training_subsamples_to_max_frames_reproducibly(clips):
    features = [speech_tokenizer.frame_features(x) for x in clips.values()]
    first = SpeechTokenizer.train(features, 8, seed=3, max_frames=100)
    second = SpeechTokenizer.train(features, 8, seed=3, max_frames=100)
    assert first.codebook_size == 8 and np.array_equal(first.centroids, second.centroids)


def test_training_rejects_features_of_another_width():
    with pytest.raises(ValueError, match=r"feature_arrays\[1\] has shape \(10, 80\); expected \[frames, 160\]"):
        SpeechTokenizer.train([np.zeros((10, 160)), np.zeros((10, 80))], 4, seed=0)


def test_training_rejects_fewer_frames_than_codes():
    with pytest.raises(ValueError, match="5 frames cannot train a codebook of 16"):
        SpeechTokenizer.train([np.zeros((5, 160), dtype=np.float32)], 16, seed=0)


def test_save_and_load_give_identical_codes(tokenizer, clips, tmp_path):
    tokenizer.save(tmp_path / "tok")
    loaded = SpeechTokenizer.load(tmp_path / "tok")
    assert loaded.codebook_size == 16
    for samples in clips.values():
        assert loaded.encode(samples) == tokenizer.encode(samples)
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["frame_rate"] == 25 and config["n_mels"] == 40 and config["codebook_size"] == 16


def test_different_words_give_different_token_strings(tokenizer, clips):
    for voice in VOICES:
        strings = {tuple(tokenizer.encode(clips[(word, voice)])) for word in WORDS}
        assert len(strings) == len(WORDS)


def test_load_of_a_missing_folder_names_the_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere/config\.json: missing"):
        SpeechTokenizer.load(tmp_path / "nothere")


def test_load_rejects_another_feature_version(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    config["feature_version"] = "mfcc-v0"
    (tmp_path / "tok" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: feature_version 'mfcc-v0' differs"):
        SpeechTokenizer.load(tmp_path / "tok")


def test_load_rejects_a_folder_that_is_not_a_speech_tokenizer(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 128}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'qwen3' is not a speech tokenizer"):
        SpeechTokenizer.load(tmp_path / "model")


def test_usage_stats_count_codes_and_perplexity():
    stats = speech_tokenizer.usage_stats([[0, 1, 2, 3], [0, 1, 2, 3]], codebook_size=8)
    assert stats["tokens"] == 8 and stats["codes_used"] == 4 and stats["codes_used_fraction"] == 0.5
    assert stats["perplexity"] == pytest.approx(4.0)


def test_usage_stats_of_one_repeated_code_has_perplexity_one(tokenizer):
    assert tokenizer.usage_stats([[5, 5, 5]])["perplexity"] == pytest.approx(1.0)
