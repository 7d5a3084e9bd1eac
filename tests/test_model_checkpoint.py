"""Checkpoints: safetensors round trip is bit-exact with the official parameter names, the Auto classes
resolve `funaudiochat`, and a checkpoint of another model or another shape fails with a precise error."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from fac.model import FunAudioChatConfig, FunAudioChatForConditionalGeneration, build_config, load_checkpoint

from conftest import CONFORMANCE_DIR  # noqa: E402

FIXTURE = CONFORMANCE_DIR
TINY = {
    "llm": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "intermediate_size": 64, "vocab_size": 300, "rope_theta": 10000.0},
    "encoder": {"num_mel_bins": 8, "d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2,
                "encoder_ffn_dim": 32, "n_window": 10, "max_source_positions": 100},
    "speech": {"codebook_size": 68, "group_size": 5},
    "srh": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 8, "intermediate_size": 32},
    "special_ids": {"pad": 256, "eos": 258, "audio": 259, "audio_bos": 260, "audio_eos": 261, "sil": 263},
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return FunAudioChatForConditionalGeneration.from_pretrained(FIXTURE).eval()


@pytest.fixture(scope="module")
def train_inputs():
    inputs = load_file(FIXTURE / "inputs.safetensors")
    return {k[len("train."):]: v for k, v in inputs.items() if k.startswith("train.")}


@pytest.fixture()
def fixture_copy(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_save_and_reload_gives_bit_identical_outputs(model, train_inputs, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = FunAudioChatForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = model(**train_inputs), reloaded(**train_inputs)
    for name in ("loss", "text_logits", "speech_logits"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name


def test_fresh_model_round_trip_keeps_every_weight_and_the_tie(tmp_path):
    torch.manual_seed(0)
    fresh = FunAudioChatForConditionalGeneration(build_config(TINY))
    fresh.save_pretrained(tmp_path)
    reloaded = load_checkpoint(tmp_path)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded.audio_invert_tower.lm_head.weight is reloaded.audio_tower.embed_tokens.weight


def test_saved_tensors_carry_the_official_names_with_the_tied_head_stored_once(model, tmp_path):
    model.save_pretrained(tmp_path)
    saved = set(load_file(tmp_path / "model.safetensors"))
    assert saved == set(load_file(FIXTURE / "model.safetensors"))
    assert "audio_invert_tower.lm_head.weight" not in saved


def test_saved_config_keeps_rope_theta_for_the_official_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "funaudiochat"
    assert config["audio_config"]["model_type"] == "funaudiochat_audio_encoder"
    assert config["text_config"]["rope_theta"] == 1e6
    assert config["audio_config"]["crq_transformer_config"]["rope_theta"] == 1e4


def test_auto_classes_resolve_funaudiochat():
    assert isinstance(AutoConfig.from_pretrained(FIXTURE), FunAudioChatConfig)
    assert isinstance(AutoModel.from_pretrained(FIXTURE), FunAudioChatForConditionalGeneration)


def test_checkpoint_of_another_model_type_is_rejected(fixture_copy):
    _edit_config(fixture_copy, lambda c: c.update(model_type="qwen3"))
    with pytest.raises(ValueError, match=r"config\.json: model_type is 'qwen3', expected 'funaudiochat'"):
        FunAudioChatForConditionalGeneration.from_pretrained(fixture_copy)


def test_shape_mismatch_names_file_parameter_and_both_shapes(fixture_copy):
    _edit_config(fixture_copy, lambda c: c["audio_config"].update(encoder_ffn_dim=96))
    with pytest.raises(ValueError) as error:
        load_checkpoint(fixture_copy)
    message = str(error.value)
    assert "model.safetensors: continuous_audio_tower.layers.0.fc1.weight has shape [64, 32], " \
           "the config expects [96, 32]" in message
    assert "continuous_audio_tower.layers.1.fc2.weight" in message


def test_missing_tensor_is_rejected(fixture_copy):
    tensors = load_file(fixture_copy / "model.safetensors")
    del tensors["audio_tower.output_matching.weight"]
    save_file(tensors, fixture_copy / "model.safetensors", metadata={"format": "pt"})
    expected = r"missing tensor audio_tower\.output_matching\.weight \(expected shape \[64, 64\]\)"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(fixture_copy)


def test_unexpected_tensor_is_rejected(fixture_copy):
    tensors = load_file(fixture_copy / "model.safetensors")
    tensors["extra_head.weight"] = torch.zeros(3, 4)
    save_file(tensors, fixture_copy / "model.safetensors", metadata={"format": "pt"})
    expected = r"model\.safetensors: unexpected tensor extra_head\.weight with shape \[3, 4\]"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(fixture_copy)


def test_srh_token_embedding_reported_in_the_released_checkpoint_is_ignored(fixture_copy, model):
    tensors = load_file(fixture_copy / "model.safetensors")
    tensors["audio_invert_tower.crq_transformer.embed_tokens.weight"] = torch.zeros(68, 32)
    save_file(tensors, fixture_copy / "model.safetensors", metadata={"format": "pt"})
    loaded = load_checkpoint(fixture_copy)
    assert torch.equal(loaded.audio_tower.embed_tokens.weight, model.audio_tower.embed_tokens.weight)
