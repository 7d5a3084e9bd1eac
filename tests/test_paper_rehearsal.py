"""The paper recipe rehearsed end to end: params/paper.yaml as it stands, plus an overlay that changes only sizes,
counts, paths and the CPU choice (`gpus: 0` with `precision: fp32`), over tiny random stand-ins in the real formats
(a Qwen3 folder with Qwen's vocabulary size and special ids and no audio tokens, a Whisper folder with 128 mel bins,
an S3 tokenizer in the official ONNX layout, data in the official SFT format, a stand-in CosyVoice 3 install under
the shipped token2wav script, speaking 24 kHz with a 192-dim speaker embedding). Every rule of the DAG runs, the DeepSpeed stages as two CPU processes under gloo;
every DRSR stage's answers are spoken by the detokenizer and heard by the Whisper stand-in."""
import json
import re
import subprocess

import pytest
import yaml
from safetensors.torch import load_file

from standins import (TOKEN2WAV_RATE, cosyvoice3_command, official_dataset, qwen3_llm, qwen_tokenizer,
                      released_checkpoint, s3_tokenizer_file, s3_tokenizer_onnx, speaker_embedding, whisper_asr)
from workflow_helpers import BIN, LOCAL_PROFILE, ROOT, env

PAPER = yaml.safe_load((ROOT / "params/paper.yaml").read_text())
DS_STAGES = ("prealign", "stage1", "stage2", "dpo")
SMALL_SRH = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 8, "intermediate_size": 32}


# Keys whose value is a mapping of user names to weights: one leaf each (the names are data, not params keys).
MAPPINGS = re.compile(r"(^|\.)(data|dimension_weights)$")


def leaves(tree: dict, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf (a stage's `data` mixture and `dimension_weights` are one leaf each)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not (MAPPINGS.search(name) and name not in ("data", "resources.data")):
            out.update(leaves(value, f"{name}."))
        else:
            out[name] = value
    return out


def sizes_only(overlay: dict) -> None:
    """The overlay may change sizes, counts and paths (and choose the CPU: gpus 0, precision fp32, evaluation's
    gpus 0), never a component, an engine or a stage."""
    # Paths also: the ASR scorer's Whisper folder (asr.model), the speaker file and the detokenizer's command line,
    # which is where your CosyVoice install lives (the rehearsal runs the shipped workflow/scripts/cosyvoice3_token2wav.py
    # over a stand-in install; the placeholders are paper.yaml's, and the rule checks them).
    allowed_leaf = re.compile(r"(^experiment$|path$|media$|import$|^threads$|^model\.srh\.|batch_size$|grad_accum$|"
                              r"max_length$|epochs$|^\w+\.gpus$|^resources\.eval\.gpus$|^\w+\.precision$|^\w+\.processes$|"
                              r"^asr\.model$|^detokenizer\.speaker$|^detokenizer\.command$)")
    for key, value in leaves(overlay).items():
        assert allowed_leaf.search(key), f"the rehearsal overlay changes {key}, which is not a size, count or path"
        if key.endswith(".gpus"):
            assert value == 0
        if key.endswith(".precision"):  # bf16 needs a GPU: the CPU choice is fp32, with gpus 0
            assert value == "fp32" and leaves(overlay).get(key.replace(".precision", ".gpus")) == 0


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    qwen = root / "models/Qwen3-8B"
    qwen_tokenizer(qwen)
    qwen3_llm(qwen, hidden_size=32, layers=1)
    whisper = whisper_asr(root / "models/whisper-large-v3")
    # The S3 tokenizer as paper.yaml names it: speech_tokenizer_v3.onnx, in the official export's layout.
    s3 = s3_tokenizer_onnx(root / "models/speech_tokenizer_v3.onnx", s3_tokenizer_file(root / "s3_weights.pt"))
    data = official_dataset(root / "data/paper")
    speaker = speaker_embedding(root / "models/cosyvoice3_speaker.pt")
    overlay = {
        "experiment": "rehearsal",
        "data": {"path": str(data["folder"] / "manifests"), "media": str(data["folder"] / "media")},
        "text_tokenizer": {"path": str(qwen)},
        "speech_tokenizer": {"path": str(s3)},
        "threads": 2,
        "resources": {"eval": {"gpus": 0}},
        "model": {"srh": SMALL_SRH},
        "base_llm": {"import": str(qwen)},
        "encoder": {"import": str(whisper)},
        "asr": {"model": str(whisper)},
        "detokenizer": {"command": cosyvoice3_command(root / "cosyvoice"), "speaker": str(speaker)},
        **{stage: {"gpus": 0, "precision": "fp32", "processes": 2, "batch_size": 1, "max_length": 512}
           for stage in DS_STAGES},
    }
    sizes_only(overlay)
    overlay_file = root / "sizes.yaml"
    overlay_file.write_text(yaml.safe_dump(overlay))
    work = root / "work"
    work.mkdir()
    # --configfile takes every word after it: targets and flags go first.
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "workflow/Snakefile"), "--directory", str(work),
           "--profile", str(LOCAL_PROFILE), "--cores", "2",
           "--configfile", str(ROOT / "params/paper.yaml"), str(overlay_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=work)
    assert proc.returncode == 0, f"paper rehearsal failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {"root": root, "work": work, "results": work / "results/rehearsal", "log": proc.stderr, "qwen": qwen,
            "whisper": whisper, "data": data, "overlay": overlay_file, "cmd": cmd}


