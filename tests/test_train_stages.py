"""Training stages: the encoder's output length in closed form, CTC greedy decoding, the DRSR model assembled
from the base LLM and the encoder, pre-alignment that leaves the LLM untouched and stage 1 that trains it."""

import json

import random

import pytest
import torch
from safetensors.torch import load_file

from fac.model.configuration import FunAudioChatAudioConfig
from fac.model.encoder import FunAudioChatContinuousEncoder
from fac.train import stages
from fac.train.stages import CTCRecognizer, encoder_output_lengths
from train_fixtures import one_thread, tiny_world  # noqa: F401 (fixtures)

PREALIGN = ["continuous_audio_tower", "audio_tower", "audio_invert_tower"]
N_WINDOW = 50  # chunks of 100 mel frames


def audio_config(**overrides) -> FunAudioChatAudioConfig:
    kwargs = dict(num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                  n_window=N_WINDOW, max_source_positions=1500, output_dim=32, codebook_size=20,
                  bos_token_id=16, eos_token_id=17, pad_token_id=18)
    return FunAudioChatAudioConfig(**{**kwargs, **overrides})


# ------------------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("frames", [[1, 2, 3, 4], [37, 60, 99, 100], [101, 150, 199, 200], [201, 257, 300, 333]])
def test_encoder_output_lengths_equal_the_rows_the_encoder_fills(frames):
    # Shorter than, equal to and longer than one chunk of 2 * n_window frames; odd and even lengths.
    torch.manual_seed(0)
    encoder = FunAudioChatContinuousEncoder(audio_config()).eval()
    longest = max(frames)
    features = torch.randn(len(frames), 80, longest)
    mask = (torch.arange(longest)[None, :] < torch.tensor(frames)[:, None]).long()
    with torch.no_grad():
        out = encoder(features, mask, output_length=longest)  # room for every row the encoder could fill
    filled = (out.abs().sum(-1) != 0).sum(-1)
    assert encoder_output_lengths(torch.tensor(frames), N_WINDOW).tolist() == filled.tolist()


def test_encoder_output_lengths_in_closed_form():
    # chunk of c frames -> (c - 1) // 2 + 1 frames at 50 Hz; the audio's frames pooled in pairs to 25 Hz.
    lengths = encoder_output_lengths(torch.tensor([1, 2, 3, 100, 101, 103, 200, 250]), N_WINDOW)
    assert lengths.tolist() == [1, 1, 1, 25, 25, 26, 50, 62]


def test_ctc_greedy_collapses_repeats_and_drops_blanks_within_each_clip_length():
    model = CTCRecognizer(audio_config(), torch.randn(5, audio_config().output_dim))  # blank id 5
    paths = torch.tensor([[1, 1, 5, 1, 2, 2, 5, 5, 3],
                          [4, 4, 4, 5, 0, 2, 2, 2, 2]])
    lengths = torch.tensor([9, 5])  # the second clip's frames past 5 are padding
    model.forward = lambda features, mask: (torch.nn.functional.one_hot(paths, 6).float(), lengths)
    assert model.greedy(None, None) == [[1, 1, 2, 3], [4, 0]]


def test_group_frames_is_the_mean_the_drsr_adapter_receives():
    # The DRSR model averages G continuous frames per slot, zero padding counted (conformance quirk 4).
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 3)
    grouped, lengths = stages.group_frames(hidden, torch.tensor([7, 4]), 5)
    assert grouped.shape == (2, 2, 3) and lengths.tolist() == [2, 1]
    assert torch.allclose(grouped[:, 0], hidden[:, :5].mean(1))
    assert torch.allclose(grouped[:, 1], hidden[:, 5:].sum(1) / 5)  # two real frames over a divisor of 5
    same, same_lengths = stages.group_frames(hidden, torch.tensor([7, 4]), 1)
    assert same is hidden and same_lengths.tolist() == [7, 4]


