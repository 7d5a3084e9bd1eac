"""Parameter files: both shipped files validate, and bad ones stop with a message naming the key."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fac.params import ParamsError, load, merge, validate


def test_default_and_paper_params_validate(root):
    assert load([root / "params/default.yaml"])["experiment"] == "default"
    paper = load([root / "params/paper.yaml"])
    assert paper["stage1"]["lr"] == 1e-4 and paper["stage1"]["min_lr"] == 1e-5
    assert paper["stage2"]["lr"] == 1e-5 and paper["stage2"]["min_lr"] == 1e-6
    assert paper["merge"]["alpha"] == 0.5 and paper["dpo"]["beta"] == 0.1


def _default(root):
    return yaml.safe_load((root / "params/default.yaml").read_text())


def test_misspelt_key_is_named(root):
    cfg = _default(root)
    cfg["tts"]["voicse"] = ["en-us"]
    with pytest.raises(ParamsError, match=r"tts\.voicse: unknown key"):
        validate(cfg)


def test_wrong_type_is_named(root):
    cfg = _default(root)
    cfg["world"]["n_entities"] = "fifty"
    with pytest.raises(ParamsError, match=r"world\.n_entities: 'fifty' is not of type 'integer'"):
        validate(cfg)


def test_out_of_range_value_is_named(root):
    cfg = _default(root)
    cfg["asr"]["max_wer"] = 1.5
    with pytest.raises(ParamsError, match=r"asr\.max_wer: 1\.5 is greater than the maximum of 1"):
        validate(cfg)


def test_missing_section_is_named(root):
    cfg = _default(root)
    del cfg["noise"]
    with pytest.raises(ParamsError, match=r"noise: required key is missing"):
        validate(cfg)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["resources"]["eval"].update(gpus=2), r"resources\.eval\.gpus: 2 is greater than the maximum of 1"),
    (lambda c: c["resources"]["data"].update(gpus=1), r"resources\.data\.gpus: unknown key"),
    (lambda c: c["stage1"]["resources"].update(mem=4000), r"stage1\.resources\.mem: unknown key"),
    (lambda c: c["stage1"]["resources"].update(runtime=0), r"stage1\.resources\.runtime: 0 is less than the minimum"),
    (lambda c: c["prealign"]["resources"].update(gpu_model="'a100'"), r"prealign\.resources\.gpu_model: .* does not match"),
])
def test_a_bad_resource_request_is_named(root, change, message):
    cfg = _default(root)
    change(cfg)
    with pytest.raises(ParamsError, match=message):
        validate(cfg)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["base_llm"].pop("max_length"), r"base_llm\.packing: give base_llm\.max_length"),
    (lambda c: c["encoder"].update(packing=True), r"encoder\.packing: packing is implemented for .* not for the encoder"),
])
def test_packing_where_it_is_not_implemented_or_without_a_row_length_is_refused(root, change, message):
    cfg = _default(root)
    change(cfg)
    with pytest.raises(ParamsError, match=message):
        validate(cfg)


def test_test_voice_that_is_also_a_training_voice_is_refused(root):
    cfg = _default(root)
    cfg["tts"]["test_voices"].append(cfg["tts"]["train_voices"][0])
    with pytest.raises(ParamsError, match="held out of training"):
        validate(cfg)


def test_instruct_task_without_an_instruction_section_is_refused(root):
    cfg = _default(root)
    del cfg["instruction"]
    with pytest.raises(ParamsError, match=r"manifests\.tasks: task 'instruct' needs an `instruction` section"):
        validate(cfg)
    cfg["manifests"]["tasks"].remove("instruct")
    assert validate(cfg) is cfg


def test_multiturn_task_and_its_section_come_together(root):
    cfg = _default(root)
    del cfg["multiturn"]
    with pytest.raises(ParamsError, match=r"task 'multiturn' and a `multiturn` section .* come together"):
        validate(cfg)
    cfg["manifests"]["tasks"].remove("multiturn")
    assert validate(cfg) is cfg
    cfg["multiturn"] = {"train_per_fact": 1, "test_per_fact": 1}  # dialogues no manifest would hold
    with pytest.raises(ParamsError, match="come together"):
        validate(cfg)


def test_overlay_merges_deeply(root):
    base = _default(root)
    merged = merge(base, {"world": {"n_entities": 8}})
    assert merged["world"]["n_entities"] == 8 and merged["world"]["seed"] == base["world"]["seed"]


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad) + ": not valid YAML"):
        load([bad])


def test_cli_check_exits_2_with_the_key(root, tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("world:\n  n_entitis: 3\n")
    proc = subprocess.run([sys.executable, "-m", "fac", "params", "check", str(root / "params/default.yaml"),
                           str(overlay)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "world.n_entitis: unknown key" in proc.stderr


def test_command_tts_engine_needs_its_template(root, tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("tts: {engine: command}\n")
    with pytest.raises(ParamsError, match="tts.command: engine 'command' needs a command template"):
        load([root / "params/default.yaml", overlay])


def test_an_overlay_removes_a_key_by_setting_it_to_null(root, tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("text_tokenizer: {kind: pretrained, path: models/Qwen3-8B, vocab_size: null}\n"
                       "ablations: {in_all: null}\n")
    with pytest.raises(ParamsError, match="ablations.in_all: required key is missing"):
        load([root / "params/default.yaml", overlay])
    overlay.write_text("text_tokenizer: {kind: pretrained, path: models/Qwen3-8B, vocab_size: null}\n")
    config = load([root / "params/default.yaml", overlay])
    assert config["text_tokenizer"] == {"kind": "pretrained", "path": "models/Qwen3-8B"}


DEFAULT = yaml.safe_load((Path(__file__).parents[1] / "params/default.yaml").read_text())


def _paper(root):
    return yaml.safe_load((root / "params/paper.yaml").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(noise=DEFAULT["noise"]), r"noise: the tiny world's sections and keys are read by no rule"),
    (lambda c: c.update(text_tokenizer=DEFAULT["text_tokenizer"]), r"text_tokenizer\.kind: .* no world to train it on"),
    (lambda c: c.update(speech_tokenizer=DEFAULT["speech_tokenizer"]),
     r"speech_tokenizer\.kind: .* give s3"),
    (lambda c: c["base_llm"].pop("import"), r"base_llm\.import: .* no world"),
    (lambda c: c["stage1"].pop("data"), r"stage1\.data: name the manifests"),
    (lambda c: c["data"].pop("preferences"), r"data\.preferences: .* preference"),
    (lambda c: c["data"].pop("eval"), r"data\.eval: required key is missing"),
    (lambda c: c.update(base_llm={"import": "x", "packing": True}), r"base_llm\.packing: base_llm imports x and trains nothing"),
    (lambda c: (c["dpo"].update(packing=True), c["dpo"].pop("max_length")), r"dpo\.packing: give dpo\.max_length"),
    (lambda c: c["stage2"].pop("max_length"), r"stage2\.packing: give stage2\.max_length"),
    # speech out: a command detokenizer (no world to train a flow one), heard by Whisper; the two come together
    (lambda c: c.update(detokenizer=DEFAULT["detokenizer"]), r"detokenizer\.kind: 'flow' with data.source manifests"),
    (lambda c: c["detokenizer"].update(channels=8), r"detokenizer\.channels: read by no rule with detokenizer\.kind command"),
    (lambda c: c["detokenizer"].update(codebook_size=4096), r"detokenizer\.codebook_size: 4096, but the speech tokenizer"),
    (lambda c: c.pop("detokenizer"), r"detokenizer: data.source manifests reads asr only for speech-to-speech"),
    (lambda c: c.pop("asr"), r"asr: data.source manifests reads detokenizer only for speech-to-speech"),
    (lambda c: c.update(asr={"engine": "pocketsphinx", "lm_order": 3}), r"asr\.engine: 'pocketsphinx' .* expected whisper"),
    (lambda c: c["asr"].update(max_wer=0.3), r"asr\.max_wer: the tiny world's sections and keys are read by no rule"),
    (lambda c: c["detokenizer"].pop("speaker"), r"detokenizer\.speaker: required key is missing"),
])
def test_the_manifests_source_refuses_what_no_rule_would_read_or_could_build(root, change, message):
    cfg = _paper(root)
    change(cfg)
    with pytest.raises(ParamsError, match=message):
        validate(cfg)


def test_the_world_trains_a_flow_detokenizer_and_refuses_a_command_one(root):
    cfg = _default(root)
    cfg["detokenizer"] = {"kind": "command", "command": "t2w {units} {out} {speaker}", "speaker": "s.pt",
                          "sample_rate": 24000, "codebook_size": cfg["speech_tokenizer"]["codebook_size"]}
    with pytest.raises(ParamsError, match=r"detokenizer\.kind: 'command' with data.source world; expected 'flow'"):
        validate(cfg)
    cfg["detokenizer"] = {"kind": "flow"}
    with pytest.raises(ParamsError, match=r"detokenizer\.channels: required key is missing"):
        validate(cfg)


def test_the_world_source_requires_the_worlds_sections(root):
    cfg = _default(root)
    del cfg["noise"]
    with pytest.raises(ParamsError, match=r"noise: required key is missing"):
        validate(cfg)



DATA_HALF_CHANGES = [("world", "n_entities", 7), ("tts", "rate", [150, 160]), ("asr", "max_wer", 0.4),
                     ("noise", "snr_db", [10]), ("speech_tokenizer", "codebook_size", 64),
                     ("text_tokenizer", "vocab_size", 512), ("manifests", "tasks", ["spoken_qa"]),
                     ("paraling", "train_per_emotion", 3), ("instruction", "styles", {"slowly": 0.5}),
                     ("multiturn", "test_per_fact", 1), ("data", "source", "manifests"), (None, "seed", 7)]
MODEL_HALF_CHANGES = [("model", "speech", {"group_size": 1}), ("base_llm", "steps", 3), ("encoder", "seed", 5),
                      ("stage2", "lr", 1.0), ("dpo", "beta", 0.5), ("merge", "alpha", 0.1),
                      ("evaluation", "batch_size", 2), ("resources", "data", {"mem_mb": 1}),
                      (None, "experiment", "other"), (None, "threads", 1)]


def _changed(cfg, section, key, value):
    return merge(cfg, {section: {key: value}} if section else {key: value})


def _built(root_dir, experiment, cfg):
    """An experiment that built its own data folder for cfg (as the workflow's onstart records it)."""
    from fac.params import claim_data_folder, data_folder

    folder, own = data_folder(str(root_dir), experiment, cfg)
    assert own and folder == f"{root_dir}/{experiment}/data"
    claim_data_folder(str(root_dir), experiment, cfg, folder, own)
    return folder


@pytest.mark.parametrize("section,key,value", MODEL_HALF_CHANGES)
def test_an_experiment_differing_only_in_the_model_half_uses_the_others_data(root, tmp_path, section, key, value):
    from fac.params import claim_data_folder, data_folder

    cfg = _default(root)
    recipe = _built(tmp_path, "default", cfg)
    other = _changed(cfg, section, key, value)
    folder, own = data_folder(str(tmp_path), "k1", other)
    assert (folder, own) == (recipe, False)
    claim_data_folder(str(tmp_path), "k1", other, folder, own)
    assert (tmp_path / "k1/data").resolve() == Path(recipe).resolve()  # the experiment's data are where they were
    assert data_folder(str(tmp_path), "k1", other) == (recipe, False)  # and stay shared on the next run


@pytest.mark.parametrize("section,key,value", DATA_HALF_CHANGES)
def test_an_experiment_with_other_data_params_builds_its_own(root, tmp_path, section, key, value):
    from fac.params import data_folder

    cfg = _default(root)
    _built(tmp_path, "default", cfg)
    assert data_folder(str(tmp_path), "k1", _changed(cfg, section, key, value)) == (f"{tmp_path}/k1/data", True)


def test_an_experiment_with_its_own_data_keeps_them_when_a_data_param_changes(root, tmp_path):
    """Its data are rebuilt in place (Snakemake reruns what the change touches), never swapped for another's."""
    from fac.params import data_folder

    cfg = _default(root)
    _built(tmp_path, "default", cfg)
    _built(tmp_path, "other", _changed(cfg, "tts", "rate", [150, 160]))
    assert data_folder(str(tmp_path), "other", cfg) == (f"{tmp_path}/other/data", True)


def test_a_link_to_data_whose_params_changed_since_is_dropped(root, tmp_path):
    from fac.params import claim_data_folder, data_folder

    cfg = _default(root)
    recipe = _built(tmp_path, "default", cfg)
    claim_data_folder(str(tmp_path), "k1", cfg, recipe, False)
    _built(tmp_path, "default", _changed(cfg, "asr", "max_wer", 0.4))  # the recipe's data now for other params
    assert data_folder(str(tmp_path), "k1", cfg) == (f"{tmp_path}/k1/data", True)
    assert not (tmp_path / "k1/data").exists() and not (tmp_path / "k1/data").is_symlink()
    assert (Path(recipe) / ".fac-data-params.json").is_file()  # the other experiment's data untouched


def test_every_section_the_data_rules_read_is_in_the_data_half(root):
    """A section a data rule reads but the data half left out would let two experiments with different data share
    one folder."""
    import re

    from fac.params import MODEL_HALF_SECTIONS

    read = set()
    for name in ("world", "data", "imported", "text"):
        read |= set(re.findall(r"config(?:\[|\.get\()[\"'](\w+)[\"']", (root / f"rules/{name}.smk").read_text()))
    assert {"tts", "asr", "world", "data"} <= read  # the pattern finds what the rules read
    assert not read & MODEL_HALF_SECTIONS, read & MODEL_HALF_SECTIONS
