"""Evaluation and inference: answers are scored on their first real word, the speech-token accuracy is the
SRH's teacher-forced code accuracy, and `fac infer` answers a wav with a DRSR checkpoint or fails clearly."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from fac.cli import main
from fac.eval.metrics import first_word, speech_token_accuracy
from fac.model import FunAudioChatForConditionalGeneration, FunAudioChatGenerateOutput, load_checkpoint
from fac.model.processing import IGNORE_INDEX, SpecialIds
from fac.train.data import FeatureCache, SpokenData
from train_fixtures import CODEBOOK, one_thread, run_fac, save_random_drsr, tiny_world  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    return tiny_world.tokenizer()


@pytest.fixture(scope="module")
def drsr_dir(tiny_world, tmp_path_factory):
    """A tiny randomly initialised DRSR checkpoint with the world's text tokenizer saved beside it."""
    folder = tmp_path_factory.mktemp("drsr") / "model"
    save_random_drsr(tiny_world, folder, seed=7)
    return folder


# ------------------------------------------------------------------------------------------- metrics


def test_first_word_drops_special_tokens(tokenizer):
    ids = tokenizer.encode("<|audio_bos|><|sil|>paris tea<|im_end|><|endoftext|>", add_special_tokens=False)
    assert first_word(tokenizer, ids) == "paris"


def test_first_word_of_only_special_tokens_is_empty(tokenizer):
    ids = tokenizer.encode("<|im_end|><|endoftext|>", add_special_tokens=False)
    assert first_word(tokenizer, ids) == ""


@pytest.fixture(scope="module")
def spoken_test(tiny_world, tokenizer, drsr_dir):
    model = load_checkpoint(drsr_dir)
    special = SpecialIds.from_tokenizer(tokenizer, model.config)
    data = SpokenData(tiny_world.manifest_dir, {"spoken_qa_train": 1.0}, FeatureCache(tiny_world.data_root, 80),
                      tokenizer, special, model.config.audio_config.group_size)
    return model, data


def force_speech_logits(model, monkeypatch, predict):
    """Replace the SRH's logits by one-hot logits of `predict(target)`, target being the code each sub-frame
    is trained to predict (speech label q + G for sub-frame q)."""
    forward = type(model).forward
    g = model.config.audio_config.group_size
    codebook = model.config.audio_config.codebook_size

    def forced(**batch):
        out = forward(model, **batch)
        target = torch.nn.functional.pad(out.speech_labels[:, g:], (0, g), value=IGNORE_INDEX)
        out.speech_logits = torch.nn.functional.one_hot(predict(target).clamp(min=0), codebook).float()
        return out

    monkeypatch.setattr(model, "forward", forced)


def test_speech_token_accuracy_is_one_when_the_srh_predicts_every_code(spoken_test, monkeypatch):
    model, data = spoken_test
    force_speech_logits(model, monkeypatch, lambda target: target)
    assert speech_token_accuracy(model, data, "spoken_qa_train") == 1.0


def test_speech_token_accuracy_counts_codes_only_not_delay_or_eos_tokens(spoken_test, monkeypatch):
    model, data = spoken_test
    bos = model.config.audio_config.bos_token_id
    # Right on every code, wrong (code 0) wherever the target is the delay token or the speech eos.
    force_speech_logits(model, monkeypatch, lambda target: torch.where(target >= bos, 0, target))
    assert speech_token_accuracy(model, data, "spoken_qa_train") == 1.0


def test_speech_token_accuracy_of_a_model_one_code_late_is_low(spoken_test, monkeypatch):
    model, data = spoken_test
    # Predicting the code before the target (the one the SRH is fed) is not credited.
    force_speech_logits(model, monkeypatch, lambda target: target.roll(1, dims=1))
    assert speech_token_accuracy(model, data, "spoken_qa_train") < 0.25


def test_speech_token_accuracy_of_a_random_model_is_near_chance(spoken_test):
    model, data = spoken_test
    assert speech_token_accuracy(model, data, "spoken_qa_train") < 4 / CODEBOOK  # chance is 1/16


# ------------------------------------------------------------------------------------------- fac infer


def test_fac_infer_s2m_prints_text_and_speech_tokens_as_json(tiny_world, tokenizer, drsr_dir):
    proc = run_fac("infer", "--model", str(drsr_dir), "--audio", str(tiny_world.wavs[0]), "--mode", "s2m",
                   "--json", "--max-new-tokens", "6")
    assert proc.returncode == 0
    result = json.loads(proc.stdout)
    assert {"text", "text_ids", "speech_tokens"} <= result.keys()
    assert result["text_ids"] and all(isinstance(i, int) for i in result["text_ids"])
    assert result["text_ids"][0] == tokenizer.convert_tokens_to_ids("<|audio_bos|>")  # s2m opens a speech span
    assert result["text"] == tokenizer.decode(result["text_ids"], skip_special_tokens=True).strip()
    assert all(isinstance(c, int) and 0 <= c < CODEBOOK for c in result["speech_tokens"])  # below the speech bos


