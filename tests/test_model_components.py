"""Behaviour of the model's parts: windowed continuous encoder, token grouping for k in {1, 4, 5, 6},
label/target counts, the tied SRH head, and a Qwen3-MoE LLM trained through forward and backward."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from pathlib import Path

import pytest
import torch

from fac.model import FunAudioChatForConditionalGeneration, build_config
from fac.model.processing import SpecialIds, build_example, collate

from conftest import CONFORMANCE_DIR  # noqa: E402

FIXTURE = CONFORMANCE_DIR
USER_FRAMES, ASSISTANT_CODES, DELAY = 90, 27, 10  # 0.9 s of user audio -> 22 placeholder tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_params(group_size: int = 5, moe: bool = False) -> dict:
    llm = {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 128, "vocab_size": 300, "rope_theta": 10000.0,
    }
    if moe:
        llm.update(moe=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True)
    return {
        "llm": llm,
        "encoder": {
            "num_mel_bins": 16, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 4,
            "encoder_ffn_dim": 64, "n_window": 10, "max_source_positions": 100,
        },
        "speech": {"codebook_size": 68, "group_size": group_size},
        "srh": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 8, "intermediate_size": 64},
        "special_ids": {"pad": 256, "eos": 258, "audio": 259, "audio_bos": 260, "audio_eos": 261, "sil": 263},
    }


def tiny_model(group_size: int = 5, moe: bool = False, seed: int = 0) -> FunAudioChatForConditionalGeneration:
    torch.manual_seed(seed)
    return FunAudioChatForConditionalGeneration(build_config(tiny_params(group_size, moe)))


def tiny_batch(config, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = SpecialIds.from_config(
        config, system_prefix=[257, 200, 10], user_prefix=[257, 201, 10], assistant_prefix=[257, 202, 10],
        turn_suffix=[258, 10],
    )
    n_mels = config.audio_config.num_mel_bins
    examples = [
        build_example(
            [72, 101, 108], torch.randn(n_mels, USER_FRAMES - 40 * i, generator=gen), [30 + i, 31, 32, 33, 34],
            torch.randint(0, 64, (ASSISTANT_CODES - 10 * i,), generator=gen).tolist(),
            ids, config.audio_config.group_size, delay=DELAY,
        )
        for i in range(2)
    ]
    return collate(examples, ids)


@pytest.fixture(scope="module")
def fixture_model():
    return FunAudioChatForConditionalGeneration.from_pretrained(FIXTURE).eval()


def test_continuous_encoder_attends_only_within_its_window(fixture_model):
    """A 40-frame audio (two chunks of 2*n_window=20) encodes as its two halves encoded separately."""
    tower = fixture_model.continuous_audio_tower
    feats = torch.randn(1, 128, 40, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 40, dtype=torch.long)
    with torch.no_grad():
        whole = tower(feats, mask, output_length=10)  # 40 frames -> 20 after conv2 -> 10 after pooling
        first = tower(feats[..., :20], mask[:, :20], output_length=5)
        second = tower(feats[..., 20:], mask[:, 20:], output_length=5)
    # float32 sums in another order differ by ~1e-6 (measured 1.1e-6 on values ~0.07); attention across the
    # window boundary would change the outputs by their own size
    torch.testing.assert_close(whole, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-5)


def test_continuous_encoder_ignores_masked_frames_and_zero_fills_the_tail(fixture_model):
    tower = fixture_model.continuous_audio_tower
    feats = torch.randn(1, 128, 30, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([feats, torch.full((1, 128, 16), 7.0)], dim=2)
    mask = torch.cat([torch.ones(1, 30), torch.zeros(1, 16)], dim=1).long()
    with torch.no_grad():
        plain = tower(feats, torch.ones(1, 30, dtype=torch.long), output_length=12)
        masked = tower(padded, mask, output_length=12)
    torch.testing.assert_close(masked, plain, atol=1e-6, rtol=1e-6)
    # 30 frames -> 15 conv frames (chunks of 20 + 10 -> 10 + 5) -> 7 pooled frames; the rest stays zero
    assert masked[0, :7].abs().sum() > 0 and masked[0, 7:].abs().sum() == 0


@pytest.mark.parametrize("lengths", [[200, 200], [5, 3, 200, 200, 7, 200, 9, 1], [1], list(range(1, 40)) * 2,
                                     [200] * 30 + [17, 60, 3]])
def test_length_buckets_partition_by_length_and_never_split_equal_lengths(lengths):
    from fac.model.encoder import length_buckets

    groups = length_buckets(lengths, 4)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and 1 <= len(groups) <= 4
    spans = [(min(lengths[i] for i in g), max(lengths[i] for i in g)) for g in groups]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # ordered, and no length in two groups
    if len(set(lengths)) >= 4:
        assert len(groups) >= 2


def test_length_buckets_encode_as_one_padded_batch_forward_and_backward(fixture_model, monkeypatch):
    """The chunks of a batch run in length buckets (each padded to its own longest chunk): outputs and gradients are
    those of one batch padded to the longest chunk of all, for audios of many lengths (chunks of 1 to 20 frames)."""
    tower = fixture_model.continuous_audio_tower
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 20, 21, 33, 40, 45, 58, 1 + 20, 13]
    feats = torch.randn(len(lengths), 128, max(lengths), generator=gen)
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()

    def run(buckets):
        monkeypatch.setattr(type(tower), "chunk_buckets", buckets)
        tower.zero_grad(set_to_none=True)
        out = tower(feats, mask, output_length=15)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}

    one, one_grads = run(1)
    bucketed, bucketed_grads = run(4)
    torch.testing.assert_close(bucketed, one, atol=1e-5, rtol=1e-5)
    assert one_grads.keys() == bucketed_grads.keys() and one_grads
    for name in one_grads:
        torch.testing.assert_close(bucketed_grads[name], one_grads[name], atol=1e-4, rtol=1e-4)
    tower.zero_grad(set_to_none=True)


def test_grouping_averages_the_g_token_embeddings_then_projects(fixture_model):
    tower = fixture_model.audio_tower
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        grouped = tower.group(ids)  # [1, 2, H]
        manual = tower.output_matching(tower.embed_tokens(ids).view(1, 2, 5, -1).mean(dim=2))
    assert grouped.shape == (1, 2, 64)
    torch.testing.assert_close(grouped, manual)


@pytest.mark.parametrize("group_size", [1, 4, 5, 6])
def test_group_size_sets_llm_positions_srh_subframes_and_targets(group_size):
    model = tiny_model(group_size)
    batch = tiny_batch(model.config)
    user_len, assistant_len = USER_FRAMES // 4, DELAY + ASSISTANT_CODES  # sample 0: 22 and 37 tokens at 25 Hz
    audio_slots = math.ceil(user_len / group_size) + math.ceil(assistant_len / group_size)
    assert int((batch["input_ids"][0] == 259).sum()) == audio_slots

    out = model(**batch)
    b, s = batch["input_ids"].shape
    assert out.text_logits.shape == (b, s, 300)
    assert out.speech_logits.shape == (b, s * group_size, 68)
    # sample 0 learns its 37 speech tokens plus one eos group, and one text token per assistant slot + 4 frame tokens
    assert int((out.speech_labels[0] != -100).sum()) == assistant_len + group_size
    assert int((out.text_labels[0] != -100).sum()) == math.ceil(assistant_len / group_size) + 4
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.audio_invert_tower.pre_matching.weight.shape == (group_size * 64, 64)
    assert model.continuous_audio_tower.conv1.weight.grad.abs().sum() > 0


def test_text_loss_and_speech_loss_add_up_to_the_loss():
    model = tiny_model()
    out = model(**tiny_batch(model.config))
    torch.testing.assert_close(out.loss, out.text_loss + out.speech_loss)


def test_srh_output_head_is_the_speech_token_embedding():
    model = tiny_model()
    assert model.audio_invert_tower.lm_head.weight is model.audio_tower.embed_tokens.weight
    assert not hasattr(model.audio_invert_tower.crq_transformer, "embed_tokens")


def test_speech_loss_trains_the_llm_backbone_but_not_the_text_head():
    model = tiny_model()
    out = model(**tiny_batch(model.config))
    out.speech_loss.backward()
    assert model.language_model.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert model.language_model.lm_head.weight.grad is None


def test_qwen3_moe_llm_trains_with_forward_and_backward():
    model = tiny_model(moe=True)
    assert type(model.language_model).__name__ == "Qwen3MoeForCausalLM"
    out = model(**tiny_batch(model.config))
    assert out.aux_loss is not None
    coef = model.config.text_config.router_aux_loss_coef
    torch.testing.assert_close(out.loss, out.text_loss + out.speech_loss + coef * out.aux_loss)
    out.loss.backward()
    expert_grads = [p.grad for n, p in model.language_model.named_parameters() if "experts" in n]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)


def test_model_without_srh_learns_text_only_and_refuses_speech_generation():
    config = build_config(tiny_params())
    config.audio_config.enable_audio_invert_tower = False
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(config)
    assert model.audio_invert_tower is None
    batch = tiny_batch(config)
    out = model(**batch)
    assert out.speech_logits is None and out.speech_loss is None
    torch.testing.assert_close(out.loss, out.text_loss)
    prompt = {k: batch[k][:1] for k in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match="mode 's2m' needs audio_config.enable_audio_invert_tower=True"):
        model.generate_speech_text(**prompt, mode="s2m", max_new_tokens=2)
    assert model.generate_speech_text(**prompt, mode="s2t", max_new_tokens=2).text_ids.shape == (1, 2)


def test_srh_positions_follow_packed_llm_positions_and_reset_on_padding():
    model = tiny_model()
    llm_positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])  # two packed conversations, then two pad positions
    srh = model._srh_position_ids(llm_positions).view(7, 5)
    assert srh[1].tolist() == [5, 6, 7, 8, 9]  # G * p + j
    assert srh[3].tolist() == [0, 1, 2, 3, 4]  # the second conversation restarts
    assert srh[4].tolist() == [5, 6, 7, 8, 9]
    assert srh[5:].eq(0).all()  # after the last non-zero LLM position