def test_ctc_recognizer_with_groups_scores_one_logit_row_per_slot():
    model = CTCRecognizer(audio_config(), torch.randn(5, audio_config().output_dim), group_size=5)
    frames = torch.tensor([100, 60])
    features = torch.randn(2, 80, 100)
    mask = (torch.arange(100)[None, :] < frames[:, None]).long()
    logits, lengths = model(features, mask)
    per_frame = encoder_output_lengths(frames, N_WINDOW)  # 25 Hz frames: [25, 15]
    assert lengths.tolist() == [(n + 4) // 5 for n in per_frame.tolist()] == [5, 3]
    assert logits.shape == (2, 5, 6)


def test_cosine_ctc_scores_directions_and_ties_the_blank_to_a_token():
    torch.manual_seed(0)
    embeddings = torch.randn(5, audio_config().output_dim)
    model = CTCRecognizer(audio_config(), embeddings, group_size=5, cosine_scale=10.0, blank_token=3)
    with torch.no_grad():
        model.blank_bias.fill_(0.5)
    features = torch.randn(1, 80, 100)
    mask = torch.ones(1, 100, dtype=torch.long)
    logits, lengths = model(features, mask)
    hidden = model.continuous_audio_tower(features, mask, int(encoder_output_lengths(mask.sum(-1), N_WINDOW)[0]))
    grouped, _ = stages.group_frames(hidden, lengths * 5, 5)
    cos = torch.nn.functional.cosine_similarity(grouped[0, :, None], embeddings[None], dim=-1)  # [slots, 5]
    assert torch.allclose(logits[0, :, :5], 10.0 * cos, atol=1e-5)
    assert torch.allclose(logits[0, :, 5], 10.0 * cos[:, 3] + 0.5, atol=1e-5)  # blank = token 3's direction
    # only directions count: the same frames twice as long score the same
    assert logits.abs().max() <= 10.0 + 0.5 + 1e-5
    with pytest.raises(ValueError, match="blank_token"):
        CTCRecognizer(audio_config(), embeddings, cosine_scale=10.0)


def test_snap_loss_is_one_minus_each_frames_cosine_to_what_ctc_reads_in_it():
    """A frame that points along its one-hot posterior's word costs 0, one orthogonal to it 1; the blank reads as
    the tied token's direction; frames past a clip's length do not count."""
    embeddings = torch.eye(4, 8)  # 4 orthogonal words in 8 dimensions
    model = CTCRecognizer(audio_config(output_dim=8), embeddings, cosine_scale=10.0, blank_token=3, snap_weight=1.0)
    hidden = torch.zeros(1, 3, 8)
    hidden[0, 0, 1] = 2.0  # along word 1
    hidden[0, 1, 2] = 1.0  # along word 2...
    hidden[0, 2, 5] = 1.0  # (past the clip's length)
    logits = torch.full((1, 3, 5), -1e4)
    logits[0, 0, 1] = 0.0  # read as word 1
    logits[0, 1, 4] = 0.0  # ...but read as the blank (= word 3): orthogonal
    assert stages.snap_loss(model, hidden, torch.tensor([2]), logits).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="give cosine_scale"):
        CTCRecognizer(audio_config(output_dim=8), embeddings, snap_weight=1.0)


def test_snap_weight_pulls_the_encoders_frames_onto_their_words_directions(recipe, tiny_world):
    """Trained a few steps on the tiny world's speech, the encoder with `snap_weight` leaves its grouped frames
    nearer (in cosine) to the direction CTC reads in them than the same encoder without it (same seed, data, steps)."""
    from transformers import AutoModelForCausalLM

    from fac.train.data import FeatureCache
    from fac.train.stages import TranscriptData
    from fac.train.trainer import StageConfig, Trainer

    tokenizer = stages.load_tokenizer(tiny_world.tokenizer_dir)
    embeddings = AutoModelForCausalLM.from_pretrained(recipe / "base_llm").get_input_embeddings().weight.detach()
    data = TranscriptData(tiny_world.manifest_dir, ["asr_train"], FeatureCache(tiny_world.data_root, 80), tokenizer)
    cosines = {}
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        model = CTCRecognizer(audio_config(output_dim=embeddings.shape[1]), embeddings, 5, 10.0,
                              tokenizer.convert_tokens_to_ids("<|sil|>"), weight)
        cfg = StageConfig.from_params({"steps": 30, "lr": 3e-3, "batch_size": 4, "seed": 1, "save_every": 1000})
        Trainer(model, cfg, stages.ctc_loss, lambda step: data.batch(step, 4, 1), recipe / f"snap{weight}",
                "encoder").train()
        batch = data.batch_of(list(range(len(data.records))))
        with torch.no_grad():
            hidden, lengths = model.grouped(batch["input_features"], batch["feature_attention_mask"])
            cosines[weight] = 1 - stages.snap_loss(model, hidden, lengths, model.score(hidden, lengths)[0]).item()
    assert 1 - cosines[3.0] < 0.9 * (1 - cosines[0.0]), cosines  # what CTC leaves free shrinks (here 0.13 -> 0.10)


