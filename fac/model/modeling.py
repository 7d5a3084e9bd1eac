"""Fun-Audio-Chat (DRSR) in PyTorch: speech encoders, 5 Hz grouping, shared causal LM, text head and Speech
Refined Head, with the official parameter names, label construction and losses (see conformance/ARCH_NOTES)."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration import FunAudioChatConfig
from .encoder import FunAudioChatContinuousEncoder, FunAudioChatDiscreteEncoder
from .generation import FunAudioChatGenerationMixin
from .srh import FunAudioChatSpeechRefinedHead

SRH_HEAD = "audio_invert_tower.lm_head.weight"
SPEECH_EMBEDDING = "audio_tower.embed_tokens.weight"
# Third-party ports report this key in the released checkpoint; the official code deletes the module, so it is ignored.
IGNORED_CHECKPOINT_KEYS = (r"audio_invert_tower\.crq_transformer\.embed_tokens\.weight",)


@dataclass
class FunAudioChatOutput(ModelOutput):
    """Losses and logits of a forward pass, plus the intermediate tensors the conformance fixture records.

    text_logits [B, S, V]; speech_logits [B, S*G, C] (position i, sub-frame j at index G*i + j);
    text_labels [B, S] and speech_labels [B, S*G] are the unshifted targets built from `labels`;
    inputs_embeds [B, S, H] is the LLM input after audio scatter; last_hidden_state [B, S, H] the LLM final-norm
    output; continuous_features [A_f, L_sp, H] the continuous tower output; audio_features [A, L_sp/G, H] the
    grouped audio features before text averaging; srh_conditioning [B, S, H] = last hidden + text conditioning;
    speech_label_embeds [B, S, G*H] the teacher-forcing embeddings before the roll.
    """

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    speech_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    speech_logits: torch.Tensor | None = None
    text_labels: torch.Tensor | None = None
    speech_labels: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    continuous_features: torch.Tensor | None = None
    audio_features: torch.Tensor | None = None
    srh_conditioning: torch.Tensor | None = None
    speech_label_embeds: torch.Tensor | None = None


@dataclass
class AudioSlots:
    """Per-audio grouped features and bookkeeping; A audios, Gm = L_sp / G slots each."""

    features: torch.Tensor  # [A, Gm, H] LLM inputs for the audio slots
    slot_counts: torch.Tensor  # [A] number of valid slots n_a = ceil(speech length / G)
    speech_labels: torch.Tensor  # [A, Gm, G] speech ids per slot, ignore_index where padded
    speech_mask: torch.Tensor  # [A, L_sp] 1 on real speech tokens
    continuous: torch.Tensor | None  # [A_f, L_sp, H] continuous tower output
    grouped: torch.Tensor  # [A, Gm, H] grouped features before text averaging
    text_embeds: torch.Tensor | None = None  # [A, Gm, H] transcript embedding per slot (training only)
    text_labels: torch.Tensor | None = None  # [A, Gm] transcript token per slot, ignore_index elsewhere

    @property
    def valid(self) -> torch.Tensor:
        """[A, Gm] True on the first n_a slots of each audio: the ones placed into the LLM sequence."""
        gm = self.features.shape[1]
        return torch.arange(gm, device=self.features.device)[None, :] < self.slot_counts[:, None]


class FunAudioChatPreTrainedModel(PreTrainedModel):
    config: FunAudioChatConfig
    config_class = FunAudioChatConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["FunAudioChatEncoderLayer", "Qwen3DecoderLayer", "Qwen3MoeDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = list(IGNORED_CHECKPOINT_KEYS)


class FunAudioChatForConditionalGeneration(FunAudioChatGenerationMixin, FunAudioChatPreTrainedModel):
    """Speech in, text and speech out. Sub-modules and parameter names follow the official checkpoint."""

    _tied_weights_keys = {SRH_HEAD: SPEECH_EMBEDDING}

    def __init__(self, config: FunAudioChatConfig):
        super().__init__(config)
        audio = config.audio_config
        self.continuous_audio_tower = FunAudioChatContinuousEncoder(audio)
        self.audio_tower = FunAudioChatDiscreteEncoder(audio)
        self.audio_invert_tower = FunAudioChatSpeechRefinedHead(audio) if audio.enable_audio_invert_tower else None
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # The SRH output head always shares the speech-token embedding (official code ties it unconditionally);
        # transformers only ties when `config.tie_word_embeddings`, which refers to the LLM's own head.
        tied = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        if not all_submodels and self.config.audio_config.enable_audio_invert_tower:
            tied[SRH_HEAD] = SPEECH_EMBEDDING
        return tied

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ----------------------------------------------------------------------------------------------- audio side

    def encode_audio(
        self,
        speech_ids: torch.Tensor,
        speech_attention_mask: torch.Tensor,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
    ) -> AudioSlots:
        """Grouped audio features for every audio (user and assistant), fused with transcripts when given."""
        audio_cfg, ignore = self.config.audio_config, self.config.ignore_index
        g = audio_cfg.group_size
        num_audios, length = speech_ids.shape
        padded_length = -(-length // g) * g  # L_sp: a multiple of G
        pad = padded_length - length
        speech_ids = F.pad(speech_ids, (0, pad), value=audio_cfg.pad_token_id)  # [A, L_sp]
        speech_mask = F.pad(speech_attention_mask, (0, pad), value=0)
        speech_labels = speech_ids.masked_fill(speech_mask == 0, ignore).view(num_audios, padded_length // g, g)
        slot_counts = -(-speech_attention_mask.sum(dim=1) // g)  # n_a = ceil(len / G)

        continuous = None
        if input_features is not None and input_features.shape[0] > 0:
            continuous = self.continuous_audio_tower(input_features, feature_attention_mask, padded_length)
        grouped = self.audio_tower(speech_ids, continuous, feature_exist_mask)  # [A, Gm, H]
        slots = AudioSlots(grouped, slot_counts, speech_labels, speech_mask, continuous, grouped)
        if text_ids is not None and text_ids.numel() > 0:
            self._fuse_transcripts(slots, text_ids, text_attention_mask, speech_mask)
        return slots

    def _fuse_transcripts(self, slots: AudioSlots, text_ids, text_attention_mask, speech_mask) -> None:
        """Training: average each audio slot with its transcript token (one per slot, then `<|sil|>`)."""
        text_cfg, ignore, g = self.config.text_config, self.config.ignore_index, self.config.audio_config.group_size
        num_slots = slots.features.shape[1]
        pad_id = text_cfg.pad_token_id if text_cfg.pad_token_id else text_cfg.eos_token_id
        # Truncated to the batch-wide slot count: a transcript longer than its own audio loses its tail later.
        text = text_ids[:, :num_slots]
        text = F.pad(text, (0, num_slots - text.shape[1]), value=pad_id)  # [A, Gm]
        filler = text == text_cfg.eos_token_id
        if text_cfg.pad_token_id is not None:
            filler |= text == text_cfg.pad_token_id
        text = text.masked_fill(filler, text_cfg.sil_index)
        has_text = text_attention_mask.bool()[:, None]  # [A, 1]
        text_embeds = self.get_input_embeddings()(text) * has_text[..., None].to(slots.features.dtype)
        # Every row is averaged, so audio without a transcript (the user's) is halved: official behaviour.
        slots.features = (text_embeds + slots.features) / 2
        slots.text_embeds = text_embeds
        slot_has_speech = speech_mask[:, ::g] == 1  # [A, Gm]: the slot's first 25 Hz token is real
        slots.text_labels = torch.where(slot_has_speech & has_text, text, torch.full_like(text, ignore))

    def _scatter_slots(self, embeds: torch.Tensor, audio_positions: torch.Tensor, slots: AudioSlots, values):
        """Place the first n_a slots of every audio, in order, at the `<|AUDIO|>` positions of `embeds`."""
        valid = slots.valid
        count, needed = int(audio_positions.sum()), int(valid.sum())
        if count != needed:
            raise ValueError(
                f"input_ids hold {count} <|AUDIO|> tokens (id {self.config.audio_token_index}) but the speech streams "
                f"need {needed} (sum over audios of ceil(speech length / group_size "
                f"{self.config.audio_config.group_size}))"
            )
        return embeds.masked_scatter(audio_positions[..., None], values[valid].to(embeds.dtype))

    def _build_labels(self, input_ids, labels, slots: AudioSlots | None):
        """Text labels [B, S] (slot transcript tokens at `<|AUDIO|>`) and speech labels [B, S*G]."""
        ignore, g = self.config.ignore_index, self.config.audio_config.group_size
        batch, seq = input_ids.shape
        audio_positions = input_ids == self.config.audio_token_index
        not_learned = labels == ignore
        speech_labels = labels.new_full((batch, seq, g), ignore)
        text_labels = labels.clone()
        if slots is not None:
            speech_labels[audio_positions] = slots.speech_labels[slots.valid]
            if slots.text_labels is not None:
                text_labels[audio_positions] = slots.text_labels[slots.valid]
        speech_labels[not_learned] = ignore  # user audio is context, not a target
        speech_labels[labels == self.config.text_config.audio_eos_index] = self.config.audio_config.eos_token_id
        text_labels[not_learned] = ignore
        return text_labels, speech_labels.view(batch, seq * g)

    def _srh_position_ids(self, position_ids: torch.Tensor) -> torch.Tensor:
        """LLM positions p [B, S] -> SRH positions G*p + j [B, S*G]; zero after a row's last non-zero p (padding)."""
        g = self.config.audio_config.group_size
        batch, seq = position_ids.shape
        sub = g * position_ids[..., None] + torch.arange(g, device=position_ids.device)  # [B, S, G]
        index = torch.arange(seq, device=position_ids.device)[None, :]
        last_nonzero = torch.where(position_ids != 0, index, torch.zeros_like(index)).amax(dim=1, keepdim=True)
        sub = sub.masked_fill((index > last_nonzero)[..., None], 0)
        return sub.view(batch, seq * g)

    # ----------------------------------------------------------------------------------------------- forward

    def run_language_model(self, inputs_embeds, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        """The shared LLM: returns (final-norm hidden [B, n, H], text logits [B, n, V], aux loss or None, cache)."""
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=True,
        )
        # hidden_states[-1] is the final-norm output (the tensor the lm_head sees) in transformers 5 LMs.
        return out.hidden_states[-1], out.logits, getattr(out, "aux_loss", None), out.cache

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        speech_ids: torch.LongTensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        text_ids: torch.LongTensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> FunAudioChatOutput:
        """Training/scoring forward. input_ids/attention_mask/labels [B, S] (labels unshifted, LLaMA-Factory style);
        speech_ids/speech_attention_mask [A, L] one row per audio in `<|AUDIO|>` order; text_ids [A, T] transcripts
        with text_attention_mask [A]; input_features [A_f, M, T_f] with feature_attention_mask [A_f, T_f] for the
        audios marked in feature_exist_mask [A]. The caller's tensors are never modified."""
        cfg, ignore = self.config, self.config.ignore_index
        g = cfg.audio_config.group_size
        batch, seq = input_ids.shape
        text_embeds = self.get_input_embeddings()(input_ids)  # [B, S, H]
        audio_positions = input_ids == cfg.audio_token_index
        inputs_embeds, srh_text, slots = text_embeds, text_embeds, None
        if speech_ids is not None:
            if speech_attention_mask is None:
                speech_attention_mask = torch.ones_like(speech_ids)
            slots = self.encode_audio(
                speech_ids, speech_attention_mask, input_features, feature_attention_mask, feature_exist_mask,
                text_ids, text_attention_mask,
            )
            inputs_embeds = self._scatter_slots(text_embeds, audio_positions, slots, slots.features)
            if slots.text_embeds is not None:
                # The SRH is conditioned on the transcript token of each slot (zero for user audio).
                srh_text = self._scatter_slots(text_embeds, audio_positions, slots, slots.text_embeds)

        last_hidden, text_logits, aux_loss, _ = self.run_language_model(inputs_embeds, attention_mask, position_ids)

        text_labels = speech_labels = text_loss = speech_loss = loss = None
        if labels is not None:
            text_labels, speech_labels = self._build_labels(input_ids, labels, slots)
            text_loss = mean_cross_entropy(text_logits[:, :-1], text_labels[:, 1:], ignore)

        speech_logits = conditioning = label_embeds = None
        if self.audio_invert_tower is not None:
            conditioning = last_hidden + srh_text.detach()
            srh_inputs = self.audio_invert_tower.ungroup(conditioning)  # [B, S*G, H]
            if speech_labels is not None:
                label_ids = speech_labels.masked_fill(speech_labels == ignore, cfg.audio_config.pad_token_id)
                label_embeds = self.audio_tower.embed_tokens(label_ids)  # [B, S*G, H]
                # Sub-frame q gets the embedding of label q+G-1: the 25 Hz token just before its target (q+G).
                srh_inputs = srh_inputs + label_embeds.roll(-(g - 1), dims=1)
                label_embeds = label_embeds.view(batch, seq, -1)  # [B, S, G*H]
            srh_mask = attention_mask.repeat_interleave(g, dim=1) if attention_mask is not None else None
            srh_positions = self._srh_position_ids(position_ids) if position_ids is not None else None
            speech_logits, _ = self.audio_invert_tower(srh_inputs, srh_mask, srh_positions)
            if speech_labels is not None:
                targets = F.pad(speech_labels[:, g:], (0, g), value=ignore)  # sub-frame q predicts label q+G
                speech_loss = mean_cross_entropy(speech_logits, targets, ignore)

        if text_loss is not None:
            loss = text_loss if speech_loss is None else text_loss + speech_loss
            if aux_loss is not None:
                loss = loss + cfg.text_config.router_aux_loss_coef * aux_loss
        return FunAudioChatOutput(
            loss=loss,
            text_loss=text_loss,
            speech_loss=speech_loss,
            aux_loss=aux_loss,
            text_logits=text_logits,
            speech_logits=speech_logits,
            text_labels=text_labels,
            speech_labels=speech_labels,
            inputs_embeds=inputs_embeds,
            last_hidden_state=last_hidden,
            continuous_features=slots.continuous if slots is not None else None,
            audio_features=slots.grouped if slots is not None else None,
            srh_conditioning=conditioning,
            speech_label_embeds=label_embeds,
        )

    # ----------------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As transformers' `from_pretrained`, but a local checkpoint is checked first (see `check_checkpoint`):
        another model type, missing or unexpected tensors, or a shape mismatch raise instead of warning."""
        if Path(pretrained_model_name_or_path).is_dir():
            check_checkpoint(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy in float32 averaged over the targets that are not ignore_index (0 if there are none)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    if not (targets != ignore_index).any():
        return logits.sum() * 0.0  # keeps the graph connected for batches without such targets
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def _checkpoint_tensor_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, file name) from the safetensors headers of a folder (single file or sharded)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or model.safetensors.index.json) in this folder")
    shapes = {}
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{index}: names the shard {name}, which is not in {folder} (copy the whole "
                                    "checkpoint folder)")
        try:
            with safe_open(str(folder / name), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = (tuple(f.get_slice(key).get_shape()), name)
        except SafetensorError as err:
            raise ValueError(f"{folder / name}: not a readable safetensors file ({err}): truncated or corrupt, "
                             "e.g. by a copy or a write that did not finish") from err
    return shapes


def check_checkpoint(path: str | Path) -> FunAudioChatConfig:
    """Check that `path` holds a Fun-Audio-Chat checkpoint whose tensors match its config exactly.

    Raises ValueError naming the file, the parameter, and the expected versus found shape when the config's
    model_type is not "funaudiochat", a tensor is missing or unexpected, or a shape differs. Returns the config.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; a checkpoint folder holds config.json and model.safetensors")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != FunAudioChatConfig.model_type:
        raise ValueError(
            f"{config_file}: model_type is {model_type!r}, expected {FunAudioChatConfig.model_type!r} "
            "(this is not a Fun-Audio-Chat checkpoint)"
        )
    config = FunAudioChatConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = FunAudioChatForConditionalGeneration(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(model.all_tied_weights_keys)
    found = _checkpoint_tensor_shapes(folder)

    problems = []
    for name, shape in expected.items():
        if name not in found:
            if name not in tied:
                problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif found[name][0] != shape:
            problems.append(
                f"{found[name][1]}: {name} has shape {list(found[name][0])}, the config expects {list(shape)}"
            )
    for name, (shape, file) in found.items():
        if name not in expected and not any(re.fullmatch(p, name) for p in IGNORED_CHECKPOINT_KEYS):
            problems.append(f"{file}: unexpected tensor {name} with shape {list(shape)}")
    if problems:
        listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"{folder}: checkpoint does not match {config_file.name}:\n  {listing}")
    return config


def load_checkpoint(path: str | Path, **kwargs) -> FunAudioChatForConditionalGeneration:
    """Load a checked Fun-Audio-Chat checkpoint folder (raises on any mismatch, see `check_checkpoint`)."""
    return FunAudioChatForConditionalGeneration.from_pretrained(path, **kwargs)
