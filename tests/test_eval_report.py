"""The HTML report: the per-stage table, loss curves, DPO rewards and every experiment side by side."""

import base64
import json
import re

import pytest

from fac.eval.report import build_report


def write_experiment(root, name, spoken, with_history=True):
    exp = root / name
    exp.mkdir(parents=True)
    metrics = {"base_llm": {"text_qa_acc": 1.0},
               "stage1": {"spoken_qa_acc": spoken, "text_qa_acc": 0.8, "train_step_seconds": 0.2},
               "dpo": {"spoken_qa_acc": spoken + 0.1, "text_qa_acc": 0.9}}
    (exp / "metrics.json").write_text(json.dumps(metrics))
    if with_history:
        for stage in ("stage1", "dpo"):
            folder = exp / "checkpoints" / stage
            folder.mkdir(parents=True)
            rows = [{"step": s, "loss": 1.0 / s, "text_loss": 0.5 / s, "speech_loss": 0.5 / s,
                     "reward_margin": 0.01 * s, "reward_accuracy": 0.5, "chosen_reward": 0.01 * s,
                     "rejected_reward": 0.0, "accuracy_empathy": 0.6} for s in range(1, 6)]
            (folder / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_has_the_table_the_curves_and_every_experiment(tmp_path):
    write_experiment(tmp_path, "default", 0.25)
    write_experiment(tmp_path, "k1", 0.125, with_history=False)
    out = tmp_path / "default" / "report.html"
    info = build_report(tmp_path, "default", out)
    page = out.read_text()
    assert info["experiments"] == ["default", "k1"] and info["loss_curves"] == ["dpo", "stage1"]
    assert not info["ablations"] and "Ablation" not in page
    (tmp_path / "default" / "ablations.json").write_text(json.dumps(
        {"alpha0.3/stage2": {"spoken_qa_acc": 0.375, "text_qa_acc": 0.5}, "dpo_empathy": {"spoken_qa_acc": 0.625}}))
    build_report(tmp_path, "default", out)
    page = out.read_text()
    assert "Ablation: merge alpha" in page and "alpha0.3/stage2" in page and "0.375" in page
    assert "dpo_empathy" in page and "0.625" in page
    assert "<h2>Per-stage metrics</h2>" in page and "<h2>Loss curves</h2>" in page and "<h2>DPO rewards</h2>" in page
    assert "0.250" in page and "0.125" in page  # both experiments' spoken_qa_acc in the comparison
    assert "k1 / stage1" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4  # losses, DPO, and a comparison plot per headline metric present
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)


def test_report_without_metrics_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        build_report(tmp_path, "nothing", tmp_path / "r.html")


def test_experiments_with_different_k_form_the_grouping_table(tmp_path):
    write_experiment(tmp_path, "default", 0.25)
    write_experiment(tmp_path, "k1", 0.125, with_history=False)
    write_experiment(tmp_path, "other", 0.5, with_history=False)  # no checkpoint config: not in the table
    out = tmp_path / "default" / "report.html"
    assert build_report(tmp_path, "default", out)["grouping"] == []  # one k known so far: no table
    assert "grouping k" not in out.read_text()
    for name, k in (("default", 5), ("k1", 1)):
        folder = tmp_path / name / "checkpoints" / "dpo"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"audio_config": {"group_size": k}}))
    info = build_report(tmp_path, "default", out)
    assert info["grouping"] == ["k=1 (k1) / dpo", "k=5 (default) / dpo"]
    page = out.read_text()
    section = page[page.index("Ablation: grouping k"):]
    assert section.index("k=1 (k1) / dpo") < section.index("k=5 (default) / dpo")
    assert "<td>0.225</td>" in section and "<td>0.350</td>" in section  # each experiment's dpo spoken_qa_acc