def test_slot_questions_lay_a_question_out_as_audio_slots(tiny_world):
    from fac.train.data import TextData
    from fac.train.stages import load_tokenizer, slot_noise

    tok = load_tokenizer(tiny_world.tokenizer_dir)
    plain = TextData(tiny_world.world_dir, tok)
    slots = TextData(tiny_world.world_dir, tok, {"prob": 1.0, "noise": 2.0})
    assert plain.batch(3, 4, 7).keys() == {"input_ids", "attention_mask", "labels"}
    batch = slots.batch(3, 4, 7)
    assert torch.equal(batch["input_ids"], slots.batch(3, 4, 7)["input_ids"])  # a function of the step
    vocab = tok.get_vocab()
    for row, mask, labels in zip(batch["input_ids"], batch["slot_mask"], batch["labels"]):
        ids = row.tolist()
        start, end = ids.index(vocab["<|audio_bos|>"]), ids.index(vocab["<|audio_eos|>"])
        assert mask.nonzero()[:, 0].tolist() == list(range(start + 1, end))  # exactly the slots
        inside = [t for t in ids[start + 1:end] if t != vocab["<|sil|>"]]
        words = [t for i, t in enumerate(inside) if i == 0 or t != inside[i - 1]]  # repeats collapsed
        question = tok.decode(words).strip()
        pair = next(p for p in slots.qa if p["question"] == question)
        answer = tok.decode([t for t in labels.tolist() if t >= 0], skip_special_tokens=True).strip()
        assert answer == pair["answer"]
    # at k = 1 (25 Hz slots) a word lasts five times as many slots: every run is a multiple of 5
    fine = TextData(tiny_world.world_dir, tok, {"prob": 1.0}, group_size=1).batch(3, 4, 7)
    assert "slot_mask" not in fine  # no noise asked
    ids = fine["input_ids"][0].tolist()
    inside = ids[ids.index(vocab["<|audio_bos|>"]) + 1:ids.index(vocab["<|audio_eos|>"])]
    runs = [len(list(group)) for _, group in __import__("itertools").groupby(inside)]
    assert all(r % 5 == 0 for r in runs)
    embeds = torch.randn(*batch["input_ids"].shape, 8)
    noisy = slot_noise(embeds, batch["slot_mask"], 5, 2.0)
    outside = ~batch["slot_mask"]
    assert torch.equal(noisy[outside], embeds[outside]) and not torch.equal(noisy, embeds)
    assert torch.equal(noisy, slot_noise(embeds, batch["slot_mask"], 5, 2.0))


