"""Generation: the KV-cached loop equals a full recomputation, seeded sampling is reproducible,
speech-to-text mode decodes greedily like the training forward and emits no speech, and every row of a left-padded
batch generates what it generates alone."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fac.model import FunAudioChatForConditionalGeneration
from fac.model.generation import _first_group_with, generate_each
from fac.model.processing import SPEECH_DELAY, SpecialIds, collate_prompts

from conftest import CONFORMANCE_DIR  # noqa: E402

FIXTURE = CONFORMANCE_DIR
OFFICIAL_SAMPLING = dict(speech_do_sample=True, temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return FunAudioChatForConditionalGeneration.from_pretrained(FIXTURE).eval()


@pytest.fixture(scope="module")
def prompt():
    inputs = load_file(FIXTURE / "inputs.safetensors")
    return {k[len("gen."):]: v for k, v in inputs.items() if k.startswith("gen.")}


def test_cached_generation_equals_full_recomputation(model, prompt):
    cached = model.generate_speech_text(**prompt, max_new_tokens=8, output_logits=True, use_cache=True)
    recomputed = model.generate_speech_text(**prompt, max_new_tokens=8, output_logits=True, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.speech_ids, recomputed.speech_ids)
    assert cached.speech_ids.shape[1] > 0  # the comparison covers speech steps, not only text
    torch.testing.assert_close(cached.text_logits, recomputed.text_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.speech_logits, recomputed.speech_logits, atol=1e-5, rtol=1e-5)


def test_sampling_with_the_same_seed_is_reproducible(model, prompt):
    runs = [
        model.generate_speech_text(
            **prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(seed), **OFFICIAL_SAMPLING
        )
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].speech_ids, runs[1].speech_ids)
    assert not torch.equal(runs[0].speech_ids, runs[2].speech_ids)


def test_text_sampling_draws_from_the_text_distribution_when_asked(model, prompt):
    greedy = model.generate_speech_text(**prompt, mode="s2t", max_new_tokens=8)
    sampled = [
        model.generate_speech_text(
            **prompt, mode="s2t", max_new_tokens=8, text_do_sample=True, temperature=5.0,
            generator=torch.Generator().manual_seed(seed),
        ).text_ids
        for seed in range(3)
    ]
    assert any(not torch.equal(s, greedy.text_ids) for s in sampled)


def test_speech_to_text_mode_emits_no_speech_and_decodes_like_the_forward(model, prompt):
    out = model.generate_speech_text(**prompt, mode="s2t", max_new_tokens=5)
    assert out.speech_ids.shape == (1, 0)
    assert out.text_ids[0, 0].item() == 25  # the raw argmax that s2m's force_text_abos replaces with <|audio_bos|>
    # Each token is the argmax of the training forward (no transcripts) over the prefix before it.
    forward_inputs = {k: v for k, v in prompt.items() if k != "attention_mask"}
    prompt_len = prompt["input_ids"].shape[1]
    for step in range(out.text_ids.shape[1]):
        prefix = out.sequences[:, : prompt_len + step]
        with torch.no_grad():
            logits = model(**{**forward_inputs, "input_ids": prefix}).text_logits
        assert logits[0, -1].argmax().item() == out.text_ids[0, step].item()


def test_generation_stops_at_the_text_eos(model, prompt):
    first = model.generate_speech_text(**prompt, mode="s2t", max_new_tokens=3)
    eos = first.text_ids[0, 1].item()  # pretend the second generated token is the end of the turn
    out = model.generate_speech_text(**prompt, mode="s2t", max_new_tokens=8, eos_token_id=eos)
    assert out.text_ids.shape[1] == 2 and out.text_ids[0, -1].item() == eos


def test_min_new_tokens_holds_off_every_end_then_leaves_the_model_its_picks(model, prompt):
    """min_new_tokens=4 with the fixture's second text token and its first speech code taken for the ends: the text
    steps before 4 avoid them (eos and <|audio_eos|>), as the SRH avoids its eos; where nothing would end, the answer
    is the plain one, and min_new_tokens=0 is the plain generation itself."""
    plain = model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=6)
    assert torch.equal(model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=6, min_new_tokens=0).speech_ids,
                       plain.speech_ids)
    text_cfg, audio_cfg = model.config.text_config, model.config.audio_config
    eos = plain.text_ids[0, 1].item()  # ends the plain answer at its second token
    ended = model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=6, eos_token_id=eos)
    assert ended.text_ids.shape[1] == 2
    held = model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=6, eos_token_id=eos, min_new_tokens=4)
    first = held.text_ids[0, :4].tolist()
    assert held.text_ids.shape[1] > 2 and eos not in first and text_cfg.audio_eos_index not in first
    assert held.text_ids[0, 0].item() == plain.text_ids[0, 0].item()  # before the end, the same pick
    # The speech eos: the plain answer's first speech token taken for it ends its speech in the first group; held
    # off, the groups of the first 4 steps never hold it.
    g, speech_eos = audio_cfg.group_size, audio_cfg.eos_token_id
    audio_cfg.eos_token_id = plain.speech_ids[0, 0].item()
    try:
        assert model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=6).speech_ids[0, :g].tolist() == [
            audio_cfg.eos_token_id] * g
        groups = model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=6, min_new_tokens=4).speech_ids
        assert audio_cfg.eos_token_id not in groups[0, : 4 * g].tolist()
    finally:
        audio_cfg.eos_token_id = speech_eos


def test_min_new_tokens_makes_a_reply_say_codes_once_its_delay_is_over(model, prompt):
    """Under min_new_tokens the speech tokens after the delay are codes: the fixture's plain speech with its first
    code after the delay taken for the speech pad says neither pad nor bos nor eos there, while its delay (which
    holds a bos and that same code) is the model's own pick."""
    audio_cfg = model.config.audio_config
    g, fillers = audio_cfg.group_size, {audio_cfg.bos_token_id, audio_cfg.eos_token_id}
    plain = model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=8).speech_ids[0].tolist()
    speech_pad = audio_cfg.pad_token_id
    audio_cfg.pad_token_id = plain[SPEECH_DELAY]
    try:
        held = model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=8, min_new_tokens=5).speech_ids[0]
    finally:
        audio_cfg.pad_token_id = speech_pad
    held = held.tolist()
    assert held[:SPEECH_DELAY] == plain[:SPEECH_DELAY]
    assert audio_cfg.bos_token_id in plain[:SPEECH_DELAY] and plain[SPEECH_DELAY] in plain[:SPEECH_DELAY]
    said = held[SPEECH_DELAY:4 * g]  # the speech of steps 1..4 (step 0's group precedes the reply)
    assert len(said) == 4 * g - SPEECH_DELAY and not (fillers | {plain[SPEECH_DELAY]}) & set(said)