EXPECTED_RULES = {"text_tokenizer", "speech_tokenizer", "manifests", "detokenizer", "base_llm", "encoder", "init_model",
                  "train_drsr", "merge", "dpo", "evaluate", "metrics", "report", "all"}


def test_every_rule_of_the_paper_dag_ran(rehearsal):
    ran = set(re.findall(r"^(?:local)?rule (\w+):", rehearsal["log"], re.M))
    assert ran == EXPECTED_RULES
    again = subprocess.run([*rehearsal["cmd"][:1], "-n", *rehearsal["cmd"][1:]], capture_output=True, text=True, env=env(), cwd=rehearsal["work"])
    assert "Nothing to be done" in again.stdout + again.stderr
    for stage in DS_STAGES:  # paper.yaml asks for DeepSpeed: two CPU processes under torchrun and gloo
        log = (rehearsal["results"] / f"logs/train/{stage}.log").read_text()
        assert "deepspeed stage: 2 processes" in log, stage


def test_the_metrics_table_has_every_stage(rehearsal):
    table = json.loads((rehearsal["results"] / "metrics.json").read_text())
    assert list(table)[:7] == ["base_llm", "init", "prealign", "stage1", "merged", "stage2", "dpo"]
    assert 0.0 <= table["base_llm"]["text_answer_match_eval"] <= 1.0  # the eval set's clips have transcripts
    for stage in ("init", "prealign", "stage1", "merged", "stage2", "dpo"):
        assert 0.0 <= table[stage]["answer_match_eval"] <= 1.0
        assert 0.0 <= table[stage]["speech_token_acc_eval"] <= 1.0
        assert "spoken_qa_acc" in table[stage]["skipped"]  # said, not silently absent
    markdown = (rehearsal["results"] / "metrics.md").read_text()
    assert all(f"| {stage} |" in markdown for stage in table)
    assert (rehearsal["results"] / "report.html").stat().st_size > 0


def test_every_drsr_stage_is_scored_speech_to_speech_through_the_command_detokenizer(rehearsal):
    """The eval set's spoken references (2 of its 4 records) answered in speech by every DRSR stage, spoken by the
    shipped token2wav script (a stand-in CosyVoice 3 under it) at 24 kHz and heard by Whisper (at 16 kHz): s2s_acc_eval and answer_wer_eval; the base LLM
    speaks nothing. The detokenizer folder is self-contained and was checked by speaking once."""
    folder = rehearsal["results"] / "data/detokenizer"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "fac_command_detokenizer" and config["sample_rate"] == TOKEN2WAV_RATE
    assert config["codebook_size"] == 6561
    assert (folder / config["speaker"]).read_bytes() == (rehearsal["root"] / "models/cosyvoice3_speaker.pt").read_bytes()
    assert json.loads((folder / "check.json").read_text())["samples"] == 25 * 960
    table = json.loads((rehearsal["results"] / "metrics.json").read_text())
    assert not any(key.startswith(("s2s_", "answer_wer")) for key in table["base_llm"])
    for stage in ("init", "prealign", "stage1", "merged", "stage2", "dpo"):
        assert 0.0 <= table[stage]["s2s_acc_eval"] <= 1.0, stage
        assert table[stage]["answer_wer_eval"] >= 0.0, stage
        assert table[stage]["s2s_questions_eval"] == 2, stage
        examples = json.loads((rehearsal["results"] / f"eval/examples/{stage}.json").read_text())
        assert [e["answer"] for e in examples] == ["paris", "seven"]  # no meta.answer: the reference reply's text
    report = (rehearsal["results"] / "report.html").read_text()
    assert "Spoken answers" in report and report.count("spoken answer") >= 2