def test_held_out_facts_reach_the_base_llm_only_as_plain_text(tiny_world):
    """The speech-test facts' questions come in the base LLM's batches as plain text QA, never laid out as audio
    slots or in a spoken reply's layout; the speech-train facts' come both ways."""
    from fac.train.data import TextData
    from fac.train.stages import load_tokenizer

    tok = load_tokenizer(tiny_world.tokenizer_dir)
    data = TextData(tiny_world.world_dir, tok, {"prob": 0.5, "spoken_reply": 0.5})
    split = {pair["question"]: pair["split"] for pair in data.qa}
    assert set(split.values()) == {"train", "test"}
    vocab = tok.get_vocab()
    bos, eos, sil = vocab["<|audio_bos|>"], vocab["<|audio_eos|>"], vocab["<|sil|>"]
    heard, read = set(), set()
    for step in range(60):
        batch = data.batch(step, 16, 3)
        for row in batch["input_ids"].tolist():
            if bos in row:  # a question in audio slots (the first span), perhaps with a spoken reply
                inside = [t for t in row[row.index(bos) + 1:row.index(eos)] if t != sil]
                words = [t for i, t in enumerate(inside) if i == 0 or t != inside[i - 1]]
                heard.add(tok.decode(words).strip())
            else:
                read.update(q for q in split if q in tok.decode(row))
    assert heard and heard <= set(split)
    assert {split[q] for q in heard} == {"train"}  # no held-out fact is heard
    assert "test" in {split[q] for q in read}  # ...but each is read


