"""Configuration classes of the Fun-Audio-Chat (DRSR) model, compatible with the official `config.json`.
`FunAudioChatConfig` holds a text (LLM) sub-config and a `FunAudioChatAudioConfig` (encoders, codebook, SRH)."""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# The Speech Refined Head of the 8B model: a Qwen3 with Qwen3-0.6B geometry (hidden 1024 x 28 layers).
DEFAULT_CRQ_TRANSFORMER_CONFIG: dict[str, Any] = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "tie_word_embeddings": False,
}


@strict
class FunAudioChatAudioConfig(PreTrainedConfig):
    r"""
    Audio side of Fun-Audio-Chat: the Whisper-style continuous encoder (`continuous_audio_tower`), the discrete
    speech-token encoder with grouping (`audio_tower`) and the Speech Refined Head (`audio_invert_tower`).

    Encoder fields follow Whisper (`num_mel_bins`, `d_model`, `encoder_layers`, ...); `n_window` is half the
    attention window in mel frames (chunks of `2 * n_window` frames), `output_dim` the LLM hidden size.
    Speech-codebook fields: `codebook_size` (codes plus bos/eos/pad), `bos_token_id` (also the delay token),
    `eos_token_id`, `pad_token_id`, and `group_size` G (25 Hz tokens per LLM step; 1 = no grouping).
    `continuous_features_mode` is "replace" (official default) or "add". `crq_transformer_config` is a plain
    dict with `model_type` "qwen3", the SRH transformer (its `vocab_size` is unused: the SRH has no token embedding).
    """

    model_type = "funaudiochat_audio_encoder"
    attribute_map = {
        "num_hidden_layers": "encoder_layers",
        "num_attention_heads": "encoder_attention_heads",
    }

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    activation_function: str = "gelu"
    dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    activation_dropout: float | int = 0.0
    n_window: int = 100
    max_source_positions: int = 1500
    output_dim: int = 4096
    initializer_range: float = 0.02
    codebook_size: int = 6564
    bos_token_id: int = 6561
    eos_token_id: int = 6562
    pad_token_id: int = 6563
    group_size: int = 5
    continuous_features_mode: str = "replace"
    enable_audio_invert_tower: bool = True
    crq_transformer_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.crq_transformer_config is None:
            self.crq_transformer_config = dict(DEFAULT_CRQ_TRANSFORMER_CONFIG, vocab_size=self.codebook_size)
        super().__post_init__(**kwargs)
        if self.continuous_features_mode not in ("replace", "add"):
            raise ValueError(
                "audio_config.continuous_features_mode must be 'replace' or 'add', "
                f"got {self.continuous_features_mode!r}"
            )
        if self.group_size < 1:
            raise ValueError(f"audio_config.group_size must be >= 1, got {self.group_size}")
        if self.n_window > self.max_source_positions:
            raise ValueError(
                f"audio_config.n_window ({self.n_window}) exceeds max_source_positions ({self.max_source_positions}): "
                "a chunk's positions would run past the sinusoid table"
            )
        if self.d_model % self.encoder_attention_heads or self.d_model % 2:
            raise ValueError(
                f"audio_config.d_model ({self.d_model}) must be even and divisible by "
                f"encoder_attention_heads ({self.encoder_attention_heads})"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.codebook_size:
                raise ValueError(
                    f"audio_config.{name}={getattr(self, name)} is outside the speech codebook "
                    f"[0, codebook_size={self.codebook_size})"
                )
        if self.crq_transformer_config.get("model_type", "qwen3") != "qwen3":
            raise ValueError(
                "audio_config.crq_transformer_config.model_type must be 'qwen3' (the official SRH is a Qwen3 stack), "
                f"got {self.crq_transformer_config.get('model_type')!r}"
            )

    def get_crq_config(self) -> PreTrainedConfig:
        """The SRH transformer's Qwen3 config, built as the official code does (`AutoConfig.for_model`)."""
        crq = dict(self.crq_transformer_config)
        return AutoConfig.for_model(crq.pop("model_type", "qwen3"), **crq)


@strict
class FunAudioChatConfig(PreTrainedConfig):
    r"""
    Fun-Audio-Chat: a causal LM (`text_config`, Qwen3 or Qwen3-MoE) fed 5 Hz grouped speech features.

    `text_config` carries, besides the LLM fields, the FunAudioChat extras `sil_index` (`<|sil|>`, the text
    filler of speech slots), `audio_bos_index` and `audio_eos_index` (`<|audio_bos|>`, `<|audio_eos|>`);
    its `pad_token_id` and `eos_token_id` are also used by the audio code. `audio_token_index` is the id of the
    `<|AUDIO|>` placeholder (one per grouped audio position); `ignore_index` the label value that is not learned.
    """

    model_type = "funaudiochat"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
        "audio_config": FunAudioChatAudioConfig,
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_token_index: int = 151646
    ignore_index: int = -100
    hidden_size: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text, audio = self.text_config, self.audio_config
        if self.hidden_size is None:
            self.hidden_size = text.hidden_size
        if audio.output_dim != text.hidden_size:
            raise ValueError(
                f"audio_config.output_dim ({audio.output_dim}) must equal text_config.hidden_size ({text.hidden_size})"
            )
        for name in ("sil_index", "audio_bos_index", "audio_eos_index", "eos_token_id"):
            value = getattr(text, name, None)
            if not isinstance(value, int) or not 0 <= value < text.vocab_size:
                raise ValueError(
                    f"text_config.{name} must be a token id in [0, vocab_size={text.vocab_size}), got {value!r}"
                )
        if not 0 <= self.audio_token_index < text.vocab_size:
            raise ValueError(
                f"audio_token_index={self.audio_token_index} is outside the text vocabulary (size {text.vocab_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # transformers 5 stores RoPE as `rope_parameters`; the official code (transformers 4.52) reads `rope_theta`.
        # Writing both keeps our checkpoints loadable by the official code; transformers 5 prefers `rope_parameters`.
        rope = output["text_config"].get("rope_parameters") or {}
        if "rope_theta" in rope:
            output["text_config"].setdefault("rope_theta", rope["rope_theta"])
        return output


__all__ = ["FunAudioChatAudioConfig", "FunAudioChatConfig", "DEFAULT_CRQ_TRANSFORMER_CONFIG"]
