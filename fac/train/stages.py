"""The training stages of the recipe, each a configuration of the one Trainer (called by `fac train <stage>`).

base-llm: the tiny Qwen3 learns the world's facts from text (or a pretrained LLM is imported);
encoder: the tiny "Whisper" learns to recognise the world's words (CTC) before anything uses it;
init: the DRSR model assembled from both; drsr: pre-alignment, Core-Cocktail stage 1 and stage 2.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

from fac.atomic import folder as atomic_folder
from fac.data.steps import write_json
from fac.model import FunAudioChatForConditionalGeneration, build_config, load_checkpoint, resolve_geometry
from fac.model.configuration import FunAudioChatAudioConfig
from fac.model.encoder import FunAudioChatContinuousEncoder
from fac.model.processing import SpecialIds
from fac.train.data import FeatureCache, SpokenData, SpokenRecord, TextData, encode_text, load_records
from fac.train.trainer import (StageConfig, Trainer, epoch_mode, files_identity, fingerprint,
                               step_rng)

log = logging.getLogger("fac.train")


def resolve_steps(stage: dict, num_examples: int) -> dict:
    """A stage with `epochs` trains that many passes over its `num_examples`: the trainer counts optimizer steps of
    the global batch (batch_size x grad_accum x processes), the last one finishing the last pass."""
    if "steps" in stage:
        return stage
    if "epochs" not in stage:
        raise ValueError(f"stage params need 'steps' or 'epochs'; got keys {sorted(stage)}")
    world = max(1, int(stage.get("gpus") or stage.get("processes") or 1))
    per_step = stage.get("batch_size", 8) * stage.get("grad_accum", 1) * world
    return {**stage, "steps": max(1, math.ceil(stage["epochs"] * num_examples / per_step))}


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected the text tokenizer folder)")
    return AutoTokenizer.from_pretrained(path)


def special_id_params(tokenizer) -> dict:
    from fac.data.text_tokenizer import special_ids

    ids = special_ids(tokenizer)
    return {k: ids[k] for k in ("pad", "eos", "bos", "audio", "audio_bos", "audio_eos", "sil")}


def speech_codebook_size(speech_tokenizer_dir: str | Path) -> int:
    """Codes + speech bos + eos + pad + one unused id, as the official codebook layout (6561 + 4 reserved)."""
    cfg = json.loads((Path(speech_tokenizer_dir) / "config.json").read_text())
    return int(cfg["codebook_size"]) + 4


# The language model the DRSR model wraps (fac.model.builders): Qwen3.
LLM_MODEL_TYPES = ("qwen3",)
_LLM_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
             "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
_ENCODER_KEYS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "n_window", "max_source_positions")


def llm_section(llm_config, origin: str) -> dict:
    """The DRSR config's `llm` section from a base LLM's own config (trained in the DAG or imported)."""
    if llm_config.model_type not in LLM_MODEL_TYPES:
        raise ValueError(f"{origin}: a {llm_config.model_type!r} model; the DRSR language model is one of "
                         f"{list(LLM_MODEL_TYPES)} (a transformers causal LM folder of that type)")
    section = {key: getattr(llm_config, key) for key in _LLM_KEYS}
    rope = getattr(llm_config, "rope_parameters", None) or {}
    section["rope_theta"] = float(rope.get("rope_theta", getattr(llm_config, "rope_theta", None) or 10000.0))
    return section


def encoder_section(audio_config) -> dict:
    """The DRSR config's `encoder` section from an encoder checkpoint's config.json (FunAudioChatAudioConfig)."""
    return {key: getattr(audio_config, key) for key in _ENCODER_KEYS}


def model_config(model_params: dict, tokenizer, codebook_size: int, llm_config=None, audio_config=None,
                 origin: str = "base LLM"):
    """The DRSR config of an experiment: the LLM's and the encoder's geometry from their own configs where given
    (else from params), the SRH and grouping from params, every text id from the tokenizer. The vocabulary is the
    LLM's embedding rows, which may exceed the tokenizer (Qwen3: 151,936 rows for 151,674 tokens)."""
    params = resolve_geometry(json.loads(json.dumps(model_params)))
    if llm_config is not None:
        params["llm"] = llm_section(llm_config, origin)
    else:
        params["llm"]["vocab_size"] = len(tokenizer)
    if audio_config is not None:
        params["encoder"] = encoder_section(audio_config)
    if len(tokenizer) > params["llm"]["vocab_size"]:
        raise ValueError(f"{origin}: {params['llm']['vocab_size']} token embeddings, but the tokenizer has "
                         f"{len(tokenizer)} tokens; the base LLM must be saved with the experiment's tokenizer")
    params.setdefault("speech", {})["codebook_size"] = codebook_size
    params["special_ids"] = special_id_params(tokenizer)
    return build_config(params)