def test_report_plays_each_stages_spoken_answers_beside_the_question_and_the_reference(tmp_path):
    """With a detokenizer, the report's "Spoken answers": per test set its first QUESTIONS_PER_SET questions (of the
    stages' eval/examples), each with the question's and the reference's recordings and, per stage, the text, the
    transcript and the spoken answer (the example's units spoken again: 640 samples per unit) as WAV <audio>, and one
    mel figure; an answer with no units says so instead."""
    import io

    import numpy as np
    import soundfile as sf

    from fac.data.audio import SAMPLE_RATE, write_wav
    from fac.data.detokenizer import log_mel, train_flow_detokenizer
    from fac.eval.report import QUESTIONS_PER_SET

    t = np.arange(6400) / SAMPLE_RATE
    for name, hz in (("q.wav", 200), ("ref.wav", 300)):
        write_wav(tmp_path / "data" / name, (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32))
    units = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    detokenizer, _ = train_flow_detokenizer(
        [(units, log_mel((0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), len(units)), "v")], 12, "v",
        {"channels": 16, "layers": 1, "kernel": 3, "dilations": 1, "unit_layers": 0, "sampling_steps": 2,
         "temperature": 1.0, "griffin_lim_iterations": 2, "steps": 0, "batch_size": 1, "crop_units": 0, "lr": 1e-3,
         "seed": 0})
    detokenizer.save(tmp_path / "detokenizer")
    write_experiment(tmp_path / "results", "default", 0.25, with_history=False)
    examples = tmp_path / "results" / "default" / "eval" / "examples"
    examples.mkdir(parents=True)

    def example(i, set_name, spoken):
        return {"set": set_name, "id": f"q{i}", "question_audio": "q.wav", "question": f"where is thing {i}?",
                "answer": "paris", "text": f"paris {i}", "units": spoken, "heard": "paris", "reference_audio": "ref.wav"}

    for stage, spoken in (("stage1", [1, 2, 3]), ("stage2", [4, 5, 6, 7, 8])):
        rows = [example(i, "spoken_qa_test", spoken) for i in range(3)] + [example(9, "unseen", [])]
        (examples / f"{stage}.json").write_text(json.dumps(rows))
    out = tmp_path / "report.html"
    info = build_report(tmp_path / "results", "default", out, tmp_path / "detokenizer", tmp_path / "data")
    page = out.read_text()
    assert info["spoken_examples"] == QUESTIONS_PER_SET + 1 == page.count("<h3>spoken_qa_test: ") + 1
    assert "where is thing 0?" in page and "where is thing 2?" not in page and "<h3>unseen: where is thing 9?" in page
    clips = [sf.read(io.BytesIO(base64.b64decode(b)))[0] for b in re.findall(r'src="data:audio/wav;base64,([^"]+)"', page)]
    lengths = [len(c) for c in clips]
    # per question: its audio and the reference's (6400 samples each), then stage 1's 3 units and stage 2's 5
    assert lengths == [6400, 6400, 3 * 640, 5 * 640] * QUESTIONS_PER_SET + [6400, 6400]
    assert all(np.abs(c).max() > 0.01 for c in clips)
    assert page.count("(no speech)") == 2 and len(re.findall(r'alt="mels: q\d"', page)) == QUESTIONS_PER_SET + 1
    without = build_report(tmp_path / "results", "default", out)  # no detokenizer: no section
    assert without["spoken_examples"] == 0 and "Spoken answers" not in out.read_text()


def test_report_plays_a_24_khz_detokenizers_answers_at_24_khz_beside_16_khz_recordings(tmp_path):
    """A command detokenizer (CosyVoice 3's token2wav: 24 kHz) speaks the examples in one run; the page's wavs carry
    each clip's own rate in their headers (the recordings 16 kHz, the answers 24 kHz, the same durations)."""
    import io

    import numpy as np
    import soundfile as sf

    from fac.data.audio import SAMPLE_RATE, write_wav
    from fac.data.detokenizer import write_command_detokenizer
    from standins import TOKEN2WAV_RATE, TOKEN2WAV_SAMPLES_PER_UNIT, speaker_embedding, token2wav_command

    t = np.arange(6400) / SAMPLE_RATE
    for name in ("q.wav", "ref.wav"):
        write_wav(tmp_path / "data" / name, (0.4 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    calls = tmp_path / "calls.txt"
    write_command_detokenizer({"command": token2wav_command(tmp_path, f"--calls {calls}"), "sample_rate": TOKEN2WAV_RATE,
                               "speaker": str(speaker_embedding(tmp_path / "voice.npy")), "codebook_size": 6561},
                              tmp_path / "detokenizer")
    write_experiment(tmp_path / "results", "default", 0.25, with_history=False)
    examples = tmp_path / "results" / "default" / "eval" / "examples"
    examples.mkdir(parents=True)
    for stage, spoken in (("stage1", [1, 2, 3]), ("stage2", [4, 5, 6, 7, 8])):
        (examples / f"{stage}.json").write_text(json.dumps([
            {"set": "eval", "id": "q0", "question_audio": "q.wav", "question": "where?", "answer": "paris",
             "text": "paris", "units": spoken, "heard": "paris", "reference_audio": "ref.wav"}]))
    out = tmp_path / "report.html"
    build_report(tmp_path / "results", "default", out, tmp_path / "detokenizer", tmp_path / "data")
    page = out.read_text()
    clips = [sf.read(io.BytesIO(base64.b64decode(b))) for b in re.findall(r'src="data:audio/wav;base64,([^"]+)"', page)]
    assert [(len(c), rate) for c, rate in clips] == [(6400, SAMPLE_RATE), (6400, SAMPLE_RATE),
                                                     (3 * TOKEN2WAV_SAMPLES_PER_UNIT, TOKEN2WAV_RATE),
                                                     (5 * TOKEN2WAV_SAMPLES_PER_UNIT, TOKEN2WAV_RATE)]
    assert len(calls.read_text().splitlines()) == 2  # the folder's check, then both stages' answers in one run
    assert 'alt="mels: q0"' in page