def with_longer_system_prompt(prompt: dict, extra: int) -> dict:
    """The fixture's prompt with `extra` more text tokens in its system turn (after `<|im_start|>system\\n`)."""
    ids = prompt["input_ids"]
    words = ids[:, 3:3 + extra]  # text of the system prompt ("Hello!")
    longer = torch.cat([ids[:, :3], words, ids[:, 3:]], dim=1)
    return {**prompt, "input_ids": longer, "attention_mask": torch.ones_like(longer)}


@pytest.mark.parametrize("mode", ["s2t", "s2m"])
def test_every_row_of_a_left_padded_batch_generates_what_it_generates_alone(model, prompt, mode):
    """Greedy, both modes: three prompts of different lengths (and budgets) in one left-padded batch (the LLM and
    the SRH get the attention mask and the positions padding requires), each answer token for token equal to its
    batch of one: the text of the steps it runs alone, the speech up to its first eos group."""
    prompts = [prompt, with_longer_system_prompt(prompt, 3), with_longer_system_prompt(prompt, 6)]
    special = SpecialIds.from_config(model.config, system_prefix=(), user_prefix=(), assistant_prefix=(),
                                     turn_suffix=())
    batch = collate_prompts(prompts, special)
    assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"] == 0).sum() == 6 + 3
    budgets = [16, 9, 12]
    together = generate_each(model, prompts, special, mode=mode, budgets=budgets, batch_size=3)
    g, speech_eos = model.config.audio_config.group_size, model.config.audio_config.eos_token_id
    spoken = 0
    for (text, speech), one, budget in zip(together, prompts, budgets):
        alone = model.generate_speech_text(**one, mode=mode, max_new_tokens=budget)
        assert text == alone.text_ids[0].tolist()
        assert speech == _first_group_with(alone.speech_ids[0].tolist(), speech_eos, g)
        spoken += len(speech)
    assert (spoken > 0) == (mode == "s2m")
