"""Every key of params/paper.yaml is read by code (a key no code reads is a facade). The test lists each key with
the file that reads it and the text by which it does; a key added to paper.yaml without a reader listed here, or a
reader that no longer holds that text, fails. The rehearsal (test_paper_rehearsal.py) runs them all."""
import re

import yaml

from test_paper_rehearsal import leaves
from workflow_helpers import ROOT

STAGE_FIELDS = {  # trainer.StageConfig takes these from a stage's params (from_params), the trainer uses them
    "trainable": ("fac/train/trainer.py", "set_trainable(model, cfg.trainable)"),
    "lr": ("fac/train/trainer.py", "    lr: float"),
    "min_lr": ("fac/train/trainer.py", "min_lr=cfg.min_lr"),
    "schedule": ("fac/train/trainer.py", 'cfg.schedule == "cosine"'),
    "warmup_ratio": ("fac/train/trainer.py", "cfg.warmup_ratio * cfg.steps"),
    "epochs": ("fac/train/stages.py", 'stage["epochs"] * num_examples / per_step'),
    "batch_size": ("fac/train/distributed.py", '"train_micro_batch_size_per_gpu": cfg.batch_size'),
    "grad_accum": ("fac/train/distributed.py", '"gradient_accumulation_steps": cfg.grad_accum'),
    "max_length": ("fac/train/data.py", "self._drop_longer_than(max_length)"),
    "precision": ("fac/train/distributed.py", 'cfg.precision == "bf16"'),
    "backend": ("fac/train/distributed.py", 'stage.get("backend", "torch") != "deepspeed"'),
    "zero_stage": ("fac/train/distributed.py", '"zero_optimization": {"stage": cfg.zero_stage}'),
    "gpus": ("fac/train/distributed.py", 'int(stage.get("gpus", 0))'),
    "data": ("fac/train/stages.py", 'SpokenData(manifest_dir, stage.get("data", {})'),
    "packing": ("fac/train/stages.py", 'bool(stage.get("packing"))'),
    # the scheduler's request of the stage's job (rules: resources and threads of every training rule)
    "resources.cpus": ("rules/common.smk", '.get("cpus", config["threads"])'),
    "resources.mem_mb": ("rules/common.smk", '"mem_mb": int(section["mem_mb"])'),
    "resources.runtime": ("rules/common.smk", '"runtime": int(section["runtime"])'),
}

READERS = {
    "experiment": ("rules/common.smk", 'EXP = config["experiment"]'),
    "seed": ("rules/common.smk", '"seed": config["seed"]'),
    "data.source": ("rules/common.smk", 'WORLD = config["data"]["source"] == "world"'),
    "data.path": ("rules/common.smk", 'return {"source": config["data"]["path"]}'),
    "data.media": ("rules/common.smk", 'media = config["data"].get("media")'),
    "data.eval": ("rules/common.smk", "config['data']['eval']"),
    "data.preferences": ("rules/imported.smk", "config['data']['preferences']"),
    "text_tokenizer.kind": ("fac/data/text_tokenizer.py", 'params.get("kind", "train")'),
    "text_tokenizer.path": ("rules/common.smk", 'inputs["pretrained"] = section["path"]'),
    "speech_tokenizer.kind": ("fac/data/steps.py", 'if params["kind"] == "s3":'),
    "speech_tokenizer.codebook_size": ("fac/data/steps.py", 'tok.codebook_size != params["codebook_size"]'),
    "speech_tokenizer.path": ("rules/common.smk", 'config["speech_tokenizer"]["path"]'),
    "threads": ("rules/common.smk", '.get("cpus", config["threads"])'),
    **{f"resources.{group}.{key}": ("rules/common.smk", f'"{key}": int(section["{key}"])')
       for group in ("data", "eval", "models", "default") for key in ("mem_mb", "runtime")},
    "evaluation.batch_size": ("rules/common.smk", "(config.get('evaluation') or {}).get('batch_size', 16)"),
    "resources.eval.gpus": ("rules/common.smk", 'out["gpu"] = int(section.get("gpus", 0))'),
    "model.geometry": ("fac/model/builders.py", 'params.pop("geometry", None)'),
    "model.speech.group_size": ("rules/common.smk", 'model["speech"]["group_size"]'),
    "base_llm.import": ("fac/train/stages.py", 'import_llm(stage["import"], tokenizer, out_dir)'),
    "encoder.import": ("fac/train/stages.py", 'import_whisper_encoder(stage["import"], model_params, base_llm_dir'),
    "merge.alpha": ("rules/train.smk", 'alpha=config["merge"]["alpha"]'),
    "dpo.beta": ("fac/train/dpo.py", 'float(stage.get("beta", 0.1))'),
    "dpo.dimension_weights": ("fac/train/dpo.py", 'stage.get("dimension_weights")'),
    "dpo.max_length": ("fac/train/dpo.py", 'weights, stage.get("max_length"), bool(stage.get("packing")))'),
    "dpo.packing": ("fac/train/dpo.py", 'weights, stage.get("max_length"), bool(stage.get("packing")))'),
    # speech out: the folder rule detokenizer writes (its kind checked against the data source), heard by Whisper
    "detokenizer.kind": ("fac/params.py", 'kind = section["kind"]'),
    "detokenizer.command": ("fac/data/detokenizer.py", 'CommandDetokenizer.check_template(params["command"])'),
    "detokenizer.speaker": ("fac/data/detokenizer.py", 'source = Path(params["speaker"])'),
    "detokenizer.sample_rate": ("fac/data/detokenizer.py", '"sample_rate": int(params["sample_rate"])'),
    "detokenizer.codebook_size": ("fac/data/detokenizer.py", '"codebook_size": int(params["codebook_size"])'),
    "asr.engine": ("fac/data/asr.py", 'if params["engine"] == "whisper":'),
    "asr.model": ("fac/data/asr.py", 'WhisperRecognizer(params["model"], params.get("batch_size", 16))'),
    "asr.batch_size": ("fac/data/asr.py", 'WhisperRecognizer(params["model"], params.get("batch_size", 16))'),
    "ablations.in_all": ("rules/common.smk", 'config["ablations"]["in_all"]'),
    "ablations.alpha": ("rules/common.smk", 'config["ablations"]["alpha"]'),
    "ablations.dpo_dimensions": ("rules/common.smk", 'config["ablations"]["dpo_dimensions"]'),
}


def reader_of(key: str):
    if key in READERS:
        return READERS[key]
    section, _, field = key.partition(".")
    if section in ("prealign", "stage1", "stage2", "dpo") and field in STAGE_FIELDS:
        return STAGE_FIELDS[field]
    if section in ("base_llm", "encoder") and field.startswith("resources.") and field in STAGE_FIELDS:
        return STAGE_FIELDS[field]
    return None


def test_every_paper_key_has_a_reader_that_reads_it():
    keys = leaves(yaml.safe_load((ROOT / "params/paper.yaml").read_text()))
    unread = [k for k in keys if reader_of(k) is None]
    assert not unread, f"params/paper.yaml keys that no code reads (or not listed here): {unread}"
    for key in keys:
        path, text = reader_of(key)
        assert text in (ROOT / path).read_text(), f"{key}: {path} no longer reads it with {text!r}"


def test_the_listing_holds_no_key_paper_yaml_lacks():
    keys = set(leaves(yaml.safe_load((ROOT / "params/paper.yaml").read_text())))
    assert sorted(k for k in READERS if k not in keys) == []
