# Helpers shared by all rules: params validation, experiment paths, and how rules call `fac`.
import json
import os
import re
import shlex
import sys

from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from fac.params import ParamsError, claim_data_folder, data_folder, drop_nulls, validate

# An overlay removes a key of its base by setting it to null; then validate before any job runs: a misspelt key or a
# wrong value stops here, naming the key.
drop_nulls(config)
try:
    validate(config, origin="config")
except ParamsError as err:
    raise WorkflowError(str(err))

EXP = config["experiment"]
RESULTS_ROOT = "results"
RESULTS = f"{RESULTS_ROOT}/{EXP}"


# The data source (params `data.source`): `world` builds the tiny world inside the DAG (rules/world.smk),
# `manifests` takes in the user's own data (rules/imported.smk), `text` speaks the user's text conversations first
# (rules/text.smk); every rule after the manifests is shared.
WORLD = config["data"]["source"] == "world"
TEXT = config["data"]["source"] == "text"
# Speech out: the world trains its detokenizer (rules/world.smk); the other sources have one when params give a
# `detokenizer` section (kind command: rules/imported.smk). Either way it is {DATA}/detokenizer, and evaluation speaks
# the DRSR stages' answers with it and hears them with the asr section's scorer (speech to speech).
SPEECH_OUT = WORLD or bool(config.get("detokenizer"))


def check_before_running():
    """Errors that would otherwise surface mid-run, after Snakemake already deleted outputs to redo."""
    if not (WORLD or TEXT):
        pass
    elif config["tts"]["engine"] == "espeak-ng":
        from fac.data.voices import check_voices

        try:
            check_voices(config["tts"]["train_voices"] + config["tts"]["test_voices"] + [config["tts"]["assistant_voice"]])
        except (ValueError, RuntimeError) as err:
            raise WorkflowError(f"params tts: {err}")
    elif config["tts"]["engine"] == "command":
        from fac.data.tts import CommandEngine  # the template's placeholders; its voices are checked by the tts job

        try:
            CommandEngine(config["tts"]["command"])
        except ValueError as err:
            raise WorkflowError(f"params {err}")
    if (config.get("detokenizer") or {}).get("kind") == "command":
        from fac.data.templates import DETOKENIZER_COMMAND, check_template  # light: fac.data.detokenizer loads torch

        try:
            check_template(config["detokenizer"]["command"], *DETOKENIZER_COMMAND)
        except ValueError as err:
            raise WorkflowError(f"params {err}")
    existing = RESULTS
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    existing = existing or "."
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise WorkflowError(f"{RESULTS}: cannot write outputs here ({existing} is not a writable folder)")


check_before_running()
# The data half: the experiment's own folder, or that of another experiment built for the same data-half params (a
# grouping-k or seed experiment reuses the recipe's data; fac.params.data_folder). results/<exp>/data links to it.
DATA, DATA_OWN = data_folder(RESULTS_ROOT, EXP, config)
DATA_LOGS = f"{DATA}/logs"
DATA_BENCH = f"{DATA}/benchmarks"
MANIFEST_COUNTS = f"{DATA}/manifests/counts.json"
WORLD_QA = f"{DATA}/world/text_qa.jsonl"  # the world's text QA: the base LLM's data and text-QA evaluation
PREFERENCE_PAIRS = f"{DATA}/manifests/preferences.pairs.jsonl"  # sources manifests, text: the user's preference pairs
SPOKEN = f"{DATA}/spoken"  # source text: the conversations spoken, in the official format
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
ENV = "../environment.yml"
ROOT = os.path.abspath(os.path.join(workflow.basedir, ".."))