def test_packed_base_llm_batch_gives_the_unpadded_loss_and_gradients_with_less_padding(tiny_world):
    """The base LLM's packed batch (documents, text QA and slot questions sharing rows, positions restarting)
    has the loss and gradients of the same examples one per row, on fewer positions; its slot noise is drawn per
    example, not per row."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fac.train.data import TextData
    from fac.train.stages import load_tokenizer, slot_noise

    tok = load_tokenizer(tiny_world.tokenizer_dir)
    slot = {"prob": 0.5, "spoken_reply": 0.5}
    rows = TextData(tiny_world.world_dir, tok, slot)
    packed = TextData(tiny_world.world_dir, tok, slot, packing=True, max_length=160)
    a, b = rows.batch(4, 12, 9), packed.batch(4, 12, 9)
    assert b["attention_mask"] is None and b["input_ids"].numel() < a["input_ids"].numel()
    assert b["input_ids"].shape[0] < a["input_ids"].shape[0]  # several examples share a row
    assert set(b["segment_ids"].unique().tolist()) - {-1} == set(range(12))
    # Each segment is one of the unpacked rows, at positions 0, 1, ...
    real = [r[m.bool()].tolist() for r, m in zip(a["input_ids"], a["attention_mask"])]
    for i in range(12):
        where = b["segment_ids"] == i
        assert b["input_ids"][where].tolist() == real[i]
        assert b["position_ids"][where].tolist() == list(range(len(real[i])))
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(config).eval()

    def loss_and_grads(batch):
        model.zero_grad()
        batch = {k: v for k, v in batch.items() if k != "segment_ids"}
        loss = model(**batch, use_cache=False).loss  # as the base LLM's loss calls it (fac.train.packing)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    (la, ga), (lb, gb) = loss_and_grads(a), loss_and_grads(b)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    # Slot noise: token for token what the same examples get one per row.
    noisy_rows = TextData(tiny_world.world_dir, tok, {**slot, "noise": 2.0}).batch(4, 12, 9)
    noisy_packed = TextData(tiny_world.world_dir, tok, {**slot, "noise": 2.0}, packing=True,
                            max_length=160).batch(4, 12, 9)
    embedding = torch.nn.Embedding(len(tok), 8)
    with torch.no_grad():
        ea = slot_noise(embedding(noisy_rows["input_ids"]), noisy_rows["slot_mask"], int(noisy_rows["noise_seed"]), 2.0)
        eb = slot_noise(embedding(noisy_packed["input_ids"]), noisy_packed["slot_mask"],
                        int(noisy_packed["noise_seed"]), 2.0, noisy_packed["segment_ids"], noisy_packed["position_ids"])
    assert int(noisy_rows["slot_mask"].sum()) > 0
    for i in range(12):
        n = int(noisy_rows["attention_mask"][i].sum())
        assert torch.equal(eb[noisy_packed["segment_ids"] == i], ea[i, :n])
        assert torch.equal(noisy_packed["slot_mask"][noisy_packed["segment_ids"] == i], noisy_rows["slot_mask"][i, :n])
    with pytest.raises(ValueError, match="max_length"):
        TextData(tiny_world.world_dir, tok, slot, packing=True)
    # Rows shorter than an example widen to it (a 25 Hz question is 5x as long): each example still in one row.
    narrow = TextData(tiny_world.world_dir, tok, slot, packing=True, max_length=16).batch(4, 12, 9)
    assert narrow["input_ids"].shape[1] == max(len(r) for r in real)
    for i in range(12):
        assert narrow["input_ids"][narrow["segment_ids"] == i].tolist() == real[i]


def test_spoken_reply_is_the_text_stream_of_the_drsr_models_spoken_answer(tiny_world):
    """Base-LLM examples with `spoken_reply` ask in s2m mode and answer exactly as a DRSR s2m turn's text stream
    runs: <|audio_bos|>, the answer one token per slot, <|sil|> to the end of the speech, <|audio_eos|>."""
    from fac.data.text_tokenizer import SYSTEM_PROMPTS
    from fac.model.processing import SpecialIds, build_example
    from fac.train.data import TextData, encode_text
    from fac.train.stages import load_tokenizer
    from fac.train.trainer import step_rng

    tok = load_tokenizer(tiny_world.tokenizer_dir)
    vocab = tok.get_vocab()
    special = SpecialIds.from_tokenizer(tok, tiny_world.drsr_config())
    data = TextData(tiny_world.world_dir, tok, {"prob": 1.0, "spoken_reply": 1.0}, group_size=5)
    for step in range(6):
        pair = data.qa[step % len(data.qa)]
        answer = encode_text(tok, pair["answer"])
        ids, labels = data.slot_example(step_rng(3, step), pair)
        assert SYSTEM_PROMPTS["s2m"] in tok.decode(ids)
        reply = [t for t in labels if t >= 0]
        assert ids[len(ids) - len(reply):] == reply  # the loss covers the whole reply and nothing else
        n_slots = reply.index(vocab["<|audio_eos|>"]) - 1
        # the DRSR example of the same answer with speech that fills those slots (10 delay tokens + codes)
        codes = list(range(5 * n_slots - 10))
        drsr = build_example([], torch.zeros(80, 40), answer, codes, special, 5)
        drsr_reply = drsr.input_ids.tolist()[-len(reply):]
        at_slot = [d == special.audio for d in drsr_reply]
        assert sum(at_slot) == n_slots
        assert [d for d, slot in zip(drsr_reply, at_slot) if not slot] == [r for r, slot in zip(reply, at_slot) if not slot]
        assert [r for r, slot in zip(reply, at_slot) if slot] == answer + [vocab["<|sil|>"]] * (n_slots - len(answer))
        assert 10 + 25 * 0.3 <= 5 * n_slots < 10 + 25 * 1.5 + 5  # the speech delay plus 0.3-1.5 s
    s2t = TextData(tiny_world.world_dir, tok, {"prob": 1.0}, group_size=5)
    ids, labels = s2t.slot_example(step_rng(3, 0), s2t.qa[0])
    assert SYSTEM_PROMPTS["s2t"] in tok.decode(ids) and vocab["<|audio_bos|>"] not in [t for t in labels if t >= 0]


def test_spec_augment_masks_within_each_clip_and_replays_from_the_same_rng():
    import random

    torch.manual_seed(0)
    features = torch.randn(2, 80, 50)
    lengths = torch.tensor([50, 30])
    masks = dict(freq_masks=2, freq_width=10, time_masks=2, time_width=8)
    a, b = features.clone(), features.clone()
    stages.spec_augment(a, lengths, random.Random(7), **masks)
    stages.spec_augment(b, lengths, random.Random(7), **masks)
    assert torch.equal(a, b)  # a resumed run masks the same bins
    assert not torch.equal(a, features)
    assert torch.equal(a[1, :, 30:], features[1, :, 30:])  # padding past a clip is left alone
    changed_bins = ((a[0] != features[0]).all(dim=1)).sum()  # a masked band covers all frames
    assert 0 < changed_bins <= 20


# ------------------------------------------------------------------------------------------- DRSR stages


@pytest.fixture(scope="module")
def recipe(tiny_world, tmp_path_factory):
    """The recipe's first stages on the tiny world: base LLM, encoder, init, pre-alignment, stage 1."""
    base = tmp_path_factory.mktemp("recipe")
    w = tiny_world
    state = base / "state"
    stages.train_base_llm({"steps": 2, "lr": 3e-3, "batch_size": 2, "seed": 1}, w.model_params, w.world_dir,
                          w.tokenizer_dir, base / "base_llm", state, {})
    stages.train_encoder({"steps": 2, "lr": 1e-3, "batch_size": 2, "seed": 2, "data": {"asr_train": 1.0}},
                         w.model_params, w.manifest_dir, w.data_root, w.tokenizer_dir, str(base / "base_llm"),
                         base / "encoder", state, {})
    stages.init_model(w.model_params, str(base / "base_llm"), str(base / "encoder"), str(w.tokenizer_dir),
                      str(w.speech_tokenizer_dir), str(w.manifest_dir), str(w.data_root), str(base / "init"),
                      seed=3)  # str paths, as the CLI passes
    stages.train_drsr("prealign", {"trainable": PREALIGN, "data": {"asr_train": 1.0, "spoken_qa_train": 1.0},
                                   "steps": 3, "lr": 1e-3, "batch_size": 2, "seed": 4},
                      str(base / "init"), w.manifest_dir, w.data_root, base / "prealign", state, {})
    stages.train_drsr("stage1", {"trainable": [""], "data": {"spoken_qa_train": 1.0}, "steps": 2, "lr": 1e-3,
                                 "batch_size": 2, "seed": 5},
                      str(base / "prealign"), w.manifest_dir, w.data_root, base / "stage1", state, {})
    return base


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def changed(before: dict, after: dict, prefix: str) -> dict[str, bool]:
    return {n: not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix + ".")}