def _save_with_tokenizer(model, tokenizer, out_dir: str | Path, summary: dict, history: list | None = None) -> None:
    """A Hugging Face checkpoint folder with the tokenizer, the training summary and the loss history."""
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(summary, tmp / "train_summary.json")
        if history is not None:
            write_history(history, tmp)


# --------------------------------------------------------------------------------------- base LLM


def import_llm(source: str, tokenizer, out_dir: str | Path) -> dict:
    """LLM kind `import`: a transformers causal LM folder (e.g. Qwen3-8B), saved with the experiment's tokenizer.

    Its embedding rows are resized only when the tokenizer has more tokens than it has rows (Qwen3 has 151,936 rows
    for 151,669 tokens, so Fun-Audio-Chat's five audio tokens need none); every tensor is otherwise kept as it is.
    """
    from transformers import AutoConfig

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"base_llm.import {folder}: no config.json (expected a transformers model folder)")
    llm_section(AutoConfig.from_pretrained(folder), f"base_llm.import {folder}")  # a model the DRSR model can wrap
    model = AutoModelForCausalLM.from_pretrained(folder)
    rows = model.get_input_embeddings().weight.shape[0]
    resized = len(tokenizer) > rows
    if resized:
        model.resize_token_embeddings(len(tokenizer))
        log.info("base LLM %s: %d embedding rows resized to the tokenizer's %d tokens", folder, rows, len(tokenizer))
    summary = {"stage": "base_llm", "imported": str(folder), "embedding_rows": max(rows, len(tokenizer)),
               "resized": resized}
    _save_with_tokenizer(model, tokenizer, out_dir, summary)
    return summary


def train_base_llm(stage: dict, model_params: dict, world_dir: str, tokenizer_dir: str, out_dir: str,
                   state_root: str, run_info: dict) -> dict:
    tokenizer = load_tokenizer(tokenizer_dir)
    if stage.get("import"):
        return import_llm(stage["import"], tokenizer, out_dir)
    model_params = resolve_geometry(model_params)
    data = TextData(world_dir, tokenizer, stage.get("slot_questions"),
                    int(model_params.get("speech", {}).get("group_size", 5)), bool(stage.get("packing")),
                    stage.get("max_length"), float(stage.get("dialogues", 0.0)))
    cfg = StageConfig.from_params(resolve_steps(stage, len(data.examples)))
    llm = model_params["llm"]
    torch.manual_seed(cfg.seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=llm["hidden_size"],
                         intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_hidden_layers"],
                         num_attention_heads=llm["num_attention_heads"],
                         num_key_value_heads=llm["num_key_value_heads"], head_dim=llm["head_dim"],
                         rope_theta=float(llm["rope_theta"]), max_position_embeddings=llm.get("max_position_embeddings", 2048),
                         tie_word_embeddings=llm.get("tie_word_embeddings", False),
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)

    noise = float((stage.get("slot_questions") or {}).get("noise", 0.0))

    def loss_fn(m, batch):
        slot_mask, seed = batch.pop("slot_mask", None), batch.pop("noise_seed", None)
        segments = batch.pop("segment_ids", None)
        # No cache: with one, transformers builds a plain causal mask over a packed row (fac.train.packing).
        if slot_mask is None:
            return m(**batch, use_cache=False).loss, {}
        ids = batch.pop("input_ids")
        embeds = getattr(m, "module", m).get_input_embeddings()(ids)
        return m(inputs_embeds=slot_noise(embeds, slot_mask, int(seed), noise, segments, batch.get("position_ids")),
                 **batch, use_cache=False).loss, {}

    trainer = Trainer(model, cfg, loss_fn, lambda step: data.batch(step, cfg.batch_size, cfg.seed),
                      Path(state_root) / f"base_llm-{fingerprint(stage, model_params, text_identity(world_dir, tokenizer_dir))}",
                      "base_llm", run_info)
    summary = trainer.train()
    _save_with_tokenizer(model, tokenizer, out_dir, summary, trainer.history)
    trainer.finish()
    return summary


