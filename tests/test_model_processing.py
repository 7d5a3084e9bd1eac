"""Input processing: conversations rebuilt from their parts equal the fixture's training batch and
generation prompt token for token, and log-mel features come at 100 frames/s with a mask of valid frames."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fac.model import FunAudioChatConfig
from fac.model.processing import (
    IGNORE_INDEX,
    SpecialIds,
    build_example,
    build_prompt,
    collate,
    log_mel,
    speech_length_of_frames,
)

FIXTURE = Path(__file__).parent / "data" / "conformance"
SYSTEM_0, SYSTEM_1 = [72, 101, 108, 108, 111, 33], [87, 111, 114, 108, 100]


@pytest.fixture(scope="module")
def inputs():
    return load_file(FIXTURE / "inputs.safetensors")


@pytest.fixture(scope="module")
def ids():
    config = FunAudioChatConfig.from_pretrained(FIXTURE)
    # the fixture's template: <|im_start|>=257, role words 200/201/202, "\n"=10, <|im_end|>=258
    return SpecialIds.from_config(
        config, system_prefix=[257, 200, 10], user_prefix=[257, 201, 10], assistant_prefix=[257, 202, 10],
        turn_suffix=[258, 10],
    )


def _examples(inputs, ids):
    features, speech = inputs["train.input_features"], inputs["train.speech_ids"]
    sample_0 = build_example(SYSTEM_0, features[0], [30, 31, 32, 33, 34], speech[1, 10:].tolist(), ids, group_size=5)
    sample_1 = build_example(
        SYSTEM_1, features[1, :, :50], list(range(40, 47)), speech[3, 10:23].tolist(), ids, group_size=5
    )
    return sample_0, sample_1


def test_user_speech_placeholder_is_25_tokens_per_second_rounded_down():
    assert speech_length_of_frames(90) == 22  # int(25 * 0.9 s)
    assert speech_length_of_frames(50) == 12
    assert speech_length_of_frames(100) == 25


def test_build_example_reproduces_fixture_sample_0(inputs, ids):
    example, _ = _examples(inputs, ids)
    assert torch.equal(example.input_ids, inputs["train.input_ids"][0])
    assert torch.equal(example.labels, inputs["train.labels"][0])
    user, assistant = example.speech_ids
    assert torch.equal(user, inputs["train.speech_ids"][0, :22])
    assert torch.equal(assistant, inputs["train.speech_ids"][1])  # 10 x bos delay, then the 27 codes
    assert example.text_ids[1].tolist() == [30, 31, 32, 33, 34] and example.text_ids[0].numel() == 0


def test_collate_reproduces_the_fixture_training_batch(inputs, ids):
    batch = collate(list(_examples(inputs, ids)), ids)
    for name in ("input_ids", "attention_mask", "labels", "speech_ids", "speech_attention_mask", "text_ids",
                 "text_attention_mask", "feature_attention_mask", "feature_exist_mask"):
        assert torch.equal(batch[name], inputs[f"train.{name}"]), name
    valid = inputs["train.feature_attention_mask"].bool()
    assert batch["input_features"].shape == inputs["train.input_features"].shape
    frames, expected_frames = batch["input_features"].transpose(1, 2), inputs["train.input_features"].transpose(1, 2)
    assert torch.equal(frames[valid], expected_frames[valid])


def test_build_prompt_reproduces_the_fixture_generation_prompt(inputs, ids):
    prompt = build_prompt(SYSTEM_0, inputs["train.input_features"][0], ids, group_size=5, feature_frames=100)
    for name in ("input_ids", "attention_mask", "speech_ids", "speech_attention_mask", "feature_attention_mask",
                 "feature_exist_mask"):
        assert torch.equal(prompt[name], inputs[f"gen.{name}"]), name
    assert torch.equal(prompt["input_features"][..., :90], inputs["gen.input_features"][..., :90])


def test_text_only_reply_is_learned_as_plain_text(ids):
    example = build_example(SYSTEM_0, 22, [30, 31, 32], None, ids, group_size=5)
    assert example.input_ids[-5:].tolist() == [30, 31, 32, 258, 10]
    assert example.labels[-5:].tolist() == [30, 31, 32, 258, 10]
    assert (example.labels[:-5] == IGNORE_INDEX).all()
    assert len(example.speech_ids) == 1 and example.input_features == [None]


def test_log_mel_gives_100_frames_per_second_without_padding_to_30_seconds():
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(32000).astype(np.float32), 0.1 * rng.standard_normal(8000).astype(np.float32)]
    features, mask = log_mel(clips, n_mels=80)
    assert features.shape == (2, 80, 200) and features.dtype == torch.float32
    assert mask.sum(dim=1).tolist() == [200, 50]
    alone, _ = log_mel(clips[1], n_mels=80)
    assert alone.shape == (1, 80, 50)


def test_log_mel_truncates_clips_longer_than_the_limit():
    features, mask = log_mel(np.zeros(16000 * 3, dtype=np.float32), n_mels=128, max_seconds=2.0)
    assert features.shape == (1, 128, 200) and int(mask.sum()) == 200