def test_init_copies_the_base_llm_bit_exactly_into_language_model(recipe):
    llm, init = weights(recipe / "base_llm"), weights(recipe / "init")
    copied = {n.removeprefix("language_model."): t for n, t in init.items() if n.startswith("language_model.")}
    assert copied.keys() == llm.keys()
    assert [n for n in llm if not torch.equal(copied[n], llm[n])] == []


def test_init_copies_the_encoder_bit_exactly_into_continuous_audio_tower(recipe):
    encoder, init = weights(recipe / "encoder"), weights(recipe / "init")
    tower = {n: t for n, t in encoder.items() if n.startswith("continuous_audio_tower.")}
    assert {n for n in init if n.startswith("continuous_audio_tower.")} == tower.keys()
    assert [n for n in tower if not torch.equal(init[n], tower[n])] == []
    assert {n.split(".")[0] for n in encoder} == {"continuous_audio_tower", "blank_head", "logit_scale"}  # CTC parts stay out


def test_prealignment_keeps_every_llm_tensor_bit_identical(recipe):
    before, after = weights(recipe / "init"), weights(recipe / "prealign")
    llm = changed(before, after, "language_model")
    assert llm and not any(llm.values())


@pytest.mark.parametrize("module", PREALIGN)
def test_prealignment_trains_encoder_adapter_and_srh(recipe, module):
    before, after = weights(recipe / "init"), weights(recipe / "prealign")
    tensors = changed(before, after, module)
    # Every tensor that takes part in the forward pass moved; the official checkpoint's unused
    # audio_bos_eos_token embedding gets no gradient.
    unchanged = [n for n, moved in tensors.items() if not moved]
    assert tensors and unchanged == (["continuous_audio_tower.audio_bos_eos_token.weight"]
                                     if module == "continuous_audio_tower" else [])


def test_stage1_with_every_parameter_trainable_changes_every_llm_tensor(recipe):
    before, after = weights(recipe / "prealign"), weights(recipe / "stage1")
    llm = changed(before, after, "language_model")
    assert llm and all(llm.values())



def test_encoder_ctc_scores_frames_against_the_base_llms_embeddings(recipe):
    """The CTC word logits are the encoder output times the (frozen) LLM input embeddings."""
    from transformers import AutoModelForCausalLM

    embeddings = AutoModelForCausalLM.from_pretrained(recipe / "base_llm").get_input_embeddings().weight
    model = CTCRecognizer(audio_config(), embeddings)
    features = torch.randn(1, 80, 120)
    logits, lengths = model(features, torch.ones(1, 120, dtype=torch.long))
    hidden = model.continuous_audio_tower(features, torch.ones(1, 120, dtype=torch.long), int(lengths[0]))
    assert logits.shape[-1] == embeddings.shape[0] + 1
    assert torch.allclose(logits[..., :-1], hidden @ embeddings.T, atol=1e-5)


