"""Build a FunAudioChatConfig from a plain dict of dimensions (the `model:` slice of the workflow params),
and the paper's 8B geometry (Qwen3-8B LLM, Whisper-large-v3 encoder, Qwen3 SRH of hidden 1024 x 28 layers)."""

from typing import Any

from transformers import Qwen3Config, Qwen3MoeConfig

from .configuration import FunAudioChatAudioConfig, FunAudioChatConfig

_POSITIVE_INT, _POSITIVE_NUMBER, _BOOL, _TOKEN_ID, _STRING = "positive int", "positive number", "bool", "id", "str"

# section -> key -> (kind, default); default None means required
_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "llm": {
        "hidden_size": (_POSITIVE_INT, None),
        "num_hidden_layers": (_POSITIVE_INT, None),
        "num_attention_heads": (_POSITIVE_INT, None),
        "num_key_value_heads": (_POSITIVE_INT, None),
        "head_dim": (_POSITIVE_INT, None),
        "intermediate_size": (_POSITIVE_INT, None),
        "vocab_size": (_POSITIVE_INT, None),
        "rope_theta": (_POSITIVE_NUMBER, None),
        "rms_norm_eps": (_POSITIVE_NUMBER, 1e-6),
        "max_position_embeddings": (_POSITIVE_INT, 2048),
        "tie_word_embeddings": (_BOOL, False),
        "moe": (_BOOL, False),
        "num_experts": (_POSITIVE_INT, 8),
        "num_experts_per_tok": (_POSITIVE_INT, 2),
        "moe_intermediate_size": (_POSITIVE_INT, 0),
        "router_aux_loss_coef": (_POSITIVE_NUMBER, 0.001),
        "output_router_logits": (_BOOL, False),
    },
    "encoder": {
        "num_mel_bins": (_POSITIVE_INT, None),
        "d_model": (_POSITIVE_INT, None),
        "encoder_layers": (_POSITIVE_INT, None),
        "encoder_attention_heads": (_POSITIVE_INT, None),
        "encoder_ffn_dim": (_POSITIVE_INT, None),
        "n_window": (_POSITIVE_INT, None),
        "max_source_positions": (_POSITIVE_INT, None),
        "dropout": (_POSITIVE_NUMBER, 0.0),
    },
    "speech": {
        "codebook_size": (_POSITIVE_INT, None),
        "group_size": (_POSITIVE_INT, None),
        "bos_token_id": (_TOKEN_ID, -4),
        "eos_token_id": (_TOKEN_ID, -3),
        "pad_token_id": (_TOKEN_ID, -2),
        "continuous_features_mode": (_STRING, "replace"),
    },
    "srh": {
        "hidden_size": (_POSITIVE_INT, None),
        "num_hidden_layers": (_POSITIVE_INT, None),
        "num_attention_heads": (_POSITIVE_INT, None),
        "num_key_value_heads": (_POSITIVE_INT, None),
        "head_dim": (_POSITIVE_INT, None),
        "intermediate_size": (_POSITIVE_INT, None),
        "rope_theta": (_POSITIVE_NUMBER, 0),
        "rms_norm_eps": (_POSITIVE_NUMBER, 1e-6),
        "max_position_embeddings": (_POSITIVE_INT, 0),
    },
    "special_ids": {
        "pad": (_TOKEN_ID, None),
        "eos": (_TOKEN_ID, None),
        "bos": (_TOKEN_ID, -1),
        "audio": (_TOKEN_ID, None),
        "audio_bos": (_TOKEN_ID, None),
        "audio_eos": (_TOKEN_ID, None),
        "sil": (_TOKEN_ID, None),
    },
}


def _check_value(where: str, kind: str, value: Any) -> None:
    ok = {
        _POSITIVE_INT: isinstance(value, int) and not isinstance(value, bool) and value > 0,
        _POSITIVE_NUMBER: isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
        _BOOL: isinstance(value, bool),
        _TOKEN_ID: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        _STRING: isinstance(value, str),
    }[kind]
    if not ok:
        wanted = {_POSITIVE_NUMBER: "non-negative number", _TOKEN_ID: "non-negative int (a token id)"}.get(kind, kind)
        raise ValueError(f"model params: {where} must be a {wanted}, got {value!r}")


def _section(params: dict, name: str) -> dict[str, Any]:
    """Validated copy of one section with defaults filled in (negative defaults are resolved by the caller)."""
    given = params.get(name)
    if not isinstance(given, dict):
        raise ValueError(f"model params: section '{name}' must be a mapping, got {given!r}")
    schema = _SCHEMA[name]
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ValueError(f"model params: unknown key(s) {unknown} in '{name}'; allowed: {sorted(schema)}")
    out = {}
    for key, (kind, default) in schema.items():
        if key not in given:
            if default is None:
                raise ValueError(f"model params: missing required key '{name}.{key}' ({kind})")
            out[key] = default
            continue
        _check_value(f"{name}.{key}", kind, given[key])
        out[key] = given[key]
    return out