def fac_command():
    """How a job runs the `fac` CLI, so that it works however Snakemake was started (from the Makefile, as
    .venv/bin/snakemake, from an activated venv, under SLURM): the interpreter that runs Snakemake, whose
    environment has `fac` installed, and not whatever `fac` the PATH holds. Under `--sdm conda` a job runs in the
    rule's conda environment (environment.yml: the pinned dependencies): its own python, with this checkout's
    package on PYTHONPATH."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return f"PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}} python -m fac"
    return f"{shlex.quote(sys.executable)} -m fac"


# Rules write `fac ...`; every job's shell defines `fac` as that command (after Snakemake's own strict-mode prefix).
# The rules' text stays the same wherever the checkout lives, so Snakemake's code trigger sees no change. Snakemake
# formats the prefix like a shell command: its literal braces are doubled.
FAC_FUNCTION = f'fac() {{ {fac_command()} "$@"; }}; '
shell.prefix(f"set -euo pipefail; {FAC_FUNCTION}".replace("{", "{{").replace("}", "}}"))


def as_json(section):
    """A params slice as one shell word: Snakemake compares it to decide reruns. Snakemake expands `{name}` in a
    params string as a wildcard, so a brace inside a JSON string value (a tts.command template's `{text}`) is written
    as its JSON escape \u007b; a structural brace is always followed by a quote or `}` and stays as it is."""
    return shlex.quote(re.sub(r"\{(?=[^\"}])", r"\\u007b", json.dumps(section, sort_keys=True)))


# What each job asks the scheduler for: Snakemake `resources:` and `threads:` from params (the local profile fits
# them into --cores; the SLURM profile turns them into sbatch requests: gpu -> --gpus, gpu_model -> --gpus=MODEL:N,
# mem_mb -> --mem, runtime -> -t, threads -> --cpus-per-task). Training stages ask in their own slice (`gpus` and
# `resources`), evaluation and preference building in `resources.eval`, data rules in `resources.data`, the jobs
# that hold whole models (init, merge) in `resources.models`, the rest (metrics, report) in `resources.default`.
# A resource change never reruns a job: the slices handed to `fac` leave `resources` out.
JOB_DEFAULTS = {"mem_mb": 2000, "runtime": 60}


def group_resources(group):
    """Resources of the rules of one group (data, eval, models, default): mem_mb and runtime, and for eval its GPUs
    (and their model, when it asks for any)."""
    section = {**JOB_DEFAULTS, **((config.get("resources") or {}).get(group) or {})}
    out = {"mem_mb": int(section["mem_mb"]), "runtime": int(section["runtime"])}
    if group == "eval":
        out["gpu"] = int(section.get("gpus", 0))
        if out["gpu"] and section.get("gpu_model"):
            out["gpu_model"] = section["gpu_model"]
    return out


def group_threads(group):
    """The cores of an evaluation job (`resources.eval.cpus`, else `threads`)."""
    return int(((config.get("resources") or {}).get(group) or {}).get("cpus", config["threads"]))


# Params `training_seed` n moves every seed of the model half by SEED_STRIDE * n (n = 0: the seeds as written): each
# stage's, the assembled model's initialisation and the preference pairs' draw. The data half's seeds stay, so that
# experiments differing only in it share one data folder (fac.params.data_folder).
SEED_STRIDE = 1000


def training_seed(seed):
    return int(seed) + SEED_STRIDE * int(config.get("training_seed", 0))


def stage_slice(name):
    """A training stage's params as `fac train` reads them: everything but the scheduler's `resources`, its `seed`
    (0, fac train's default, where it gives none) moved by `training_seed`."""
    stage = {k: v for k, v in config[name].items() if k != "resources"}
    if "seed" in stage or config.get("training_seed", 0):
        stage["seed"] = training_seed(stage.get("seed", 0))
    return stage


def stage_resources(name):
    """A training stage's request: its `gpus`, and mem_mb, runtime and (with GPUs) gpu_model from its `resources`."""
    section = {**JOB_DEFAULTS, **(config[name].get("resources") or {})}
    out = {"gpu": int(config[name].get("gpus", 0)), "mem_mb": int(section["mem_mb"]),
           "runtime": int(section["runtime"])}
    if out["gpu"] and section.get("gpu_model"):
        out["gpu_model"] = section["gpu_model"]
    return out


def stage_threads(name):
    """A training stage's cores (`resources.cpus`, else `threads`): torch threads, shared by its processes."""
    return int((config[name].get("resources") or {}).get("cpus", config["threads"]))


def drsr_resource(key):
    """One resource of rule train_drsr, whose stage is a wildcard."""
    return lambda wildcards: stage_resources(wildcards.stage).get(key, "")


# The precision a checkpoint is evaluated in (on a GPU): the stage that trained it; the assembled and the merged
# models are evaluated like the stage that trains from them.
EVAL_PRECISION_OF = {"base_llm": "base_llm", "init": "prealign", "prealign": "prealign", "stage1": "stage1",
                     "merged": "stage2", "stage2": "stage2", "dpo": "dpo"}


def eval_placement(stage):
    """`--gpus N --precision P` of an evaluation (or preference building) job: its GPUs from `resources.eval`, the
    precision of the stage that trained the checkpoint (fac.devices: bf16 without a GPU is an error)."""
    precision = config[EVAL_PRECISION_OF[stage]].get("precision", "fp32")
    return f"--gpus {group_resources('eval')['gpu']} --precision {precision}"


def eval_batch_flag(wildcards):
    """Questions per left-padded generation batch of an evaluation (params `evaluation.batch_size`)."""
    return f"--batch-size {int((config.get('evaluation') or {}).get('batch_size', 16))}"


def folder_of(key):
    """A params function: the folder holding output `key` (derived from the output, not hard-coded)."""

    def folder(wildcards, output):
        return os.path.dirname(output[key])

    return folder


def input_folder_of(key):
    """A params function: the folder holding input `key`."""

    def folder(wildcards, input):
        return os.path.dirname(input[key])

    return folder


def data_root(wildcards, output):
    """The experiment's data folder: every audio path in the JSONL indexes is relative to it."""
    return DATA


def text_tokenizer_inputs(wildcards):
    """kind train learns from the world's sentences; kind pretrained is a folder (an input, so a missing one stops
    the run before any job), whose tokens per world word are reported when there is a world."""
    section, inputs = config["text_tokenizer"], {}
    if WORLD:
        inputs.update(sentences=rules.world.output.sentences, vocabulary=rules.world.output.vocabulary)
    if section.get("kind", "train") == "pretrained":
        inputs["pretrained"] = section["path"]
    return inputs


def world_text_flag(wildcards, input):
    return f"--world {os.path.dirname(input.sentences)}" if "sentences" in input.keys() else ""


def base_llm_inputs(wildcards):
    """A base LLM trained in the DAG learns the world's text; an imported one (`import: FOLDER`) is that folder."""
    inputs = {"tokenizer": rules.text_tokenizer.output.tokenizer}
    if config["base_llm"].get("import"):
        inputs["pretrained"] = config["base_llm"]["import"]
    else:
        inputs.update(corpus=rules.world.output.corpus, text_qa=rules.world.output.text_qa)
    return inputs


def base_llm_world_flag(wildcards, input):
    return f"--world {os.path.dirname(input.corpus)}" if "corpus" in input.keys() else ""


def eval_inputs(wildcards):
    """What evaluation reads besides the checkpoint: the manifests, when there is a world its text QA, and with speech
    out (SPEECH_OUT), for a DRSR model (every stage but the base LLM), the detokenizer and the ASR scorer that hear
    its spoken answers."""
    inputs = {"manifests": MANIFEST_COUNTS}
    if WORLD:
        inputs["world"] = WORLD_QA
    if SPEECH_OUT and wildcards.stage != "base_llm":
        inputs.update(detokenizer=f"{DATA}/detokenizer", **asr_scorer_inputs(wildcards))
    return inputs


def eval_speech_flags(wildcards, input):
    """Speech to speech (fac.eval.metrics.speech_to_speech): the detokenizer, the scorer's params and LM, and
    `evaluation.speech_questions` per test set (world) or evaluation set (data.eval)."""
    if "detokenizer" not in input.keys():
        return ""
    questions = int((config.get("evaluation") or {}).get("speech_questions", 60))
    speech = {"asr": config["asr"], "questions": questions}
    return f"--detokenizer {input.detokenizer} --speech-out {as_json(speech)} {asr_lm_flag(wildcards, input)}"


def eval_data_flags(wildcards, input):
    """The world's evaluation sets (named by fac.eval.metrics), or source manifests' `data.eval` sets."""
    flags = f"--manifests {os.path.dirname(input.manifests)}"
    if WORLD:
        return f"--world {os.path.dirname(input.world)} {flags}"
    return f"{flags} --sets {' '.join(shlex.quote(n) for n in config['data']['eval'])}"


def preference_pairs(wildcards):
    """DPO's pairs: built from the stage-2 model's own answers (world), or the user's preference file (manifests,
    text)."""
    return f"{RESULTS}/preferences.jsonl" if WORLD else PREFERENCE_PAIRS


def import_source(stage):
    """A stage that imports a pretrained component (`import: FOLDER`) has that folder as an input."""
    folder = config[stage].get("import")
    return [folder] if folder else []


def asr_lm_inputs(wildcards):
    """The pocketsphinx scorer's LM is built from the text it will hear: the world's, or the conversations'."""
    if TEXT:
        return {"sentences": rules.text_corpus.output.sentences, "vocabulary": rules.text_corpus.output.vocabulary}
    return {"sentences": rules.world.output.sentences, "vocabulary": rules.world.output.vocabulary}


def conversation_names():
    """Sources manifests and text: every file the DAG reads from data.path (manifests and the preference file)."""
    return manifest_names() + ([config["data"]["preferences"]] if config["data"].get("preferences") else [])


def manifest_sources(wildcards):
    """The input of the manifests rule, the user's folder (manifests) or the spoken conversations (text)."""
    if TEXT:
        return {"spoken": [f"{SPOKEN}/{name}.jsonl" for name in conversation_names()]}
    return {"source": config["data"]["path"]}


def manifest_source_flags(wildcards, input):
    """--source and --media of the import: the spoken files' clips are relative to the data folder itself."""
    if TEXT:
        return f"--source {SPOKEN} --media {DATA}"
    media = config["data"].get("media")
    return f"--source {shlex.quote(config['data']['path'])}" + (f" --media {shlex.quote(media)}" if media else "")


def speak_params(wildcards):
    """One shard's synthesis and filter settings; the evaluation sets are spoken by the held-out voices."""
    return as_json({"tts": config["tts"], "asr": config["asr"], "seed": config["seed"],
                    "held_out": wildcards.name in config["data"]["eval"]})


def asr_scorer_inputs(wildcards):
    """pocketsphinx scores with the LM and dictionary of the text it hears (rule asr_lm); Whisper with its model."""
    if config["asr"]["engine"] == "pocketsphinx":
        return {"lm": rules.asr_lm.output.lm, "dictionary": rules.asr_lm.output.dictionary}
    return {"model": config["asr"]["model"]}


def asr_lm_flag(wildcards, input):
    return f"--lm {os.path.dirname(input.lm)}" if "lm" in input.keys() else ""


def speech_tokenizer_inputs(wildcards):
    """k-means learns its units from the filtered speech; S3 comes from its file."""
    if config["speech_tokenizer"]["kind"] == "s3":
        return {"source": config["speech_tokenizer"]["path"]}
    return {"filtered": rules.asr_filter.output.kept}


def speech_tokenizer_data_flag(wildcards, input):
    return f"--filtered {input.filtered}" if "filtered" in input.keys() else ""


def released_weights():
    """`init.released`: a Fun-Audio-Chat checkpoint folder the DRSR model starts from, or None."""
    return (config.get("init") or {}).get("released")


def init_params():
    # The adapter's starting scale is measured on clips of the pre-alignment data's first manifest.
    params = {"model": config["model"], "seed": training_seed(config["seed"]),
              "scale_manifest": next(iter(config["prealign"]["data"]))}
    if released_weights():
        params["init"] = {"released": released_weights()}
    return params


def init_sources(wildcards):
    """What init starts from: the released weights, or the base LLM, the encoder and the data for the adapter scale."""
    if released_weights():
        return {"released": released_weights()}
    return {"base_llm": rules.base_llm.output[0], "encoder": rules.encoder.output[0],
            "manifests": rules.manifests.output.counts}


def init_source_flags(wildcards, input):
    if released_weights():
        return ""  # the folder is in --params (and an input, so a missing one is named before any job)
    return f"--base-llm {input.base_llm} --encoder {input.encoder} --manifests {os.path.dirname(input.manifests)}"


def manifest_names():
    """The manifests the data half must produce: source world from the tasks, splits and noise settings; source
    manifests those every stage's `data` and `data.eval` name."""
    if not WORLD:
        stages = ["prealign", "stage1", "stage2"] + ([] if config["encoder"].get("import") else ["encoder"])
        named = [n for stage in stages for n in (config[stage].get("data") or {})] + list(config["data"]["eval"])
        return list(dict.fromkeys(named))
    names = []
    tasks = config["manifests"]["tasks"]
    splits = ["train", "test", "test_unseen_voices"]
    if "spoken_qa" in tasks:
        names += [f"spoken_qa_{s}" for s in splits]
        for split in config["noise"]["splits"]:
            if split == "train":
                names.append("spoken_qa_train_noisy")
            else:
                names += [f"spoken_qa_{split}_snr{snr:g}" for snr in config["noise"]["snr_db"]]
    if "asr" in tasks:
        names += [f"asr_{s}" for s in splits]
    if "paraling" in tasks:
        names += [f"paraling_{s}" for s in splits] + [f"emotion_{s}" for s in splits]
    if "instruct" in tasks:
        names += [f"instruct_{s}" for s in splits]
    if "multiturn" in tasks:
        names += ["multiturn_train", "multiturn_test"]  # the held-out voices speak no dialogue
    return names


def manifest_files():
    return [f"{DATA}/manifests/{name}.jsonl" for name in manifest_names()]


def data_targets():
    if not WORLD:
        return manifest_files() + [MANIFEST_COUNTS, f"{DATA}/tokenizer/tokenizer.json", f"{DATA}/speech_tokenizer"] + (
            [f"{DATA}/detokenizer"] if SPEECH_OUT else [])
    return manifest_files() + [
        f"{DATA}/report.md",
        f"{DATA}/tokenizer/tokenizer.json",
        f"{DATA}/speech_tokenizer",
        f"{DATA}/detokenizer",
    ]


# Every checkpoint the report follows, in the order of the recipe.
EVAL_STAGES = ["base_llm", "init", "prealign", "stage1", "merged", "stage2", "dpo"]


# The DRSR stages trained by rule train_drsr, each from the checkpoint before it.
DRSR_STAGES = ["prealign", "stage1", "stage2"]
DRSR_INPUT = {"prealign": "init", "stage1": "prealign", "stage2": "merged"}


def drsr_input_of(wildcards):
    return f"{RESULTS}/checkpoints/{DRSR_INPUT[wildcards.stage]}"


def drsr_params(wildcards):
    return as_json({"stage": stage_slice(wildcards.stage)})


def checkpoint_of_stage(wildcards):
    return f"{RESULTS}/checkpoints/{wildcards.stage}"


def metrics_inputs(wildcards, input):
    return " ".join(f"{stage}={path}" for stage, path in zip(EVAL_STAGES, input.stages))


def merge_per_module(wildcards):
    per_module = config["merge"].get("per_module") or {}
    if not per_module:
        return ""
    return "--per-module " + " ".join(shlex.quote(f"{k}={v}") for k, v in per_module.items())


def encoder_model_params():
    """What the encoder stage depends on: its geometry and the grouping k (its CTC scores the k-frame means the LLM
    reads); the width it projects to is the base LLM's, an input."""
    return model_slice("encoder")


def model_slice(*sections):
    """The model sections a training rule reads, the grouping k (every stage lays audio out by it) and the named
    geometry, if any (it fills what the sections leave out; resolved by fac.model.resolve_geometry)."""
    model = config["model"]
    out = {name: model[name] for name in sections if name in model}
    out["speech"] = {"group_size": model["speech"]["group_size"]}
    if "geometry" in model:
        out["geometry"] = model["geometry"]
    return out


def run_flags(wildcards):
    """Resume points and wandb runs of training jobs, under the experiment's folder."""
    return f"--experiment {EXP} --state-root {RESULTS}/state --wandb-dir {RESULTS}/wandb"


def train_targets():
    ablations = [f"{RESULTS}/ablations.json"] if config["ablations"]["in_all"] else []
    return [f"{RESULTS}/metrics.json", f"{RESULTS}/metrics.md", f"{RESULTS}/report.html", *ablations]


# Ablations inside one experiment (rules/ablations.smk).
ABL = f"{RESULTS}/ablations"
ALPHAS = [f"{float(a):g}" for a in config["ablations"]["alpha"]]
DPO_DIMENSIONS = config["ablations"]["dpo_dimensions"]


def ablation_variants():
    """name -> evaluation file of every ablation run, and the recipe's own stage 2 and multi-task DPO."""
    out = {f"alpha{a}/{stage}": f"{ABL}/alpha{a}/eval/{stage}.json" for a in ALPHAS for stage in ("merged", "stage2")}
    out.update({f"dpo_{d}": f"{ABL}/dpo_{d}/eval/dpo.json" for d in DPO_DIMENSIONS})
    out.update({"recipe/stage2": f"{RESULTS}/eval/stage2.json", "recipe/dpo (multi-task)": f"{RESULTS}/eval/dpo.json"})
    return out


def ablation_inputs(wildcards, input):
    return " ".join(shlex.quote(f"{name}={path}") for name, path in zip(ablation_variants(), input.evals))


def dpo_one_dimension(wildcards):
    weights = {d: (1.0 if d == wildcards.dimension else 0.0) for d in config["dpo"].get("dimension_weights", {})}
    weights[wildcards.dimension] = 1.0
    return as_json({"stage": {**stage_slice("dpo"), "dimension_weights": weights}})
