"""Sequence packing (fac.train.packing): rows respect max_length, and a packed batch trains exactly as the same
conversations collated one per row: same loss, same gradient of every parameter, in the LLM and in the SRH."""

import pytest
import torch

from fac.model import FunAudioChatForConditionalGeneration, build_config
from fac.model.processing import SpecialIds, build_example, collate
from fac.train.packing import collate_packed, pack_groups

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = {
    "llm": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "intermediate_size": 64, "vocab_size": 300, "rope_theta": 10000.0},
    "encoder": {"num_mel_bins": 16, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                "encoder_ffn_dim": 64, "n_window": 10, "max_source_positions": 100},
    "speech": {"codebook_size": 68, "group_size": 5},
    "srh": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "intermediate_size": 64},
    "special_ids": {"pad": 256, "eos": 258, "audio": 259, "audio_bos": 260, "audio_eos": 261, "sil": 263},
}


def tiny_model(attn: str) -> FunAudioChatForConditionalGeneration:
    torch.manual_seed(0)
    model = FunAudioChatForConditionalGeneration(build_config(PARAMS))
    for stack in (model.language_model, model.audio_invert_tower.crq_transformer):  # the LLM and the SRH
        stack.set_attn_implementation(attn)
    return model.eval()  # no dropout; gradients still flow


def conversations(config) -> tuple[SpecialIds, list]:
    """Four conversations of different lengths: speech replies (with transcripts) and text-only replies, user
    audio with log-mel features or as a bare placeholder length."""
    gen = torch.Generator().manual_seed(0)
    ids = SpecialIds.from_config(
        config, system_prefix=[257, 200, 10], user_prefix=[257, 201, 10], assistant_prefix=[257, 202, 10],
        turn_suffix=[258, 10],
    )
    n_mels, g = config.audio_config.num_mel_bins, config.audio_config.group_size

    def codes(n):
        return torch.randint(0, 64, (n,), generator=gen).tolist()

    examples = [
        build_example([72, 101, 108], torch.randn(n_mels, 90, generator=gen), [30, 31, 32, 33, 34], codes(27), ids, g),
        build_example([72, 101], torch.randn(n_mels, 50, generator=gen), [40, 41, 42, 43, 44, 45, 46], None, ids, g),
        build_example([72], 13, [50, 51, 52], codes(9), ids, g),
        build_example([72, 101, 108, 109], torch.randn(n_mels, 30, generator=gen), [60, 61], None, ids, g),
    ]
    return ids, examples


def losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_pack_groups_respects_max_length_and_keeps_every_index_once():
    lengths = [70, 20, 55, 10, 45, 30, 5]
    rows = pack_groups(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == 3  # 235 positions need at least 3 rows of 100
    assert rows == [[0, 5], [2, 4], [1, 3, 6]]  # longest first into the first row with room: deterministic
    assert pack_groups([100, 1], 100) == [[0], [1]]
    with pytest.raises(ValueError, match="length 101, longer than max_length 100"):
        pack_groups([10, 101], 100)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_the_unpacked_loss_and_gradients(attn):
    model = tiny_model(attn)
    ids, examples = conversations(model.config)
    lengths = [len(e.input_ids) for e in examples]
    assert len(set(lengths)) == len(lengths)
    # Row 0: text, speech, text (speech targets after another conversation); row 1: speech alone, padded.
    groups = [[1, 0, 3], [2]]
    assert sum(lengths[i] for i in groups[1]) < sum(lengths[i] for i in groups[0])
    packed = collate_packed([[examples[i] for i in group] for group in groups], ids)
    unpacked = collate([examples[i] for group in groups for i in group], ids)  # same audio order
    assert set(packed) == set(unpacked) | {"position_ids"}
    assert packed["input_ids"].shape == (2, sum(lengths[i] for i in groups[0]))
    starts = [0, lengths[1], lengths[1] + lengths[0]]
    assert packed["position_ids"][0, starts].tolist() == [0, 0, 0]
    assert packed["position_ids"][0, starts[1] - 1] == lengths[1] - 1

    out_u, grads_u = losses_and_grads(model, unpacked)
    out_p, grads_p = losses_and_grads(model, packed)
    # float32 sums in another order: measured differences <= 5e-7 in the losses and 3e-8 in the gradients
    for key in ("loss", "text_loss", "speech_loss"):
        torch.testing.assert_close(out_p[key], out_u[key], atol=1e-5, rtol=1e-5)
    assert out_u.speech_loss > 0 and grads_u.keys() == grads_p.keys()
    assert any(n.startswith("audio_invert_tower.crq_transformer") for n in grads_u)
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")

    # Without the separation (a 2-D mask switches off the packed-positions detection: plain causal attention
    # over the whole row, positions still restarting) later conversations of a row see the earlier ones: the
    # losses move by 10x the tolerance above (measured 4e-4 text, 2e-4 speech) and gradients by 5e-2.
    causal = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
    out_c, grads_c = losses_and_grads(model, causal)
    assert (out_c.text_loss - out_u.text_loss).abs() > 1e-4
    assert (out_c.speech_loss - out_u.speech_loss).abs() > 1e-4
    assert max(float((grads_c[n] - g).abs().max()) for n, g in grads_u.items()) > 1e-2


def test_packed_dpo_sides_give_each_conversations_own_sequence_logprob():
    """DPO with packing: every side's summed (and mean) log-prob (text and speech targets) from a packed batch equals
    the one from its own row, so the DPO loss and its gradients are those of the unpacked batch."""
    from fac.train.dpo import sequence_logps
    from fac.train.packing import pack

    model = tiny_model("sdpa")
    ids, examples = conversations(model.config)
    unpacked = sequence_logps(model, collate(examples, ids))
    batch, segments = pack(examples, ids, max_length=64)
    assert segments.shape == (len(examples), 3) and len(set(segments[:, 0].tolist())) < len(examples)  # rows shared
    batch["segments"] = segments
    packed = sequence_logps(model, batch)
    assert torch.allclose(packed, unpacked, atol=1e-4), (packed, unpacked)
    assert (unpacked < 0).all()
    batch, batch["segments"] = pack(examples, ids, max_length=64)  # per target (logps: mean), the same
    assert torch.allclose(sequence_logps(model, batch, "mean"), sequence_logps(model, collate(examples, ids), "mean"),
                          atol=1e-5)
    unpacked.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    batch, batch["segments"] = pack(examples, ids, max_length=64)
    sequence_logps(model, batch).sum().backward()
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], atol=1e-4), name