def build_config(model_params: dict) -> FunAudioChatConfig:
    """A FunAudioChatConfig from a plain dict with five sections (every unknown key is an error).

    llm: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
        vocab_size, rope_theta; optional rms_norm_eps (1e-6), max_position_embeddings (2048), tie_word_embeddings
        (false), moe (false: Qwen3; true: Qwen3-MoE with num_experts (8), num_experts_per_tok (2),
        moe_intermediate_size (required), router_aux_loss_coef (0.001), output_router_logits (false; true adds the
        router load-balancing loss to the training loss)).
    encoder: num_mel_bins, d_model, encoder_layers, encoder_attention_heads, encoder_ffn_dim, n_window (chunks of
        2*n_window mel frames), max_source_positions; optional dropout (0.0).
    speech: codebook_size (codes + bos + eos + pad + one unused id), group_size (1 = 25 Hz backbone, 4, 5, 6, ...);
        optional bos_token_id, eos_token_id, pad_token_id (default codebook_size-4, -3, -2: right after the codes),
        continuous_features_mode ("replace").
    srh: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size;
        optional rope_theta (default: the LLM's), rms_norm_eps (1e-6), max_position_embeddings (default
        group_size * llm.max_position_embeddings: the SRH runs at 25 Hz).
    special_ids: text token ids from the tokenizer: pad (`<|endoftext|>`), eos (`<|im_end|>`), audio
        (`<|AUDIO|>`), audio_bos, audio_eos, sil (`<|sil|>`); optional bos (default: pad).
    """
    if not isinstance(model_params, dict):
        raise ValueError(f"model params must be a mapping with sections {sorted(_SCHEMA)}, got {model_params!r}")
    model_params = resolve_geometry(model_params)
    unknown = sorted(set(model_params) - set(_SCHEMA))
    if unknown:
        raise ValueError(f"model params: unknown section(s) {unknown}; allowed: {sorted(_SCHEMA)}")
    llm, enc, speech, srh, ids = (_section(model_params, name) for name in _SCHEMA)
    ids["bos"] = ids["pad"] if ids["bos"] == -1 else ids["bos"]
    for key, value in ids.items():
        if value >= llm["vocab_size"]:
            raise ValueError(f"model params: special_ids.{key}={value} is outside llm.vocab_size={llm['vocab_size']}")
    distinct = ("pad", "eos", "audio", "audio_bos", "audio_eos", "sil")
    if len({ids[k] for k in distinct}) != len(distinct):
        raise ValueError(f"model params: special_ids {distinct} must be distinct, got {[ids[k] for k in distinct]}")
    size = speech["codebook_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        speech[key] = size + speech[key] if speech[key] < 0 else speech[key]
        if not 0 <= speech[key] < size:
            raise ValueError(f"model params: speech.{key}={speech[key]} is outside codebook_size={size}")
    if speech["continuous_features_mode"] not in ("replace", "add"):
        raise ValueError(
            f"model params: speech.continuous_features_mode must be 'replace' or 'add', "
            f"got {speech['continuous_features_mode']!r}"
        )
    if enc["d_model"] % enc["encoder_attention_heads"] or enc["d_model"] % 2:
        raise ValueError(
            f"model params: encoder.d_model={enc['d_model']} must be even and divisible by "
            f"encoder.encoder_attention_heads={enc['encoder_attention_heads']}"
        )
    for name, section in (("llm", llm), ("srh", srh)):
        if section["num_attention_heads"] % section["num_key_value_heads"]:
            raise ValueError(
                f"model params: {name}.num_attention_heads={section['num_attention_heads']} must be a multiple of "
                f"{name}.num_key_value_heads={section['num_key_value_heads']}"
            )

    text_kwargs = dict(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_key_value_heads"],
        head_dim=llm["head_dim"],
        max_position_embeddings=llm["max_position_embeddings"],
        rms_norm_eps=float(llm["rms_norm_eps"]),
        rope_theta=float(llm["rope_theta"]),
        tie_word_embeddings=llm["tie_word_embeddings"],
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        sil_index=ids["sil"],
        audio_bos_index=ids["audio_bos"],
        audio_eos_index=ids["audio_eos"],
    )
    if llm["moe"]:
        if not llm["moe_intermediate_size"]:
            raise ValueError("model params: llm.moe is true, so llm.moe_intermediate_size is required")
        text_config = Qwen3MoeConfig(
            **text_kwargs,
            num_experts=llm["num_experts"],
            num_experts_per_tok=llm["num_experts_per_tok"],
            moe_intermediate_size=llm["moe_intermediate_size"],
            router_aux_loss_coef=float(llm["router_aux_loss_coef"]),
            output_router_logits=llm["output_router_logits"],
            norm_topk_prob=True,
        )
    else:
        text_config = Qwen3Config(**text_kwargs)

    crq = {
        "model_type": "qwen3",
        "vocab_size": size,
        "hidden_size": srh["hidden_size"],
        "num_hidden_layers": srh["num_hidden_layers"],
        "num_attention_heads": srh["num_attention_heads"],
        "num_key_value_heads": srh["num_key_value_heads"],
        "head_dim": srh["head_dim"],
        "intermediate_size": srh["intermediate_size"],
        "hidden_act": "silu",
        "rms_norm_eps": float(srh["rms_norm_eps"]),
        "rope_theta": float(srh["rope_theta"] or llm["rope_theta"]),
        "max_position_embeddings": srh["max_position_embeddings"]
        or speech["group_size"] * llm["max_position_embeddings"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
    }
    audio_config = FunAudioChatAudioConfig(
        num_mel_bins=enc["num_mel_bins"],
        d_model=enc["d_model"],
        encoder_layers=enc["encoder_layers"],
        encoder_attention_heads=enc["encoder_attention_heads"],
        encoder_ffn_dim=enc["encoder_ffn_dim"],
        dropout=float(enc["dropout"]),
        n_window=enc["n_window"],
        max_source_positions=enc["max_source_positions"],
        output_dim=llm["hidden_size"],
        codebook_size=size,
        bos_token_id=speech["bos_token_id"],
        eos_token_id=speech["eos_token_id"],
        pad_token_id=speech["pad_token_id"],
        group_size=speech["group_size"],
        continuous_features_mode=speech["continuous_features_mode"],
        crq_transformer_config=crq,
    )
    return FunAudioChatConfig(
        text_config=text_config,
        audio_config=audio_config,
        audio_token_index=ids["audio"],
        architectures=["FunAudioChatForConditionalGeneration"],
    )


# Qwen3 special-token ids (<|endoftext|>, <|im_end|>) and the audio tokens that third-party ports of the released
# checkpoint report. `<|sil|>` is not documented anywhere we could check: 151673 (the next free added-token id after
# `<|audio_pad|>` = 151672) is an assumption; override it from the real tokenizer when loading the released weights.
PAPER_SPECIAL_IDS = {
    "pad": 151643, "eos": 151645, "audio": 151669, "audio_bos": 151670, "audio_eos": 151671, "sil": 151673,
}


def paper_8b_params(group_size: int = 5) -> dict[str, dict[str, Any]]:
    """The `build_config` dict of the paper's 8B model."""
    return {
        "llm": {
            "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936, "rope_theta": 1_000_000.0,
            "max_position_embeddings": 40960,
        },
        "encoder": {
            "num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120, "n_window": 100, "max_source_positions": 1500,
        },
        # 6561 CosyVoice 3 S3 codes (0..6560), then bos (also the delay token), eos and pad.
        "speech": {"codebook_size": 6564, "group_size": group_size,
                   "bos_token_id": 6561, "eos_token_id": 6562, "pad_token_id": 6563},
        "srh": {
            "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "head_dim": 128, "intermediate_size": 3072, "rope_theta": 1_000_000.0,
        },
        "special_ids": dict(PAPER_SPECIAL_IDS),
    }


# `model.geometry` in params: a named geometry that fills every section (and key) the params do not give.
GEOMETRIES = {"paper_8b": paper_8b_params}


def resolve_geometry(model_params: dict) -> dict:
    """`model_params` with its named `geometry` (if any) filled in under the keys it gives; without one, as is.

    Keys given in params win, section by section and key by key, and `speech.group_size` picks the grouping of
    the named geometry. Sections that come from a component's own config (an imported LLM or encoder) are set
    over this by the caller.
    """
    params = {name: dict(section) if isinstance(section, dict) else section for name, section in model_params.items()}
    name = params.pop("geometry", None)
    if name is None:
        return params
    if name not in GEOMETRIES:
        raise ValueError(f"model params: geometry {name!r} is unknown; expected one of {sorted(GEOMETRIES)}")
    group_size = int((params.get("speech") or {}).get("group_size", 5))
    out = GEOMETRIES[name](group_size)
    for section, values in params.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def paper_8b_config(group_size: int = 5) -> FunAudioChatConfig:
    """The paper's 8B geometry: Qwen3-8B LLM, Whisper-large-v3 encoder, SRH Qwen3 hidden 1024 x 28 layers."""
    return build_config(paper_8b_params(group_size))
