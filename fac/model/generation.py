"""Parallel text + speech generation of Fun-Audio-Chat (the official `_sample` loop, ARCH_NOTES section 11):
one text token and one group of G speech tokens per LLM step, with KV caches for the LLM and the SRH."""

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from fac.model.processing import SPEECH_DELAY

MODES = ("s2t", "s2m")


@dataclass
class FunAudioChatGenerateOutput(ModelOutput):
    """sequences [B, S + T] (prompt + generated text), text_ids [B, T] (generated text), speech_ids [B, G*steps]
    (one group per speech step, `eos` x G closes the speech). With output_logits: text_logits [B, T, V] (raw logits
    of every LLM call) and speech_logits [B, T*G, C] (raw SRH logits of every sub-step)."""

    sequences: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    speech_ids: torch.Tensor | None = None
    text_logits: torch.Tensor | None = None
    speech_logits: torch.Tensor | None = None


def logits_processors(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> LogitsProcessorList:
    """transformers' processors, in generate()'s order: repetition penalty, then temperature, top-k, top-p."""
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def pick_token(logits, history, do_sample, processors, generator) -> torch.Tensor:
    """logits [B, V], history [B, n] -> token ids [B]: argmax, or a draw after the processors."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = processors(history, logits.float())
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class _Stack:
    """A causal stack run step by step: through a KV cache, or (use_cache=False) by recomputing the whole prefix."""

    def __init__(self, use_cache: bool):
        self.use_cache = use_cache
        self.cache = DynamicCache() if use_cache else None
        self.history: list[torch.Tensor] = []

    def inputs(self, new: torch.Tensor) -> torch.Tensor:
        if self.use_cache:
            return new
        self.history.append(new)
        return torch.cat(self.history, dim=1)


class FunAudioChatGenerationMixin:
    """Adds `generate_speech_text` to FunAudioChatForConditionalGeneration."""

    @torch.no_grad()
    def generate_speech_text(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        speech_ids: torch.LongTensor | None = None,
        speech_attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        feature_exist_mask: torch.Tensor | None = None,
        *,
        mode: str = "s2m",
        max_new_tokens: int = 256,
        min_new_tokens: int = 0,
        force_text_abos: bool | None = None,
        text_do_sample: bool = False,
        speech_do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        output_logits: bool = False,
    ) -> FunAudioChatGenerateOutput:
        """Generate text ("s2t") or text and speech ("s2m") from a prompt ending with `<|im_start|>assistant\\n`.

        Inputs are those of `forward` without labels and transcripts; prompts of a batch must be left-padded
        (`fac.model.processing.collate_prompts`): the LLM and the SRH both get the attention mask and positions that
        count real tokens only, so every row generates what it would alone.
        The official inference settings are text greedy, speech sampled (`speech_do_sample=True,
        temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.2`) and `force_text_abos=True` in "s2m".
        The sampling settings apply to the SRH, and to the text only when `text_do_sample`. Each speech group is
        the G tokens drawn sub-step by sub-step (the official `only_crq_sampling`); a group containing the speech
        eos becomes eos x G and its paired text token `<|audio_eos|>`, which ends speech mode.
        `use_cache=False` recomputes both stacks over their whole prefix at every step (for checking the caches).
        `min_new_tokens` (transformers' meaning): for the first that many steps no row may end, neither its text (eos,
        `<|audio_eos|>`) nor its speech (the speech eos), and a row that speaks says codes once its delay is over
        (`SPEECH_DELAY` tokens): no speech bos, eos or pad, the fillers a reply that says nothing is made of (a
        barely trained model's greedy speech can be fillers only); 0 leaves every step as the model picks it.
        """
        if mode not in MODES:
            raise ValueError(f"generate_speech_text: mode must be one of {MODES}, got {mode!r}")
        speech_on = mode == "s2m"
        if speech_on and self.audio_invert_tower is None:
            raise ValueError("generate_speech_text: mode 's2m' needs audio_config.enable_audio_invert_tower=True")
        cfg, text_cfg, audio_cfg = self.config, self.config.text_config, self.config.audio_config
        g = audio_cfg.group_size
        force_text_abos = speech_on if force_text_abos is None else force_text_abos
        eos_token_id = text_cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = text_cfg.pad_token_id if pad_token_id is None else pad_token_id
        processors = logits_processors(temperature, top_k, top_p, repetition_penalty)
        embed_text = self.get_input_embeddings()
        embed_speech = self.audio_tower.embed_tokens
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        # Prefill input: the prompt with its audio slots (no transcripts, so no averaging with text).
        text_embeds = embed_text(input_ids)
        inputs_embeds = text_embeds
        if speech_ids is not None:
            if speech_attention_mask is None:
                speech_attention_mask = torch.ones_like(speech_ids)
            slots = self.encode_audio(
                speech_ids, speech_attention_mask, input_features, feature_attention_mask, feature_exist_mask
            )
            inputs_embeds = self._scatter_slots(text_embeds, input_ids == cfg.audio_token_index, slots, slots.features)
        srh_text = text_embeds  # the SRH sees the raw text embedding, placeholders included

        llm, srh = _Stack(use_cache), _Stack(use_cache)
        # The SRH's own mask and positions: each LLM position's G sub-frames are real where the position is (left
        # padding is masked out and positions count real entries only, as for the LLM), so that a padded row of a
        # batch computes what it computes alone.
        srh_mask = attention_mask.repeat_interleave(g, dim=1)[:, : prompt_len * g - (g - 1)] if speech_on else None
        sequences = input_ids
        speech = input_ids.new_zeros(batch, 0)
        in_speech = torch.zeros(batch, dtype=torch.bool, device=device)
        spoken = torch.zeros(batch, dtype=torch.long, device=device)  # speech tokens of each row's reply so far
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        prev_speech_embed = embed_speech.weight[audio_cfg.bos_token_id].expand(batch, 1, -1)  # [B, 1, H]
        text_logits_all, speech_logits_all = [], []

        for step in range(max_new_tokens):
            if step > 0:
                last = sequences[:, -1]
                in_speech |= last == text_cfg.audio_bos_index
                srh_text = embed_text(last)[:, None]  # [B, 1, H]
                inputs_embeds = srh_text
                if speech_on and in_speech.any() and speech.shape[1] >= g:
                    group_embeds = self.audio_tower.group(speech[:, -g:])  # [B, 1, H]
                    mixed = (srh_text + group_embeds) / 2
                    inputs_embeds = torch.where(in_speech[:, None, None], mixed, srh_text)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
            new_len = inputs_embeds.shape[1]

            # LLM step. Positions count real tokens only, as transformers' generate does for left padding.
            full_positions = (attention_mask.cumsum(dim=1) - 1).masked_fill(attention_mask == 0, 1)
            llm_inputs = llm.inputs(inputs_embeds)
            hidden, logits, _, llm.cache = self.run_language_model(
                llm_inputs,
                attention_mask,
                full_positions[:, -llm_inputs.shape[1]:],
                cache=llm.cache,
                use_cache=use_cache,
            )
            hidden = hidden[:, -new_len:]  # [B, n, H]
            step_text_logits = logits[:, -1].float()  # [B, V]

            # SRH: G sub-steps on every LLM call (in text-only steps too: their last token feeds the next call).
            group = None
            if speech_on:
                sub_frames = self.audio_invert_tower.ungroup(hidden + srh_text)  # [B, n*G, H]
                tokens = []
                for j in range(g):
                    if j == 0:
                        # sub-step 0 also carries every earlier sub-frame of this call (the whole prompt at prefill)
                        x = sub_frames[:, : new_len * g - (g - 1)] + prev_speech_embed
                    else:
                        x = sub_frames[:, new_len * g - (g - j)][:, None] + prev_speech_embed
                    if step > 0 or j > 0:  # this call's new entry (the prefill's came with the prompt's mask)
                        srh_mask = torch.cat([srh_mask, srh_mask.new_ones(batch, 1)], dim=1)
                    srh_inputs = srh.inputs(x)
                    srh_positions = (srh_mask.cumsum(dim=1) - 1).masked_fill(srh_mask == 0, 1)
                    srh_logits, srh.cache = self.audio_invert_tower(
                        srh_inputs, srh_mask, srh_positions[:, -srh_inputs.shape[1]:], cache=srh.cache,
                        use_cache=use_cache,
                    )
                    sub_logits = srh_logits[:, -1].float()  # [B, C]
                    allowed = sub_logits
                    if step < min_new_tokens:
                        allowed = sub_logits.clone()
                        allowed[:, audio_cfg.eos_token_id] = float("-inf")
                        says_codes = in_speech & (spoken + j >= SPEECH_DELAY)  # [B]
                        fillers = [audio_cfg.bos_token_id, audio_cfg.pad_token_id]
                        allowed[:, fillers] = allowed[:, fillers].masked_fill(says_codes[:, None], float("-inf"))
                    token = pick_token(
                        allowed, torch.cat([speech, *[t[:, None] for t in tokens]], dim=1),
                        speech_do_sample, processors, generator,
                    )
                    tokens.append(token)
                    prev_speech_embed = embed_speech(token)[:, None]
                    if output_logits:
                        speech_logits_all.append(sub_logits)
                group = torch.stack(tokens, dim=1)  # [B, G]

            allowed = step_text_logits
            if step < min_new_tokens:
                allowed = step_text_logits.clone()
                allowed[:, [eos_token_id, text_cfg.audio_eos_index]] = float("-inf")
            next_text = pick_token(allowed, sequences, text_do_sample, processors, generator)
            if step == 0 and force_text_abos:
                next_text = torch.full_like(next_text, text_cfg.audio_bos_index)
            next_text = torch.where(unfinished, next_text, torch.full_like(next_text, pad_token_id))
            sequences = torch.cat([sequences, next_text[:, None]], dim=1)
            unfinished &= next_text != eos_token_id
            if output_logits:
                text_logits_all.append(step_text_logits)

            if group is not None and in_speech.any():
                finish = in_speech & (group == audio_cfg.eos_token_id).any(dim=1)
                group = torch.where(finish[:, None], torch.full_like(group, audio_cfg.eos_token_id), group)
                speech = torch.cat([speech, group], dim=1)  # every row gets a group, as in the official loop
                spoken += in_speech.long() * g
                sequences[:, -1] = torch.where(finish, text_cfg.audio_eos_index, sequences[:, -1])
                in_speech &= ~finish
            if not unfinished.any():
                break

        return FunAudioChatGenerateOutput(
            sequences=sequences,
            text_ids=sequences[:, prompt_len:],
            speech_ids=speech,
            text_logits=torch.stack(text_logits_all, dim=1) if output_logits else None,
            speech_logits=torch.stack(speech_logits_all, dim=1) if output_logits else None,
        )


def _first_group_with(codes: list[int], end: int, group_size: int) -> list[int]:
    """Speech ids up to and including the first group that holds `end` (all of them without one)."""
    for start in range(0, len(codes), group_size):
        if end in codes[start:start + group_size]:
            return codes[: start + group_size]
    return codes


@torch.no_grad()
def generate_each(model, prompts: list[dict], special_ids, *, mode: str, budgets: list[int],
                  batch_size: int = 16) -> list[tuple[list[int], list[int]]]:
    """Greedy answers to many prompts (`build_prompt` / `SpokenData.prompt`, a batch of one each), `batch_size` at a
    time, left-padded (prompts of similar length batched together). Per prompt, in the given order, its text ids
    and speech ids, equal to `generate_speech_text(**prompt, mode=mode, max_new_tokens=budget)` on it alone: the text
    of the steps that run would run alone (its budget, or up to its text eos), and the speech of those steps up to
    and including the first group that holds the speech eos (what a spoken answer is; s2m starts speaking at the
    first step, `force_text_abos`)."""
    if mode not in MODES:
        raise ValueError(f"generate_each: mode must be one of {MODES}, got {mode!r}")
    if len(budgets) != len(prompts):
        raise ValueError(f"generate_each: {len(budgets)} budgets for {len(prompts)} prompts")
    from .processing import collate_prompts

    text_eos = model.config.text_config.eos_token_id
    speech_eos, g = model.config.audio_config.eos_token_id, model.config.audio_config.group_size
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: prompts[i]["input_ids"].shape[1])
    answers: list[tuple[list[int], list[int]] | None] = [None] * len(prompts)
    for start in range(0, len(order), max(1, batch_size)):
        chosen = order[start:start + max(1, batch_size)]
        batch = collate_prompts([prompts[i] for i in chosen], special_ids)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model.generate_speech_text(**batch, mode=mode, max_new_tokens=max(budgets[i] for i in chosen))
        for row, i in enumerate(chosen):
            text = out.text_ids[row].tolist()[: budgets[i]]
            if text_eos in text:
                text = text[: text.index(text_eos) + 1]
            speech = []
            if mode == "s2m":  # one group per step after the first, up to the first eos group
                speech = _first_group_with(out.speech_ids[row].tolist()[: (len(text) - 1) * g], speech_eos, g)
            answers[i] = (text, speech)
    return answers