def test_imported_tensors_are_in_the_checkpoints_bit_for_bit(rehearsal):
    """Qwen3's tensors reach the DRSR model unchanged (its vocabulary holds the audio tokens: no resize), and stay
    so through pre-alignment, which freezes the LLM; Whisper's encoder reaches init unchanged."""
    qwen = load_file(str(rehearsal["qwen"] / "model.safetensors"))
    checkpoints = rehearsal["results"] / "checkpoints"
    assert load_file(str(checkpoints / "base_llm/model.safetensors")).keys() == qwen.keys()
    for stage in ("init", "prealign"):
        state = load_file(str(checkpoints / stage / "model.safetensors"))
        llm = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
        assert llm.keys() >= set(qwen) - {"lm_head.weight"} or llm.keys() >= set(qwen)
        for name, tensor in qwen.items():
            assert name in llm and llm[name].dtype == tensor.dtype and bool((llm[name] == tensor).all()), (stage, name)
    from fac.train.stages import whisper_to_tower
    from transformers import WhisperModel

    tower = whisper_to_tower(WhisperModel.from_pretrained(rehearsal["whisper"]).encoder.state_dict())
    init = load_file(str(checkpoints / "init/model.safetensors"))
    for name, tensor in tower.items():
        assert bool((init[f"continuous_audio_tower.{name}"] == tensor).all()), name
    stage1 = load_file(str(checkpoints / "stage1/model.safetensors"))
    assert any(not bool((stage1[f"language_model.{n}"] == t).all()) for n, t in qwen.items()), "stage 1 trains the LLM"


def test_the_users_data_is_taken_in_whole_or_refused_with_file_line_and_reason(rehearsal):
    manifests = rehearsal["results"] / "data/manifests"
    counts = json.loads((manifests / "counts.json").read_text())
    assert {k: counts[k] for k in rehearsal["data"]["kept"]} == rehearsal["data"]["kept"]
    refusals = [json.loads(line) for line in (manifests / "refusals.jsonl").read_text().splitlines()]
    assert [(r["file"].rsplit("/", 1)[-1], r["line"]) for r in refusals] == rehearsal["data"]["refused"]
    assert all(r["reason"] for r in refusals)
    log = (rehearsal["results"] / "data/logs/manifests.log").read_text()
    assert "sft.jsonl:11: refused: audio entry 0" in log and "no_such_clip.wav" in log
    two_turns = [json.loads(line) for line in (manifests / "sft.jsonl").read_text().splitlines()
                 if "two-turns" in line]
    assert len(two_turns) == 1 and len(two_turns[0]["messages"]) == 4 and len(two_turns[0]["audio"]) == 3
    assistant = json.loads(two_turns[0]["audio"][2])
    assert assistant["token"].count("[AU") > 0  # computed by the S3 tokenizer from its wav
    pairs = [json.loads(line) for line in (manifests / "preferences.pairs.jsonl").read_text().splitlines()]
    assert sorted(p["dimension"] for p in pairs) == ["general", "general", "robustness", "robustness"]


def test_the_released_weights_start_the_model_bit_for_bit(rehearsal):
    """`init.released`: the DRSR model starts from a released-layout checkpoint (sharded, with an index)."""
    released = released_checkpoint(rehearsal["root"] / "models/Fun-Audio-Chat-8B")
    overlay = rehearsal["root"] / "released.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": "rehearsal_released", "init": {"released": str(released)}}))
    target = "results/rehearsal_released/checkpoints/init"
    cmd = rehearsal["cmd"]
    proc = subprocess.run([cmd[0], target, *cmd[1:], str(overlay)], capture_output=True, text=True, env=env(),
                          cwd=rehearsal["work"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    index = json.loads((released / "model.safetensors.index.json").read_text())
    theirs = {}
    for shard in sorted(set(index["weight_map"].values())):
        theirs.update(load_file(str(released / shard)))
    ours = load_file(str(rehearsal["work"] / target / "model.safetensors"))
    assert set(theirs) <= set(ours)
    assert all(bool((ours[k] == v).all()) for k, v in theirs.items())
