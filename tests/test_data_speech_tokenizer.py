"""fac.data.speech_tokenizer: 25 Hz units, int(25 * seconds) of them, reproducible and saved losslessly."""

import json

import numpy as np
import pytest
import torch

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


def test_frame_features_are_relative_to_the_clips_peak_and_floored_80_db_below_it(clips):
    features = speech_tokenizer.frame_features(clips[("garden", "en-us")] * 0.01)
    floor = -speech_tokenizer.DYNAMIC_RANGE_DB / 10.0 * np.log(10.0) / speech_tokenizer.FEATURE_SCALE
    assert features.max() == pytest.approx(0.0, abs=1e-6)
    assert features.min() == pytest.approx(floor, abs=1e-4)


def test_a_words_features_do_not_depend_on_what_else_the_clip_says(clips):
    """No per-utterance statistics: "garden" alone and followed by a quieter "river" get the same features for its
    own units (the last one, whose window reaches into the next word, aside), hence the same codes. Per-utterance
    mean and variance normalisation changed them, and a detokenizer could not speak new words from such codes."""
    word, after = clips[("garden", "en-us")], clips[("river", "en-us")] * 0.5
    alone = speech_tokenizer.frame_features(word)
    joined = speech_tokenizer.frame_features(np.concatenate([word, after]))
    assert np.allclose(joined[: len(alone) - 1], alone[:-1], atol=1e-4)


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


# ------------------------------------------------------------------ kind s3 (CosyVoice's tokenizer, s3tokenizer)

def test_s3_tokenizer_from_a_state_dict_codes_25_per_second_and_survives_save_and_load(tmp_path):
    import s3tokenizer
    from s3tokenizer.model_v3 import ModelConfigV3, S3TokenizerV3

    from fac.data.speech_tokenizer import S3SpeechTokenizer, load_speech_tokenizer
    from standins import s3_tokenizer_file

    path = s3_tokenizer_file(tmp_path / "speech_tokenizer_v3.pt")
    tok = S3SpeechTokenizer.from_file(path)
    assert tok.version == "v3" and tok.codebook_size == 6561
    assert tok.dims == {"n_mels": 128, "n_audio_state": 128, "n_audio_head": 2, "n_audio_layer": 2, "n_codebook_size": 6561}
    samples = 0.1 * np.random.default_rng(0).standard_normal(3 * 16000).astype(np.float32)
    codes = tok.encode(samples)
    assert len(codes) == 75 and all(0 <= c < 6561 for c in codes)  # 3 s at 25 Hz
    # the package's own model on the same file and clip gives the same codes
    reference = S3TokenizerV3("speech_tokenizer_v3_25hz", ModelConfigV3(n_audio_state=128, n_audio_head=2, n_audio_layer=2))
    reference.load_state_dict(torch.load(path), strict=False)
    mel = s3tokenizer.log_mel_spectrogram(torch.from_numpy(samples))
    expected, lengths = reference.quantize(mel[None], torch.tensor([mel.shape[-1]]))
    assert codes == expected[0, : int(lengths[0])].tolist()
    tok.save(tmp_path / "folder")
    again = load_speech_tokenizer(tmp_path / "folder")
    assert isinstance(again, S3SpeechTokenizer) and again.encode(samples) == codes
    assert json.loads((tmp_path / "folder/config.json").read_text())["codebook_size"] == 6561


def test_s3_tokenizer_from_the_official_onnx_layout_gives_the_state_dicts_codes(tmp_path):
    """speech_tokenizer.path `*.onnx`: the s3tokenizer package converts the export (onnx2torch_v3); an ONNX file laid
    out as the official one, holding a state dict's weights, gives exactly that state dict's codes."""
    from fac.data.speech_tokenizer import S3SpeechTokenizer
    from standins import s3_tokenizer_file, s3_tokenizer_onnx

    pt = s3_tokenizer_file(tmp_path / "speech_tokenizer_v3.pt", width=64, layers=2)
    onnx_file = s3_tokenizer_onnx(tmp_path / "speech_tokenizer_v3.onnx", pt)
    from_onnx, from_pt = S3SpeechTokenizer.from_file(onnx_file), S3SpeechTokenizer.from_file(pt)
    assert from_onnx.dims == from_pt.dims and from_onnx.codebook_size == 6561
    theirs, ours = from_pt.model.state_dict(), from_onnx.model.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs if not k.endswith("freqs_cis"))
    samples = 0.1 * np.random.default_rng(1).standard_normal(2 * 16000).astype(np.float32)
    assert from_onnx.encode(samples) == from_pt.encode(samples)


def test_s3_tokenizer_file_errors_name_the_file(tmp_path):
    from fac.data.speech_tokenizer import S3SpeechTokenizer

    with pytest.raises(FileNotFoundError, match=r"speech_tokenizer.path .*missing.onnx: no such file"):
        S3SpeechTokenizer.from_file(tmp_path / "missing.onnx")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt: not an S3 tokenizer state dict"):
        S3SpeechTokenizer.from_file(tmp_path / "other.pt")


def test_speech_tokenizer_step_adopts_the_s3_file_and_checks_its_codebook(tmp_path):
    from fac.data import steps
    from standins import s3_tokenizer_file

    path = s3_tokenizer_file(tmp_path / "speech_tokenizer_v3.pt")
    stats = steps.train_speech_tokenizer({"kind": "s3", "codebook_size": 6561, "path": str(path)}, None, str(tmp_path),
                                         str(tmp_path / "tok"))
    assert stats["codebook_size"] == 6561 and (tmp_path / "tok/model.safetensors").is_file()
    with pytest.raises(ValueError, match="6561 codes, but speech_tokenizer.codebook_size is 4096"):
        steps.train_speech_tokenizer({"kind": "s3", "codebook_size": 4096, "path": str(path)}, None, str(tmp_path),
                                     str(tmp_path / "tok2"))
