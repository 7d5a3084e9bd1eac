"""Config builders: a plain params dict becomes the documented geometry, bad params fail naming the key,
and the paper's 8B model instantiates on the meta device with the parameter count its geometry implies."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import pytest
import torch

from fac.model import FunAudioChatForConditionalGeneration, build_config, paper_8b_config
from fac.model.builders import paper_8b_params

TINY = {
    "llm": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "intermediate_size": 384, "vocab_size": 300, "rope_theta": 10000},
    "encoder": {"num_mel_bins": 80, "d_model": 192, "encoder_layers": 4, "encoder_attention_heads": 4,
                "encoder_ffn_dim": 768, "n_window": 50, "max_source_positions": 1500},
    "speech": {"codebook_size": 68, "group_size": 5},
    "srh": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 192},
    "special_ids": {"pad": 256, "eos": 258, "audio": 259, "audio_bos": 260, "audio_eos": 261, "sil": 263},
}


def expected_parameter_count(params: dict) -> int:
    """Parameters implied by the geometry alone (the SRH head is tied to the speech embedding: counted once)."""
    llm, enc, speech, srh = params["llm"], params["encoder"], params["speech"], params["srh"]
    hidden, vocab = llm["hidden_size"], llm["vocab_size"]
    codebook, group = speech["codebook_size"], speech["group_size"]

    def qwen3_layers(p):
        h, heads, kv, hd, inter = (p[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                   "head_dim", "intermediate_size"))
        attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 2 * hd  # q, k, v, o, q_norm, k_norm
        return p["num_hidden_layers"] * (attention + 3 * h * inter + 2 * h)

    language_model = qwen3_layers(llm) + hidden + vocab * hidden * (1 if llm.get("tie_word_embeddings") else 2)
    d, mels, ffn = enc["d_model"], enc["num_mel_bins"], enc["encoder_ffn_dim"]
    encoder_layer = 4 * d * d + 3 * d + 4 * d + 2 * d * ffn + ffn + d  # attention (k without bias), 2 LN, fc1, fc2
    continuous = (d * mels * 3 + d) + (d * d * 3 + d) + enc["encoder_layers"] * encoder_layer + 2 * d
    continuous += hidden * d + hidden + 2 * hidden  # proj, unused audio_bos_eos_token
    discrete = codebook * hidden + 2 * hidden * hidden
    h = srh["hidden_size"]
    head = group * hidden * hidden + group * hidden + h * hidden + hidden * h + qwen3_layers(srh) + h
    return language_model + continuous + discrete + head


def test_tiny_params_build_the_documented_geometry():
    config = build_config(TINY)
    text, audio = config.text_config, config.audio_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim, text.vocab_size) == (128, 4, 32, 300)
    assert text.rope_parameters["rope_theta"] == 10000
    assert (text.pad_token_id, text.eos_token_id, text.sil_index) == (256, 258, 263)
    assert (text.audio_bos_index, text.audio_eos_index, config.audio_token_index) == (260, 261, 259)
    assert (audio.d_model, audio.encoder_layers, audio.n_window, audio.output_dim) == (192, 4, 50, 128)
    assert (audio.bos_token_id, audio.eos_token_id, audio.pad_token_id) == (64, 65, 66)  # right after 64 codes
    assert audio.crq_transformer_config["hidden_size"] == 64
    assert audio.crq_transformer_config["max_position_embeddings"] == 5 * 2048  # the SRH runs at 25 Hz
    model = FunAudioChatForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(TINY)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["llm"].pop("hidden_size"), r"missing required key 'llm\.hidden_size'"),
        (lambda p: p["srh"].update(hidden=64), r"unknown key\(s\) \['hidden'\] in 'srh'"),
        (lambda p: p["encoder"].update(d_model="192"), r"encoder\.d_model must be a positive int, got '192'"),
        (lambda p: p["special_ids"].update(sil=300), r"special_ids\.sil=300 is outside llm\.vocab_size=300"),
        (lambda p: p["llm"].update(num_key_value_heads=3), r"llm\.num_attention_heads=4 must be a multiple"),
        (lambda p: p["speech"].update(pad_token_id=68), r"speech\.pad_token_id=68 is outside codebook_size=68"),
        (lambda p: p["llm"].update(moe=True), r"llm\.moe_intermediate_size is required"),
        (lambda p: p.update(decoder={}), r"unknown section\(s\) \['decoder'\]"),
    ],
)
def test_bad_params_fail_naming_the_key(edit, message):
    params = copy.deepcopy(TINY)
    edit(params)
    with pytest.raises(ValueError, match=message):
        build_config(params)


def test_moe_flag_selects_a_qwen3_moe_llm():
    params = copy.deepcopy(TINY)
    params["llm"].update(moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    config = build_config(params)
    assert config.text_config.model_type == "qwen3_moe"
    assert (config.text_config.num_experts, config.text_config.moe_intermediate_size) == (4, 64)


def test_paper_8b_model_instantiates_on_meta_with_the_geometry_parameter_count():
    with torch.device("meta"):
        model = FunAudioChatForConditionalGeneration(paper_8b_config())
    params = dict(model.named_parameters())
    assert all(p.device.type == "meta" for p in params.values())
    assert params["language_model.model.embed_tokens.weight"].shape == (151936, 4096)
    assert params["language_model.model.layers.35.mlp.gate_proj.weight"].shape == (12288, 4096)
    assert params["language_model.model.layers.0.self_attn.k_proj.weight"].shape == (8 * 128, 4096)
    assert params["continuous_audio_tower.conv1.weight"].shape == (1280, 128, 3)
    assert params["continuous_audio_tower.layers.31.fc1.weight"].shape == (5120, 1280)
    assert params["continuous_audio_tower.proj.weight"].shape == (4096, 1280)
    assert params["audio_tower.embed_tokens.weight"].shape == (6564, 4096)
    assert params["audio_invert_tower.pre_matching.weight"].shape == (5 * 4096, 4096)
    assert params["audio_invert_tower.crq_transformer.layers.27.self_attn.q_proj.weight"].shape == (16 * 128, 1024)
    count = sum(p.numel() for p in params.values())
    print(f"Fun-Audio-Chat 8B geometry: {count:,} parameters")
    assert count == expected_parameter_count(paper_8b_params()) == 9_424_242_688


def test_paper_group_size_one_is_the_25hz_baseline():
    config = paper_8b_config(group_size=1)
    assert config.audio_config.group_size == 1
    with torch.device("meta"):
        model = FunAudioChatForConditionalGeneration(config)
    assert model.audio_invert_tower.pre_matching.weight.shape == (4096, 4096)


def test_named_geometry_fills_what_params_leave_out_and_params_win_key_by_key():
    from fac.model import resolve_geometry

    resolved = resolve_geometry({"geometry": "paper_8b", "speech": {"group_size": 4}, "srh": {"num_hidden_layers": 2}})
    assert "geometry" not in resolved
    assert resolved["srh"] == {**paper_8b_params()["srh"], "num_hidden_layers": 2}
    assert resolved["speech"]["group_size"] == 4 and resolved["llm"] == paper_8b_params()["llm"]
    assert build_config({"geometry": "paper_8b", "speech": {"group_size": 5}}).to_dict() == paper_8b_config().to_dict()
    assert resolve_geometry({"llm": {"hidden_size": 8}}) == {"llm": {"hidden_size": 8}}  # no geometry: as given
    with pytest.raises(ValueError, match="geometry 'paper_9b' is unknown; expected one of \\['paper_8b'\\]"):
        resolve_geometry({"geometry": "paper_9b"})
