"""Data source text: text conversations spoken by the TTS engine (espeak-ng here), filtered by the ASR scorer
(pocketsphinx with an LM of the conversations' own text), in shards that run as separate jobs, then taken in as
manifests by the same rule as the user's own data."""
import json

import pytest
import yaml

from standins import s3_tokenizer_file
from workflow_helpers import planned_jobs, snakemake

S2T = "You are asked to generate text tokens."
S2M = "You are asked to generate both text and speech tokens at the same time."
QA = [("what is the capital of france", "paris"), ("what colour is the sky", "blue"),
      ("how many days are in a week", "seven"), ("which animal has stripes", "the tiger"),
      ("what do you play with keys", "the piano"), ("where does the river flow", "to the sea")]


def conversation(question, answer, system=S2T):
    return {"system": system, "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    root = tmp_path_factory.mktemp("spoken")
    source = root / "conversations"
    source.mkdir()
    files = {
        "prealign": [conversation(q, a, S2M) for q, a in QA],
        "sft": [conversation(q, a, S2M if i % 2 else S2T) for i, (q, a) in enumerate(QA)]
        + [{"system": S2T, "messages": [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": "paris"},
                                        {"role": "user", "content": QA[1][0]}, {"role": "assistant", "content": "blue"}]}],
        "eval": [conversation(q, a) for q, a in QA[:3]],
        "preferences": [{"system": S2T, "messages": [{"role": "user", "content": q}],
                         "chosen": {"role": "assistant", "content": a}, "rejected": {"role": "assistant", "content": "no"}}
                        for q, a in QA[:2]],
    }
    lines = {name: [json.dumps(r) for r in records] for name, records in files.items()}
    lines["sft"].append('{"messages": [{"role": "assistant", "content": "first"}]}')  # refused: not a conversation
    for name, rows in lines.items():
        (source / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    s3 = s3_tokenizer_file(root / "s3.pt", width=64, layers=1)
    overlay = root / "text.yaml"
    overlay.write_text(yaml.safe_dump({
        "experiment": "spoken",
        "data": {"source": "text", "path": str(source), "media": None, "shards": 2},
        "tts": {"engine": "espeak-ng", "train_voices": ["en-us+m1", "en-us+f2"], "test_voices": ["en-us+m3"],
                "assistant_voice": "en-us+f1", "rate": [150, 170], "pitch": [40, 60], "amplitude": 100, "workers": 1},
        "asr": {"engine": "pocketsphinx", "lm_order": 2, "max_wer": 0.5, "workers": 1},
        "speech_tokenizer": {"path": str(s3)},
    }))
    target = "manifests"  # the rule (its outputs lie in the shared data folder results/spoken/data links to)
    plan = snakemake(root, "-n", target, overlays=(str(overlay),), base="params/paper.yaml")
    snakemake(root, target, overlays=(str(overlay),), base="params/paper.yaml")
    return {"root": root, "data": root / "results/spoken/data", "plan": planned_jobs(plan), "files": files}


def test_each_file_is_spoken_in_its_shards_as_separate_jobs(spoken):
    assert spoken["plan"]["speak"] == 2 * 4 and spoken["plan"]["spoken"] == 4  # 4 files x 2 shards, merged per file
    assert spoken["plan"]["text_corpus"] == 1 and spoken["plan"]["asr_lm"] == 1
    assert not {"world", "tts", "asr_filter"} & set(spoken["plan"])
    shards = [json.loads((spoken["data"] / f"spoken/shards/sft.{i}.json").read_text()) for i in range(2)]
    assert sum(s["conversations"] for s in shards) == len(spoken["files"]["sft"])
    assert [r["line"] for s in shards for r in s["refused"]] == [len(spoken["files"]["sft"]) + 1]


def test_spoken_conversations_are_taken_in_as_official_manifests(spoken):
    counts = json.loads((spoken["data"] / "manifests/counts.json").read_text())
    report = json.loads((spoken["data"] / "spoken/sft.report.json").read_text())
    assert report["kept"] + report["dropped_by_wer"] == len(spoken["files"]["sft"])
    assert counts["sft"] == report["kept"] > 0  # the ASR filter hears espeak-ng with the conversations' own LM
    records = [json.loads(line) for line in (spoken["data"] / "manifests/sft.jsonl").read_text().splitlines()]
    for record in records:
        audio = [json.loads(a) for a in record["audio"]]
        user = [a for a in audio if a["path"]]
        assert user and all((spoken["data"] / a["path"]).is_file() for a in user)
        spoken_reply = record["system"] == S2M
        assert (record["messages"][-1]["content"] == "<|audio_bos|><|AUDIO|><|audio_eos|>") == spoken_reply
        if spoken_reply:  # the assistant's reply spoken by its voice, its S3 tokens computed when taken in
            assert audio[-1]["token"].count("[AU") > 0 and audio[-1]["text"]
    two_turns = [r for r in records if len(r["messages"]) == 4]
    assert len(two_turns) in (0, 1) and all(len(r["audio"]) == 2 for r in two_turns)
    pairs = [json.loads(line) for line in (spoken["data"] / "manifests/preferences.pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"]["codes"] is None and p["rejected"]["text"] == "no" for p in pairs)


def test_a_rerun_speaks_nothing_again(spoken):
    clips = sorted((spoken["data"] / "spoken").glob("wavs/*.wav"))
    assert clips
    stamps = [c.stat().st_mtime_ns for c in clips]
    (spoken["data"] / "spoken/shards/sft.0.jsonl").unlink()  # a lost shard output: its job runs again
    overlay = spoken["root"] / "text.yaml"
    snakemake(spoken["root"], "manifests", overlays=(str(overlay),),
              base="params/paper.yaml")
    assert [c.stat().st_mtime_ns for c in clips] == stamps  # its clips were kept, not synthesised again