def test_init_scales_the_adapter_so_audio_features_match_word_embedding_length(recipe, tiny_world):
    """The continuous features reach the LLM at the length of its word embeddings (not tens of times longer)."""
    from fac.model import load_checkpoint

    model = load_checkpoint(recipe / "init")
    scale = json.loads((recipe / "init" / "train_summary.json").read_text())["adapter_scale"]
    weight = model.audio_tower.continual_output_matching.weight
    assert torch.allclose(weight, scale * torch.eye(weight.shape[0]))
    assert stages.feature_scale(model, tiny_world.manifest_dir, tiny_world.data_root) == pytest.approx(
        scale, rel=1e-5)


def _last_layer_output(module, run):
    """The output of `module` (a transformer layer) during `run()`."""
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_imported_whisper_encoder_computes_what_transformers_whisper_encoder_computes(tmp_path):
    """A random Whisper folder (128 mel bins), imported: on 2 windows of 2*n_window frames the tower's last layer
    equals transformers' WhisperEncoder run on each window, and its output is that, pooled by 2, through
    Whisper's final layer norm and the new projection."""
    from transformers import Qwen3Config, WhisperConfig, WhisperModel

    n_window = 50  # WhisperEncoder takes exactly 2 * max_source_positions frames: one window of the tower
    whisper = WhisperModel(WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                         encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2,
                                         decoder_ffn_dim=64, max_source_positions=n_window, vocab_size=64, pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)).eval()
    with torch.no_grad():  # layer norms start at 1 and 0: move them, so that a mis-mapped norm cannot pass
        for name, param in whisper.encoder.named_parameters():
            if "layer_norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    whisper.save_pretrained(tmp_path / "whisper")
    Qwen3Config(hidden_size=48).save_pretrained(tmp_path / "llm")  # the adapter's width is the LLM's
    stages.import_whisper_encoder(str(tmp_path / "whisper"), {"encoder": {"n_window": n_window}}, tmp_path / "llm",
                                  str(tmp_path / "encoder"))
    config = FunAudioChatAudioConfig.from_json_file(str(tmp_path / "encoder/config.json"))
    assert (config.num_mel_bins, config.d_model, config.encoder_layers, config.output_dim) == (128, 32, 2, 48)
    tower = FunAudioChatContinuousEncoder(config).eval()
    tower.load_state_dict({k.removeprefix("continuous_audio_tower."): v
                           for k, v in load_file(str(tmp_path / "encoder/model.safetensors")).items()})
    features = torch.randn(1, 128, 4 * n_window, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        [tower_last] = _last_layer_output(tower.layers[-1], lambda: tower(
            features, torch.ones(1, 4 * n_window, dtype=torch.long), output_length=n_window))
        out = tower(features, torch.ones(1, 4 * n_window, dtype=torch.long), output_length=n_window)
        windows = features.split(2 * n_window, dim=-1)
        whisper_last = torch.cat([_last_layer_output(whisper.encoder.layers[-1], lambda w=w: whisper.encoder(w))[0]
                                  for w in windows])  # [2 windows, n_window, d]
        torch.testing.assert_close(tower_last, whisper_last, rtol=1e-5, atol=1e-5)
        pooled = whisper_last.reshape(-1, 2, 32).mean(dim=1)  # [n_window, d]: both windows, pairs averaged
        expected = tower.proj(whisper.encoder.layer_norm(pooled))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(tower.ln_post.weight, whisper.encoder.layer_norm.weight)


def test_dpo_trains_under_the_deepspeed_backend_as_under_the_torch_backend(recipe, tiny_world, tmp_path):
    """`fac train dpo` with backend deepspeed (ZeRO-2, one CPU process) trains on the same pairs as the torch backend:
    both start from the same reference margins and end within a few float bits of each other's rewards."""
    import os
    import subprocess
    import sys

    from fac.data.text_tokenizer import SYSTEM_PROMPTS

    lines = (tiny_world.manifest_dir / "spoken_qa_train.jsonl").read_text().splitlines()[:2]
    pairs = []
    for n, line in enumerate(lines):
        record = json.loads(line)
        user, reply = (json.loads(a) for a in record["audio"])
        pairs.append({"dimension": "robustness", "system": SYSTEM_PROMPTS["s2t"], "user_path": user["path"],
                      "id": f"p{n}", "chosen": {"text": reply["text"], "codes": None},
                      "rejected": {"text": "nobody knows", "codes": None}})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summaries = {}
    for backend in ("torch", "deepspeed"):
        stage = {"trainable": [""], "beta": 0.1, "steps": 2, "lr": 1e-3, "batch_size": 2, "seed": 6, "backend": backend,
                 "zero_stage": 2, "processes": 1}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DS_BUILD_OPS": "0",
               "CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run([sys.executable, "-m", "fac", "train", "dpo", "--params", json.dumps({"stage": stage}),
                               "--model", str(recipe / "stage1"), "--pairs", str(tmp_path / "pairs.jsonl"),
                               "--data-root", str(tiny_world.data_root), "--out", str(tmp_path / backend),
                               "--state-root", str(tmp_path / f"state-{backend}"), "--threads", "1"],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[backend] = [json.loads(line) for line in (tmp_path / backend / "history.jsonl").read_text().splitlines()]
    torch_history, ds_history = summaries["torch"], summaries["deepspeed"]
    assert len(torch_history) == len(ds_history) == 2
    for a, b in zip(torch_history, ds_history):
        assert a["reward_margin"] == pytest.approx(b["reward_margin"], abs=1e-3)
    assert ds_history[-1]["reward_margin"] > 0.05  # one step already prefers the chosen replies