def slot_noise(embeds: torch.Tensor, mask: torch.Tensor, seed: int, noise: float,
               segments: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Embeddings [B, L, H] with Gaussian noise at the `mask`ed (audio-slot) positions: per example a level drawn
    uniformly in [0, noise], times each embedding's norm (an isotropic vector of that relative length).

    An example is a row, or in a packed batch a segment (`segments` [B, L]: the example index of each position,
    -1 on padding, and `positions` [B, L]: its position in the example; fac.train.packing.pack_token_rows). The
    draws are those of the same examples one per row, so a packed batch gets, token for token, the noise it
    would get unpacked."""
    g = torch.Generator().manual_seed(seed)
    if segments is None:
        level = (torch.rand(embeds.shape[0], 1, 1, generator=g) * noise).to(embeds.device, embeds.dtype)
        z = torch.randn(embeds.shape, generator=g)
    else:
        segments, positions = segments.cpu(), positions.cpu()
        real = segments >= 0
        count, width = int(segments.max()) + 1, int(positions[real].max()) + 1  # the unpacked batch's shape
        level = torch.rand(count, generator=g) * noise
        unpacked = torch.randn((count, width, embeds.shape[-1]), generator=g)
        z = torch.zeros(embeds.shape)
        z[real] = unpacked[segments[real], positions[real]]
        level = torch.where(real, level[segments.clamp(min=0)], 0.0)[..., None].to(embeds.device, embeds.dtype)
    z = z.to(embeds.device, embeds.dtype) / embeds.shape[-1] ** 0.5
    noisy = embeds + z * level * embeds.norm(dim=-1, keepdim=True).detach()
    return torch.where(mask[..., None].to(embeds.device), noisy, embeds)


def write_history(history: list[dict], out_dir: str | Path) -> None:
    (Path(out_dir) / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


# --------------------------------------------------------------------------------------- encoder (tiny ASR)


def encoder_output_lengths(feature_lengths: torch.Tensor, n_window: int) -> torch.Tensor:
    """Valid 25 Hz frames of the continuous encoder for clips of `feature_lengths` mel frames.

    Each chunk of c <= 2*n_window frames gives (c-1)//2+1 frames after the stride-2 conv; the audio's frames
    are then average-pooled in pairs (an odd last frame dropped) when there are at least two.
    """
    out = []
    for length in feature_lengths.tolist():
        chunk = 2 * n_window
        full, rest = divmod(int(length), chunk)
        n50 = full * ((chunk - 1) // 2 + 1) + (((rest - 1) // 2 + 1) if rest else 0)
        out.append(n50 // 2 if n50 >= 2 else n50)
    return torch.tensor(out, dtype=torch.long)


def group_frames(hidden: torch.Tensor, lengths: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[A, T, H] 25 Hz frames -> [A, ceil(T/G), H]: the mean over each G frames, zero padding counted, as the
    DRSR model groups continuous features before the adapter; lengths [A] -> ceil(lengths/G)."""
    if group_size == 1:
        return hidden, lengths
    a, t, h = hidden.shape
    slots = -(-t // group_size)
    hidden = F.pad(hidden, (0, 0, 0, slots * group_size - t)).view(a, slots, group_size, h).mean(dim=2)
    return hidden, (lengths + group_size - 1) // group_size


class CTCRecognizer(nn.Module):
    """The tiny Whisper stand-in: the DRSR continuous encoder plus a CTC head over the text vocabulary.

    The CTC head scores frames against the base LLM's own (frozen) input embeddings, so the encoder learns
    to emit vectors in the LLM's word-embedding space: the tiny world's analogue of what a large
    pre-alignment achieves (an encoder with a free CTC head left spoken QA at chance after pre-alignment:
    the frozen LLM could not read its features). Scoring is a dot product with a separate blank scorer, or,
    with `cosine_scale`, the cosine similarity times that scale (times a learnt factor) with the blank tied
    to a token's direction (`<|sil|>`, which the base LLM learns to read as a silent slot). Measured on the
    tiny world (same LLM, 800 steps): the grouped features' cosine to their nearest word embedding is
    0.4-0.6 with dot products and 0.75-0.9 with cosine scoring (scale 10), and the assembled model, before
    any speech training, answers spoken questions about facts it only read at 0.19 against 0.09; at 1,600
    steps 0.45 (scale 30: 0.13, the features drift off the embeddings again).

    With `group_size` G > 1, CTC runs on the mean of each G frames, the very vectors the DRSR adapter
    receives at the LLM's rate (25/G Hz). Measured (800 steps, SpecAugment): WER 0.14 seen / 0.19 held-out
    voices at G=5 against 0.18 / 0.21 at 25 Hz, and the grouped features of "where does brave willow
    live" then decode by nearest word embedding to "where does does does wild willow live live"; CTC at
    25 Hz leaves most 5 Hz means near the blank direction (nearest embeddings: junk tokens).
    """

    def __init__(self, audio_config: FunAudioChatAudioConfig, word_embeddings: torch.Tensor, group_size: int = 1,
                 cosine_scale: float | None = None, blank_token: int | None = None, snap_weight: float = 0.0):
        super().__init__()
        self.snap_weight = float(snap_weight)
        if self.snap_weight and cosine_scale is None:
            raise ValueError("CTCRecognizer: snap_weight pulls frames onto the word directions cosine scoring uses; "
                             "give cosine_scale")
        self.continuous_audio_tower = FunAudioChatContinuousEncoder(audio_config)
        self.group_size = group_size
        self.register_buffer("word_embeddings", word_embeddings.detach().clone(), persistent=False)  # [V, H]
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.blank = word_embeddings.shape[0]  # last id = CTC blank
        self.cosine_scale = cosine_scale
        if cosine_scale is None:
            self.blank_head = nn.Linear(audio_config.output_dim, 1)
        else:
            if blank_token is None:
                raise ValueError("CTCRecognizer: cosine scoring ties the blank to a token embedding; give blank_token")
            self.blank_token = blank_token
            self.blank_bias = nn.Parameter(torch.zeros(1))

    def grouped(self, input_features, feature_attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors the LLM will read: the encoder's frames, grouped by k [A, T, H], and their counts [A]."""
        lengths = encoder_output_lengths(feature_attention_mask.sum(-1), self.continuous_audio_tower.config.n_window)
        hidden = self.continuous_audio_tower(input_features, feature_attention_mask, int(lengths.max()))  # [A, T, H]
        return group_frames(hidden, lengths, self.group_size)

    def forward(self, input_features, feature_attention_mask):
        return self.score(*self.grouped(input_features, feature_attention_mask))

    def score(self, hidden, lengths):
        """CTC logits of grouped frames [A, T, V+1] (the blank last), and their counts."""
        if self.cosine_scale is None:
            words = self.logit_scale * hidden @ self.word_embeddings.T  # [A, T, V]
            return torch.cat([words, self.blank_head(hidden)], dim=-1), lengths  # [A, T, V+1], [A]
        # Cosine scoring: only the direction counts, so a frame scores well only by pointing along its word's
        # embedding, which is what the LLM reads (dot products let it grow long or add off-vocabulary parts).
        sims = F.normalize(hidden, dim=-1) @ F.normalize(self.word_embeddings, dim=-1).T  # [A, T, V]
        scale = self.cosine_scale * self.logit_scale
        blank = scale * sims[..., self.blank_token:self.blank_token + 1] + self.blank_bias
        return torch.cat([scale * sims, blank], dim=-1), lengths

    def greedy(self, input_features, feature_attention_mask) -> list[list[int]]:
        logits, lengths = self(input_features, feature_attention_mask)
        best = logits.argmax(-1)
        out = []
        for row, n in zip(best, lengths.tolist()):
            ids, prev = [], None
            for t in row[:n].tolist():
                if t != prev and t != self.blank:
                    ids.append(t)
                prev = t
            out.append(ids)
        return out


class TranscriptData:
    """Speech-text pairs (the asr_* manifests) for the encoder: features and word-token transcripts."""

    def __init__(self, manifest_dir, names: list[str], features: FeatureCache, tokenizer):
        self.records = [SpokenRecord(r, name) for name in names for r in load_records(manifest_dir, name)]
        self.features, self.tokenizer = features, tokenizer
        self.targets = [encode_text(tokenizer, r.meta.get("transcript", r.text)) for r in self.records]

    def batch_of(self, indices: list[int]) -> dict:
        feats = [self.features(self.records[i].user_path) for i in indices]
        n_mels, longest = feats[0].shape[0], max(f.shape[1] for f in feats)
        x = torch.zeros(len(feats), n_mels, longest)
        mask = torch.zeros(len(feats), longest, dtype=torch.long)
        for i, f in enumerate(feats):
            x[i, :, : f.shape[1]] = f
            mask[i, : f.shape[1]] = 1
        return {"input_features": x, "feature_attention_mask": mask, "targets": [self.targets[i] for i in indices]}

    def batch(self, step: int, batch_size: int, seed: int, specaugment: dict | None = None) -> dict:
        rng = step_rng(seed, step)
        batch = self.batch_of([rng.randrange(len(self.records)) for _ in range(batch_size)])
        if specaugment:
            spec_augment(batch["input_features"], batch["feature_attention_mask"].sum(-1), rng, **specaugment)
        return batch


def spec_augment(features: torch.Tensor, lengths: torch.Tensor, rng, freq_masks: int = 2, freq_width: int = 15,
                 time_masks: int = 2, time_width: int = 20) -> None:
    """SpecAugment (Park et al. 2019) in place on [A, M, T] log-mels: per clip, `freq_masks` bands of up to
    `freq_width` mel bins and `time_masks` spans of up to `time_width` frames set to the clip's mean.
    Draws come from `rng` (the step's data RNG), so a resumed run masks the same bins. Measured on the tiny
    world (800 steps): held-out-voice WER 0.21 with it, 0.28 without (the training set is 924 clips)."""
    n_mels = features.shape[1]
    for i, length in enumerate(lengths.tolist()):
        fill = features[i, :, :length].mean()
        for _ in range(freq_masks):
            width = rng.randint(0, min(freq_width, n_mels - 1))
            start = rng.randint(0, n_mels - width)
            features[i, start:start + width, :length] = fill
        for _ in range(time_masks):
            width = rng.randint(0, min(time_width, max(0, length - 1)))
            start = rng.randint(0, max(0, length - width))
            features[i, :, start:start + width] = fill


def ctc_loss(model: CTCRecognizer, batch: dict):
    """CTC over the grouped frames; with the recogniser's `snap_weight`, plus that times `snap_loss`."""
    hidden, lengths = model.grouped(batch["input_features"], batch["feature_attention_mask"])
    logits, lengths = model.score(hidden, lengths)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # [T, A, V+1]
    targets = torch.cat([torch.tensor(t, dtype=torch.long) for t in batch["targets"]]).to(log_probs.device)
    target_lengths = torch.tensor([len(t) for t in batch["targets"]])
    loss = F.ctc_loss(log_probs, targets, lengths, target_lengths, blank=model.blank, zero_infinity=True)
    if not model.snap_weight:
        return loss, {}
    snap = snap_loss(model, hidden, lengths, logits)
    return loss + model.snap_weight * snap, {"ctc_loss": loss.item(), "snap_loss": snap.item()}


def snap_loss(model: CTCRecognizer, hidden: torch.Tensor, lengths: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """1 - the cosine of each grouped frame to the direction of what CTC reads in it: its posterior's mean word
    embedding direction (the blank's: `<|sil|>`), held fixed. Cosine scoring only asks a frame to point nearer its
    word than any other, so the rest of it is free, and the frozen LLM reads that rest too (measured in the tiny
    world: each frame projected on its nearest word's direction, the assembled model answered held-out facts' spoken
    questions at 0.77 against 0.32; the rest turned at random, 0.61): this pulls it in (the same base LLM's encoder
    trained with weight 1: 0.49, with 3: 0.54; in another world 0.31 without it, 0.40 at 1, and 0.25 at 3, where CTC
    learned slower)."""
    with torch.no_grad():
        words = F.normalize(model.word_embeddings, dim=-1)  # [V, H]
        directions = torch.cat([words, words[model.blank_token:model.blank_token + 1]])  # [V+1, H]: blank = <|sil|>
        target = logits.float().softmax(-1) @ directions  # [A, T, H]
    cos = F.cosine_similarity(hidden.float(), target, dim=-1)  # [A, T]
    valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths.to(hidden.device)[:, None]
    return ((1 - cos) * valid).sum() / valid.sum().clamp(min=1)


def word_error_rate_of(model: CTCRecognizer, data: TranscriptData, tokenizer, batch_size: int = 32) -> float:
    import jiwer

    model.eval()
    refs, hyps = [], []
    with torch.no_grad():
        for start in range(0, len(data.records), batch_size):
            idx = list(range(start, min(start + batch_size, len(data.records))))
            batch = data.batch_of(idx)
            device = next(model.parameters()).device  # the GPU the torch backend trained on, or the CPU
            for i, ids in zip(idx, model.greedy(batch["input_features"].to(device),
                                                batch["feature_attention_mask"].to(device))):
                refs.append(tokenizer.decode(data.targets[i]).strip())
                hyps.append(tokenizer.decode(ids).strip())
    model.train()
    return float(jiwer.wer(refs, hyps))


def whisper_to_tower(whisper_encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers WhisperEncoder state dict onto `continuous_audio_tower` names.

    Same sub-layer names; Whisper's final `layer_norm` is the tower's `ln_post`. Whisper's position table
    is dropped (the tower computes the same sinusoids per chunk); the projection to the LLM width is new.
    """
    out = {}
    for name, tensor in whisper_encoder_state.items():
        if name.startswith("embed_positions"):
            continue
        out[name.replace("layer_norm.", "ln_post.") if name.startswith("layer_norm.") else name] = tensor
    return out


def import_whisper_encoder(source: str, model_params: dict, base_llm_dir: str | Path, out_dir: str) -> dict:
    """Encoder kind `import`: Whisper's encoder (e.g. whisper-large-v3) from a transformers Whisper folder. Its
    geometry comes from the folder's config, the adapter's output width from the base LLM's hidden size."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, WhisperModel

    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"encoder.import {folder}: no config.json (expected a transformers Whisper folder)")
    whisper = WhisperModel.from_pretrained(folder)
    wcfg = whisper.config
    hidden = AutoConfig.from_pretrained(base_llm_dir).hidden_size
    audio_config = FunAudioChatAudioConfig(
        num_mel_bins=wcfg.num_mel_bins, d_model=wcfg.d_model, encoder_layers=wcfg.encoder_layers,
        encoder_attention_heads=wcfg.encoder_attention_heads, encoder_ffn_dim=wcfg.encoder_ffn_dim,
        # The official model runs Whisper in 2 s windows (n_window 100 mel frames a side).
        n_window=model_params.get("encoder", {}).get("n_window", 100), max_source_positions=wcfg.max_source_positions,
        output_dim=hidden)
    tower = FunAudioChatContinuousEncoder(audio_config)
    missing, unexpected = tower.load_state_dict(whisper_to_tower(whisper.encoder.state_dict()), strict=False)
    if unexpected or set(missing) - {"proj.weight", "proj.bias", "audio_bos_eos_token.weight"}:
        raise ValueError(f"encoder.import {folder}: not a Whisper encoder of the expected layout (missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]})")
    with atomic_folder(out_dir) as tmp:
        save_file({f"continuous_audio_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()},
                  str(tmp / "model.safetensors"))
        audio_config.to_json_file(str(tmp / "config.json"))
        write_json({"imported": str(folder)}, tmp / "metrics.json")
    return {"imported": str(folder)}


def train_encoder(stage: dict, model_params: dict, manifest_dir: str, data_root: str, tokenizer_dir: str,
                  base_llm_dir: str, out_dir: str, state_root: str, run_info: dict) -> dict:
    model_params = resolve_geometry(model_params)
    if stage.get("import"):
        return import_whisper_encoder(stage["import"], model_params, base_llm_dir, out_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    embeddings = AutoModelForCausalLM.from_pretrained(base_llm_dir).get_input_embeddings().weight.detach()
    if embeddings.shape[0] < len(tokenizer):  # more rows than tokens is fine (Qwen3 pads its vocabulary)
        raise ValueError(f"{base_llm_dir}: the base LLM has {embeddings.shape[0]} token embeddings but the tokenizer "
                         f"{tokenizer_dir} has {len(tokenizer)} tokens; they must come from the same experiment")
    enc = model_params["encoder"]
    audio_config = FunAudioChatAudioConfig(
        num_mel_bins=enc["num_mel_bins"], d_model=enc["d_model"], encoder_layers=enc["encoder_layers"],
        encoder_attention_heads=enc["encoder_attention_heads"], encoder_ffn_dim=enc["encoder_ffn_dim"],
        n_window=enc["n_window"], max_source_positions=enc["max_source_positions"],
        output_dim=embeddings.shape[1])  # the encoder projects to the base LLM's width
    features = FeatureCache(data_root, enc["num_mel_bins"])
    train = TranscriptData(manifest_dir, list(stage.get("data", {})), features, tokenizer)
    cfg = StageConfig.from_params(resolve_steps(stage, len(train.records)))
    torch.manual_seed(cfg.seed)
    if "group_size" not in model_params.get("speech", {}):
        raise ValueError("encoder: model params need speech.group_size (CTC scores the k-frame means the LLM reads)")
    cosine = stage.get("cosine_scale")
    model = CTCRecognizer(audio_config, embeddings, int(model_params["speech"]["group_size"]),
                          float(cosine) if cosine else None, tokenizer.convert_tokens_to_ids("<|sil|>"),
                          float(stage.get("snap_weight", 0.0)))
    trainer = Trainer(model, cfg, ctc_loss,
                      lambda step: train.batch(step, cfg.batch_size, cfg.seed, stage.get("specaugment")),
                      Path(state_root) / f"encoder-{fingerprint(stage, model_params, manifests_identity(manifest_dir, cfg.data), files_identity(Path(tokenizer_dir) / 'tokenizer.json'), _identity(base_llm_dir))}",
                      "encoder", run_info)
    summary = trainer.train()
    metrics = {}
    for name, key in (("asr_test", "encoder_wer"), ("asr_test_unseen_voices", "encoder_wer_unseen_voices")):
        metrics[key] = word_error_rate_of(model, TranscriptData(manifest_dir, [name], features, tokenizer), tokenizer)
    log.info("encoder: %s", metrics)
    from safetensors.torch import save_file

    with atomic_folder(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        audio_config.to_json_file(str(tmp / "config.json"))
        write_json(metrics, tmp / "metrics.json")
        write_json(summary, tmp / "train_summary.json")
        write_history(trainer.history, tmp)
    trainer.finish()
    return {**summary, **metrics}


# --------------------------------------------------------------------------------------- DRSR model


def feature_scale(model, manifest_dir: str, data_root: str, clips: int = 64, name: str = "asr_train") -> float:
    """LLM word-embedding norm / continuous-feature norm, measured on training clips.

    The CTC-trained encoder emits vectors tens of times longer than the LLM's word embeddings (measured
    17.8 vs 0.44); fed as they are, they swamp the residual stream, and an identity adapter moves far too
    slowly under AdamW to shrink them (spoken QA stayed at chance). The adapter starts at this scale.
    """
    records = load_records(manifest_dir, name)[:clips]
    features = FeatureCache(data_root, model.config.audio_config.num_mel_bins)
    norms = []
    with torch.no_grad():
        for record in records:
            feats = features(SpokenRecord(record, name).user_path)[None]  # [1, M, T]
            mask = torch.ones(1, feats.shape[-1], dtype=torch.long)
            length = int(encoder_output_lengths(mask.sum(-1), model.config.audio_config.n_window)[0])
            hidden = model.continuous_audio_tower(feats, mask, length)[0]  # [n, H]
            norms.append(hidden.norm(dim=-1).mean())
        embedding_norm = model.get_input_embeddings().weight.norm(dim=-1).mean()
    return float(embedding_norm / torch.stack(norms).mean())


def config_special_ids(config) -> dict[str, int]:
    """The text ids a DRSR config was built with (the keys of `special_id_params`, less bos)."""
    text = config.text_config
    return {"pad": text.pad_token_id, "eos": text.eos_token_id, "audio": config.audio_token_index,
            "audio_bos": text.audio_bos_index, "audio_eos": text.audio_eos_index, "sil": text.sil_index}


def init_from_released(released_dir: str, tokenizer_dir: str, speech_tokenizer_dir: str, out_dir: str) -> dict:
    """`init.released`: the DRSR model starts from a Fun-Audio-Chat checkpoint in the official layout (config.json,
    safetensors, sharded with an index or not). Its tensors are kept as they are; the experiment's tokenizers must
    agree with it: every special id, the vocabulary within its embedding rows, and the speech codebook size."""
    from fac.model import check_checkpoint

    folder = Path(released_dir)
    config = check_checkpoint(folder)  # model_type, every tensor present with its shape (names the file)
    tokenizer = load_tokenizer(tokenizer_dir)
    ours, theirs = special_id_params(tokenizer), config_special_ids(config)
    wrong = [f"{name}: tokenizer {ours[name]}, checkpoint {theirs[name]}" for name in theirs if ours[name] != theirs[name]]
    if wrong:
        raise ValueError(f"init.released {folder}: the text tokenizer {tokenizer_dir} puts special tokens where the "
                         f"checkpoint does not ({'; '.join(wrong)}); use the tokenizer the checkpoint was trained with")
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(f"init.released {folder}: {config.text_config.vocab_size} token embeddings, but the text "
                         f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens")
    codebook = speech_codebook_size(speech_tokenizer_dir)
    if codebook != config.audio_config.codebook_size:
        raise ValueError(f"init.released {folder}: the speech tokenizer {speech_tokenizer_dir} gives a codebook of "
                         f"{codebook} ({codebook - 4} codes + 4 specials), the checkpoint's is "
                         f"{config.audio_config.codebook_size}")
    model = load_checkpoint(folder)
    _save_with_tokenizer(model, tokenizer, out_dir, {"stage": "init", "released": str(folder)})
    return {"parameters": sum(p.numel() for p in model.parameters()), "released": str(folder)}


def init_model(model_params: dict, base_llm_dir: str, encoder_dir: str, tokenizer_dir: str,
               speech_tokenizer_dir: str, manifest_dir: str, data_root: str, out_dir: str, seed: int,
               scale_manifest: str = "asr_train") -> dict:
    """Assemble the DRSR model: the base LLM and the pretrained encoder; adapter and SRH freshly initialised."""
    from safetensors.torch import load_file

    from transformers import AutoConfig

    tokenizer = load_tokenizer(tokenizer_dir)
    # The LLM's and the encoder's geometry are theirs (trained in the DAG or imported), not the params'.
    config = model_config(model_params, tokenizer, speech_codebook_size(speech_tokenizer_dir),
                          llm_config=AutoConfig.from_pretrained(base_llm_dir),
                          audio_config=FunAudioChatAudioConfig.from_json_file(str(Path(encoder_dir) / "config.json")),
                          origin=f"base LLM {base_llm_dir}")
    torch.manual_seed(seed)
    model = FunAudioChatForConditionalGeneration(config)
    llm = AutoModelForCausalLM.from_pretrained(base_llm_dir)
    model.language_model.load_state_dict(llm.state_dict(), strict=True)
    enc_state = load_file(str(Path(encoder_dir) / "model.safetensors"))
    tower = {k.removeprefix("continuous_audio_tower."): v for k, v in enc_state.items()
             if k.startswith("continuous_audio_tower.")}
    model.continuous_audio_tower.load_state_dict(tower, strict=True)
    # The encoder already points along the LLM's word embeddings: the adapter starts as a scaled identity
    # that brings its features to the embeddings' length.
    scale = feature_scale(model, manifest_dir, data_root, name=scale_manifest)
    with torch.no_grad():
        model.audio_tower.continual_output_matching.weight.copy_(scale * torch.eye(config.audio_config.output_dim))
    log.info("init: adapter = %.4f x identity (word-embedding norm / encoder feature norm)", scale)
    _save_with_tokenizer(model, tokenizer, out_dir, {"stage": "init", "base_llm": base_llm_dir, "encoder": encoder_dir,
                                                     "adapter_scale": scale})
    return {"parameters": sum(p.numel() for p in model.parameters()), "adapter_scale": scale}


def drsr_loss(model, batch):
    out = model(**batch)
    return out.loss, {"text_loss": out.text_loss.item(), "speech_loss": out.speech_loss.item()}


def train_drsr(name: str, stage: dict, model_dir: str, manifest_dir: str, data_root: str, out_dir: str,
               state_root: str, run_info: dict) -> dict:
    """Pre-alignment, stage 1 or stage 2: the same loop, different trainable parameters, data and schedule."""
    model = load_checkpoint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    special = SpecialIds.from_tokenizer(tokenizer, model.config)
    features = FeatureCache(data_root, model.config.audio_config.num_mel_bins)
    data = SpokenData(manifest_dir, stage.get("data", {}), features, tokenizer, special,
                      model.config.audio_config.group_size, stage.get("max_length"), bool(stage.get("packing")))
    if epoch_mode(stage):
        data.passes(int(stage.get("seed", 0)))
    cfg = StageConfig.from_params(resolve_steps(stage, len(data)))
    trainer = Trainer(model, cfg, drsr_loss, lambda step: data.batch(step, cfg.batch_size, cfg.seed),
                      Path(state_root) / f"{name}-{fingerprint(stage, _identity(model_dir), manifests_identity(manifest_dir, cfg.data))}",
                      name, run_info)
    summary = trainer.train()
    if data.dropped:
        summary = {**summary, "dropped_over_max_length": data.dropped}
    _save_with_tokenizer(model, tokenizer, out_dir, summary, trainer.history)
    trainer.finish()
    return summary


def text_identity(world_dir, tokenizer_dir) -> str:
    world = Path(world_dir)
    return files_identity(world / "corpus.txt", world / "text_qa.jsonl", Path(tokenizer_dir) / "tokenizer.json")


def manifests_identity(manifest_dir, names) -> str:
    return files_identity(*[Path(manifest_dir) / f"{name}.jsonl" for name in sorted(names)])


def _identity(model_dir: str) -> str:
    """Identity of an input checkpoint for the resume fingerprint: its path and size and mtime of its weights."""
    weights = Path(model_dir) / "model.safetensors"
    stat = weights.stat()
    return f"{model_dir}:{stat.st_size}:{stat.st_mtime_ns}"
