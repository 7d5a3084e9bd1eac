"""Conformance with the official Fun-Audio-Chat code: the tiny fixture in tests/data/conformance/ must load
unchanged and reproduce the official losses, logits, labels, intermediates and greedy generation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fac.model import FunAudioChatForConditionalGeneration, check_checkpoint

from conftest import CONFORMANCE_DIR  # noqa: E402

FIXTURE = CONFORMANCE_DIR
LOGITS_TOL = dict(atol=1e-4, rtol=1e-4)  # logits and hidden states, from the fixture README
LOSS_ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FunAudioChatForConditionalGeneration.from_pretrained(FIXTURE).eval()


@pytest.fixture(scope="module")
def inputs():
    return load_file(FIXTURE / "inputs.safetensors")


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURE / "outputs.safetensors")


def _section(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def train_out(model, inputs):
    with torch.no_grad():
        return model(**_section(inputs, "train."))


@pytest.fixture(scope="module")
def generated(model, inputs):
    return model.generate_speech_text(
        **_section(inputs, "gen."),
        mode="s2m",
        max_new_tokens=8,
        force_text_abos=True,
        text_do_sample=False,
        speech_do_sample=False,
        eos_token_id=258,
        pad_token_id=256,
        output_logits=True,
    )


def test_fixture_checkpoint_passes_the_strict_check_and_ties_the_srh_head(model):
    config = check_checkpoint(FIXTURE)
    assert config.audio_config.group_size == 5
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight


def test_losses_match_official(train_out, expected):
    for name in ("loss", "text_loss", "speech_loss"):
        got, want = getattr(train_out, name), expected[f"train.{name}"]
        assert abs(got.item() - want.item()) <= LOSS_ATOL, (name, got.item(), want.item())


def test_text_logits_match_official(train_out, expected):
    torch.testing.assert_close(train_out.text_logits, expected["train.text_logits"], **LOGITS_TOL)


def test_speech_logits_match_official(train_out, expected):
    torch.testing.assert_close(train_out.speech_logits, expected["train.speech_logits"], **LOGITS_TOL)


def test_text_and_speech_labels_match_official_exactly(train_out, expected):
    assert torch.equal(train_out.text_labels, expected["train.debug.language_model.labels"])
    assert torch.equal(train_out.speech_labels, expected["train.debug.audio_invert_tower.labels"])


@pytest.mark.parametrize(
    "ours, official",
    [
        ("continuous_features", "continuous_audio_tower.last_hidden_state"),
        ("audio_features", "audio_tower.last_hidden_state"),
        ("inputs_embeds", "language_model.inputs_embeds"),
        ("last_hidden_state", "language_model.last_hidden_state"),
        ("srh_conditioning", "audio_invert_tower.inputs_embeds"),
        ("speech_label_embeds", "audio_invert_tower.audio_embeds"),
    ],
)
def test_intermediate_tensors_match_official(train_out, expected, ours, official):
    torch.testing.assert_close(getattr(train_out, ours), expected[f"train.debug.{official}"], **LOGITS_TOL)


def test_greedy_generation_matches_official_ids_exactly(generated, expected):
    assert torch.equal(generated.sequences, expected["gen.sequences"])
    assert torch.equal(generated.text_ids, expected["gen.generated_text_ids"])
    assert torch.equal(generated.speech_ids, expected["gen.generated_speech_ids"])


def test_greedy_generation_step_logits_match_official(generated, expected):
    torch.testing.assert_close(generated.text_logits, expected["gen.debug.text_step_logits"], **LOGITS_TOL)
    torch.testing.assert_close(generated.speech_logits, expected["gen.debug.srh_sub_logits"], **LOGITS_TOL)


def test_forward_leaves_the_callers_tensors_unchanged(model, inputs):
    train = _section(inputs, "train.")
    before = {k: v.clone() for k, v in train.items()}
    with torch.no_grad():
        model(**train)
    for name, tensor in train.items():
        assert torch.equal(tensor, before[name]), name