def test_base_llm_dialogues_ask_the_last_question_by_reference_to_the_first_turns_person(lexicon_path, tmp_path):
    """With `dialogues`, some text QA comes as two or three turns: the first names a person and asks another of
    their facts, a distance-2 dialogue asks about someone else next, and the last asks by reference; the reply it
    learns is the referred person's value, and every reply is a label."""
    from fac.data.text_tokenizer import train_tokenizer
    from fac.data.world import REFERENCES, all_sentences, build_world, load_source, write_world
    from fac.train.data import IGNORE_INDEX, TextData
    from fac.train.stages import load_tokenizer

    source = load_source(lexicon_path)
    world = build_world(source, 6, 0.3, seed=1)
    write_world(world, source, tmp_path / "world")
    train_tokenizer(all_sentences(world, source), 1024, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    data = TextData(tmp_path / "world", tok, dialogues=1.0)
    value = {(f["name"], f["attribute"]): f["value"] for f in world.facts}
    asked = {q: attr for attr, spec in source["attributes"].items() for q in spec["questions"]}
    distances = set()
    for step in range(10):
        for ids in data.batch(step, 8, 5)["input_ids"].tolist():
            text = tok.decode(ids, skip_special_tokens=False)
            users = [u.split("<|im_end|>")[0] for u in text.split("<|im_start|>user\n")[1:]]
            replies = [r.split("<|im_end|>")[0] for r in text.split("<|im_start|>assistant\n")[1:]]
            assert len(users) == len(replies) in (2, 3)
            distance = len(users) - 1
            distances.add(distance)
            first = next(n for n, _ in value if n in users[0])
            last = users[-1]
            assert REFERENCES[distance] in last and not any(n in last for n, _ in value)
            template = next(q for q in asked if q.replace("{name}", REFERENCES[distance]) == last)
            assert replies[-1] == value[(first, asked[template])]
            if distance == 2:
                assert first not in users[1]
    assert distances == {1, 2}
    ids, labels = data.dialogue_example(random.Random(0), data.qa[0])
    learned = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert learned.count("<|im_end|>") in (2, 3)  # every reply is learned, not only the last