def test_fac_infer_reports_the_generated_codes_below_the_speech_bos(tiny_world, tokenizer, drsr_dir, monkeypatch,
                                                                   capsys):
    # Speech ids as the SRH emits them: 10 delay tokens (bos 16), codes, then eos 17 (and pad 18).
    speech = [16] * 10 + [3, 7, 15, 0, 9] + [17] * 4 + [18]
    text = tokenizer.encode("<|audio_bos|>paris<|audio_eos|><|im_end|>", add_special_tokens=False)

    def generate(self, **kwargs):
        assert kwargs["mode"] == "s2m"
        return FunAudioChatGenerateOutput(text_ids=torch.tensor([text]), speech_ids=torch.tensor([speech]))

    monkeypatch.setattr(FunAudioChatForConditionalGeneration, "generate_speech_text", generate)
    rc = main(["infer", "--model", str(drsr_dir), "--audio", str(tiny_world.wavs[0]), "--mode", "s2m", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["speech_tokens"] == [3, 7, 15, 0, 9]
    assert result["text"] == "paris" and result["text_ids"] == text


def test_fac_infer_on_a_corrupt_wav_exits_2_naming_the_file(drsr_dir, tmp_path, capsys):
    wav = tmp_path / "broken.wav"
    wav.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not really a wav file")
    rc = main(["infer", "--model", str(drsr_dir), "--audio", str(wav)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fac infer: error:" in err and str(wav) in err


@pytest.fixture(scope="module")
def qwen3_dir(tokenizer, tmp_path_factory):
    """A plain tiny Qwen3 checkpoint (another model type) with the world's tokenizer."""
    folder = tmp_path_factory.mktemp("qwen3") / "model"
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fac_infer_on_a_checkpoint_of_another_model_names_its_model_type(tiny_world, qwen3_dir, capsys):
    rc = main(["infer", "--model", str(qwen3_dir), "--audio", str(tiny_world.wavs[0])])
    err = capsys.readouterr().err
    assert rc == 2
    assert "model_type is 'qwen3'" in err and "funaudiochat" in err and str(qwen3_dir) in err


# ------------------------------------------------------------------------------------------- fac eval


def fac_eval(world, model_dir, out) -> int:
    return main(["eval", "--stage", "test", "--model", str(model_dir), "--world", str(world.world_dir),
                 "--manifests", str(world.manifest_dir), "--data-root", str(world.data_root), "--out", str(out)])


def test_fac_eval_of_a_drsr_checkpoint_writes_every_metric_as_a_fraction(tiny_world, drsr_dir, tmp_path):
    assert fac_eval(tiny_world, drsr_dir, tmp_path / "metrics.json") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics.keys() == {"spoken_qa_acc", "spoken_qa_acc_unseen_voices", "text_qa_acc", "speech_token_acc"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_fac_eval_of_a_plain_llm_writes_text_qa_only(tiny_world, qwen3_dir, tmp_path):
    assert fac_eval(tiny_world, qwen3_dir, tmp_path / "metrics.json") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics.keys() == {"text_qa_acc"} and 0.0 <= metrics["text_qa_acc"] <= 1.0


def test_spoken_units_stop_at_eos_and_drop_the_delay_tokens():
    from types import SimpleNamespace

    from fac.data.manifests import spoken_units

    cfg = SimpleNamespace(bos_token_id=16, eos_token_id=17)
    assert spoken_units([16, 16, 16, 3, 4, 16, 5, 17, 17, 6], cfg) == [3, 4, 5]
    assert spoken_units([17, 3], cfg) == []


@pytest.mark.parametrize("units, expected", [(20, True), (13, True), (11, False), (10, False), (6, False), (0, False)])
def test_a_reply_follows_slowly_when_its_length_is_nearer_the_slow_answer(units, expected):
    from fac.data.manifests import follows_style

    # normal answer 10 units, the slow one 16: the log-midpoint is sqrt(160) = 12.6
    assert follows_style(units, 16, 10) is expected


def test_a_reply_follows_quickly_when_it_is_short_enough():
    from fac.data.manifests import follows_style

    assert follows_style(6, 6, 10) and follows_style(7, 6, 10)
    assert not follows_style(8, 6, 10) and not follows_style(12, 6, 10)


def test_instruction_by_ear_judges_the_spoken_answers_duration_against_both_recordings(tmp_path):
    """A spoken answer follows "slowly" when its voiced duration is nearer, in log ratio, to the slow recording's than
    to the normal one's (silence around it does not count); the normal recording is the same answer's reply in
    spoken_qa_test; a record with no normal recording is named."""
    from types import SimpleNamespace

    import numpy as np

    from fac.data.audio import SAMPLE_RATE, write_wav
    from fac.eval.metrics import instruction_by_ear

    def clip(seconds, silence=0.0):
        t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
        pad = np.zeros(int(silence * SAMPLE_RATE), dtype=np.float32)
        return np.concatenate([pad, (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), pad])

    write_wav(tmp_path / "normal.wav", clip(1.0))
    write_wav(tmp_path / "slow.wav", clip(1.6, silence=0.4))  # voiced 1.6 s: the log-midpoint is 1.26 s
    write_wav(tmp_path / "normal2.wav", clip(0.8))

    def record(i, answer, ref, style="slowly"):
        return SimpleNamespace(meta={"id": f"q{i}", "answer": answer, "style": style}, reply_ref_path=ref)

    normal = [record(0, "paris", "normal.wav"), record(1, "rome", "normal2.wav")]
    data = SimpleNamespace(records={"spoken_qa_test": normal}, features=SimpleNamespace(data_root=tmp_path))
    spoken = {0: clip(1.5, silence=0.3), 1: clip(1.1, silence=0.5), 2: clip(1.3), 3: clip(0.0)}
    speech_out = SimpleNamespace(detokenizer=SimpleNamespace(sample_rate=SAMPLE_RATE),
                                 speak=lambda units: [spoken[u[0]] for u in units])
    styled = [record(i, "paris", "slow.wav") for i in range(4)]
    metrics = instruction_by_ear(styled, [[0], [1], [2], [3]], data, speech_out)
    assert metrics["instruction_acc"] == pytest.approx(2 / 4)  # 1.5 s and 1.3 s follow; 1.1 s and nothing do not
    assert metrics["instruct_duration_ratio_slowly"] == pytest.approx((1.5 + 1.1 + 1.3 + 0.0) / 4, abs=0.01)
    with pytest.raises(ValueError, match=r"q9 \(answer 'oslo'\) has no normal recording"):
        instruction_by_ear([record(9, "oslo", "slow.wav")], [[0]], data, speech_out)


def test_speech_out_hands_the_scorer_16_khz_audio_when_the_detokenizer_speaks_24_khz(tmp_path, monkeypatch):
    """CosyVoice 3's token2wav speaks 24 kHz; the ASR scorers hear 16 kHz: SpeechOut.hear resamples, in one batch
    (the command runs once), and an answer with no unit is heard as "" without reaching the scorer."""
    import numpy as np

    import fac.data.asr
    from fac.data.audio import SAMPLE_RATE
    from fac.data.detokenizer import write_command_detokenizer
    from fac.eval.metrics import SpeechOut
    from standins import TOKEN2WAV_RATE, TOKEN2WAV_SAMPLES_PER_UNIT, speaker_embedding, token2wav_command

    calls = tmp_path / "calls.txt"
    write_command_detokenizer({"command": token2wav_command(tmp_path, f"--calls {calls}"), "sample_rate": TOKEN2WAV_RATE,
                               "speaker": str(speaker_embedding(tmp_path / "voice.pt")), "codebook_size": 6561},
                              tmp_path / "detok")

    class FakeScorer:
        def __init__(self):
            self.heard = []

        def transcribe_batch(self, clips):
            self.heard.append([np.asarray(c) for c in clips])
            return [f"clip {i}" for i in range(len(clips))]

    scorer = FakeScorer()
    monkeypatch.setattr(fac.data.asr, "recognizer", lambda params, lm_dir: scorer)
    speech_out = SpeechOut(str(tmp_path / "detok"), {"engine": "whisper", "model": "unused"}, None, 0)
    assert speech_out.detokenizer.sample_rate == TOKEN2WAV_RATE
    units = [[5] * 10, [], [9] * 5 + [6562]]
    assert speech_out.hear(units) == ["clip 0", "", "clip 1"]
    assert len(calls.read_text().splitlines()) == 2  # the folder's check, then one run for the batch
    assert len(scorer.heard) == 1
    heard = scorer.heard[0]
    per_unit_at_16k = TOKEN2WAV_SAMPLES_PER_UNIT * SAMPLE_RATE // TOKEN2WAV_RATE  # 640: 40 ms at 16 kHz
    assert [len(c) for c in heard] == [10 * per_unit_at_16k, 5 * per_unit_at_16k]
    spoken = speech_out.speak(units)[0]  # at 24 kHz: the same tone, the same pitch, 1.5 times the samples
    assert len(spoken) == 10 * TOKEN2WAV_SAMPLES_PER_UNIT

    def pitch(clip, rate):
        spectrum = np.abs(np.fft.rfft(clip))
        return np.argmax(spectrum) * rate / len(clip)

    assert abs(pitch(heard[0], SAMPLE_RATE) - pitch(spoken, TOKEN2WAV_RATE)) < 3.0
    assert 0.3 < np.abs(heard[0]).max() < 0.5


def test_answer_match_looks_for_meta_answer_else_the_reference_replys_text():
    from types import SimpleNamespace

    from fac.eval.metrics import reference_answer

    assert reference_answer(SimpleNamespace(meta={"answer": "paris"}, text="it is paris")) == "paris"
    assert reference_answer(SimpleNamespace(meta={}, text="it is paris")) == "it is paris"
    assert reference_answer(SimpleNamespace(meta={}, text=None)) == ""


def test_speech_to_speech_asks_the_spoken_references_and_scores_answer_match_only_where_there_is_an_answer(
        monkeypatch):
    """Your data's records: only those with a spoken reference are answered in speech; answer match looks for
    meta.answer, else the reply's text, and a record with neither counts for answer_wer only (no record with one:
    s2s_acc is None, for evaluate_sets to list as skipped)."""
    from types import SimpleNamespace

    import fac.eval.metrics as metrics

    def record(text, codes, meta=None):
        return SimpleNamespace(text=text, codes=codes, meta=meta or {}, user_path="q.wav", reply_ref_path="", turns=[])

    records = [record("it is paris", [1, 2]), record("blue", None), record("", [3], {"answer": "seven"}),
               record("", [4])]
    asked = []
    monkeypatch.setattr(metrics, "answers", lambda model, data, recs, *a, **k: asked.extend(recs) or
                        [([i], [i]) for i in range(len(recs))])
    monkeypatch.setattr(metrics, "spoken_units", lambda speech, cfg: speech)
    said = {0: "it is paris", 1: "seven", 2: "hello"}
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens: said[ids[0]])
    heard = {0: "it is paris", 1: "eleven", 2: "hello"}
    speech_out = SimpleNamespace(questions=0, EXAMPLES=3, examples=[], hear=lambda units: [heard[u[0]] for u in units])
    model = SimpleNamespace(eval=lambda: None, config=SimpleNamespace(audio_config=SimpleNamespace(group_size=5)))
    data = SimpleNamespace(records={"eval": records, "plain": [records[1], records[3]]})
    scored = metrics.speech_to_speech(model, data, "eval", tokenizer, speech_out)
    assert asked == [records[0], records[2], records[3]]  # the text reference is not asked in speech
    assert scored["s2s_questions"] == 3 and scored["s2s_acc"] == pytest.approx(1 / 2)  # paris heard, seven not
    assert scored["answer_wer"] == pytest.approx((0.0 + 1.0 + 0.0) / 3)
    assert [e["answer"] for e in speech_out.examples] == ["it is paris", "seven", ""]
    asked.clear()
    assert metrics.speech_to_speech(model, data, "plain", tokenizer, speech_out)["s2s_acc"] is None


def test_multiturn_accuracy_scores_the_last_answer_per_turn_distance(monkeypatch):
    """Each dialogue's last question answered in text (s2t, a 3-token budget); right when the first word is the value
    of the person it refers back to; the share overall and per distance."""
    from types import SimpleNamespace

    import fac.eval.metrics as metrics

    records = [SimpleNamespace(meta={"distance": d, "answer": a}) for d, a in
               ((1, "dog"), (1, "cat"), (2, "paris"), (2, "red"), (2, "tokyo"))]
    said = ["dog", "paris", "paris", "blue", "tokyo"]  # right, wrong, right, wrong, right
    calls = []

    def answers(model, data, recs, desc, mode, budgets, batch_size):
        calls.append((mode, budgets))
        return [([i], []) for i in range(len(recs))]

    monkeypatch.setattr(metrics, "answers", answers)
    monkeypatch.setattr(metrics, "first_word", lambda tokenizer, ids: said[ids[0]])
    model = SimpleNamespace(eval=lambda: None)
    scored = metrics.multiturn_accuracy(model, SimpleNamespace(records={"multiturn_test": records}), "multiturn_test",
                                        None)
    assert calls == [("s2t", [3] * 5)]
    assert scored == {"multiturn_acc": pytest.approx(3 / 5), "multiturn_acc_d1": 0.5,
                      "multiturn_acc_d2": pytest.approx(2 / 3)}
