"""Generation: the KV-cached loop equals a full recomputation, seeded sampling is reproducible, and
speech-to-text mode decodes greedily like the training forward and emits no speech."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fac.model import FunAudioChatForConditionalGeneration

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
