"""Experiment parameters: load YAML files (a base plus overlays) and validate them against the schema.

Errors name the file and the dotted key, so a misspelt key or a wrong value stops a run before any job.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import yaml

# libyaml's loader where PyYAML has it: the schema is parsed on every `snakemake` start (5x faster than pure Python).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """A params file is unreadable or does not match the schema."""


def load_schema() -> dict:
    return yaml.load(SCHEMA_PATH.read_text(), Loader=_LOADER)


def merge(base: dict, overlay: dict) -> dict:
    """Deep merge, as Snakemake merges several --configfile files: mappings merge, other values replace, and a key
    whose value is null is removed (see `drop_nulls`)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return drop_nulls(out)


def drop_nulls(config: dict) -> dict:
    """Remove, in place and at any depth, every key whose value is null: how an overlay removes a key of its base
    (`vocab_size: null`). No parameter takes null as a value."""
    for key in [k for k, v in config.items() if v is None]:
        del config[key]
    for value in config.values():
        if isinstance(value, dict):
            drop_nulls(value)
    return config


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_LOADER)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of parameters at the top level")
    return data


def _key(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # The offending key is in the message, not the path: name it exactly.
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(",".join(extra))
    elif error.validator == "required":
        parts.append(error.message.split("'")[1])
    return ".".join(parts) or "(top level)"


def validate(config: dict, origin: str = "params") -> dict:
    """Check `config` against the schema and a few cross-key rules; raise ParamsError naming the key."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            if err.validator == "additionalProperties":
                msg = f"unknown key (misspelt?); allowed: {', '.join(sorted(err.schema.get('properties', {})))}"
            elif err.validator == "required":
                msg = "required key is missing"
            else:
                msg = err.message
            lines.append(f"{origin}: {_key(err)}: {msg}")
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines))
    if (config.get("encoder") or {}).get("packing"):
        raise ParamsError(f"{origin}: encoder.packing: packing is implemented for the DRSR stages, DPO and the base "
                          "LLM trained in the DAG (prealign, stage1, stage2, dpo, base_llm), not for the encoder")
    if (config.get("base_llm") or {}).get("packing") and config["base_llm"].get("import"):
        raise ParamsError(f"{origin}: base_llm.packing: base_llm imports {config['base_llm']['import']} and trains "
                          "nothing to pack; drop packing (or import)")
    for stage in ("prealign", "stage1", "stage2", "dpo", "base_llm"):
        if (config.get(stage) or {}).get("packing") and not config[stage].get("max_length"):
            raise ParamsError(f"{origin}: {stage}.packing: give {stage}.max_length, the length of a packed row")
    source = config["data"]["source"]
    if source != "world":
        _check_own_data_source(config, origin)
        if source == "manifests":
            return config
        if not config["data"].get("shards"):
            raise ParamsError(f"{origin}: data.shards: data.source text speaks each file in this many jobs; give it")
    if source == "world":
        _check_detokenizer(config, origin)
    tts = config["tts"]
    for name in ("rate", "pitch"):
        low, high = tts[name]
        if low > high:
            raise ParamsError(f"{origin}: tts.{name}: range [{low}, {high}] has min > max")
    overlap = sorted(set(tts["train_voices"]) & set(tts["test_voices"]))
    if overlap:
        raise ParamsError(f"{origin}: tts.test_voices must be held out of training, but {overlap} "
                          "are also in tts.train_voices")
    if tts["engine"] == "command" and not tts.get("command"):
        raise ParamsError(f"{origin}: tts.command: engine 'command' needs a command template with {{text}}, {{voice}} "
                          "and {out}")
    if source == "world" and "instruct" in config["manifests"]["tasks"] and not config.get("instruction"):
        raise ParamsError(f"{origin}: manifests.tasks: task 'instruct' needs an `instruction` section "
                          "(the speaking styles to synthesise)")
    if source == "world" and ("multiturn" in config["manifests"]["tasks"]) != bool(config.get("multiturn")):
        raise ParamsError(f"{origin}: manifests.tasks: task 'multiturn' and a `multiturn` section (its dialogues' "
                          "counts) come together; give both or neither")
    return config


WORLD_SECTIONS = ("world", "tts", "paraling", "instruction", "multiturn", "asr", "noise", "manifests", "detokenizer")
# What sources text and manifests read of the world's sections: source text speaks and filters its conversations (tts
# and asr, less the keys about the world's plan); both may speak the model's answers with a command detokenizer, heard
# by the asr section's scorer (source manifests: only that, so none of the filter's keys).
OWN_SOURCE_SECTIONS = {"text": ("tts", "asr", "detokenizer"), "manifests": ("asr", "detokenizer")}
WORLD_ONLY_KEYS = {"text": {"tts": ("questions_per_train_fact", "questions_per_test_fact", "statements_per_train_fact"),
                            "asr": ("filter_splits",)},
                   "manifests": {"asr": ("filter_splits", "max_wer", "workers", "lm_order")}}
DETOKENIZER_KEYS = {"command": ("command", "speaker", "sample_rate", "codebook_size")}  # flow: the schema's others


def _check_detokenizer(config: dict, origin: str) -> None:
    """The detokenizer's kind fits the data source (flow is trained on the world; command speaks the S3 codes of the
    other sources), it holds only its kind's keys, and a command detokenizer speaks the speech tokenizer's codes."""
    section, source = config["detokenizer"], config["data"]["source"]
    kind = section["kind"]
    wanted = "flow" if source == "world" else "command"
    if kind != wanted:
        why = ("the world trains its own detokenizer on its units" if source == "world" else
               "there is no world to train a flow detokenizer on: speak the S3 codes with an external token2wav")
        raise ParamsError(f"{origin}: detokenizer.kind: {kind!r} with data.source {source}; expected {wanted!r} ({why})")
    command_keys = set(DETOKENIZER_KEYS["command"])
    others = sorted(set(section) - {"kind"} - command_keys if kind == "command" else set(section) & command_keys)
    if others:
        raise ParamsError(f"{origin}: detokenizer.{', detokenizer.'.join(others)}: read by no rule with detokenizer.kind "
                          f"{kind}; remove them")
    if kind == "command" and section["codebook_size"] != config["speech_tokenizer"]["codebook_size"]:
        raise ParamsError(f"{origin}: detokenizer.codebook_size: {section['codebook_size']}, but the speech tokenizer "
                          f"has {config['speech_tokenizer']['codebook_size']} codes; expected the same codebook")


def _check_own_data_source(config: dict, origin: str) -> dict:
    """Data sources manifests and text: no world to learn from, so the components the world trains come from
    folders, and the world's own sections and keys would be read by no rule (an overlay on the tiny world removes
    them with null). Source manifests reads `asr` only to hear a detokenizer's speech: the two come together, and
    the scorer is Whisper (no text to build pocketsphinx's LM from)."""
    source = config["data"]["source"]
    read_here = OWN_SOURCE_SECTIONS[source]
    if source == "manifests" and "asr" in config and config["asr"]["engine"] != "whisper":
        raise ParamsError(f"{origin}: asr.engine: {config['asr']['engine']!r} with data.source manifests has no text "
                          "to build its LM from; expected whisper (with asr.model)")
    unread = [name for name in WORLD_SECTIONS if name in config and name not in read_here]
    unread += [f"{section}.{key}" for section, keys in WORLD_ONLY_KEYS[source].items() for key in keys
               if key in config.get(section, {})]
    if unread:
        raise ParamsError(f"{origin}: {', '.join(unread)}: the tiny world's sections and keys are read by no rule "
                          f"with data.source {source}; remove them (an overlay sets them to null)")
    if source == "manifests" and ("asr" in config) != ("detokenizer" in config):
        given, lacking = ("asr", "detokenizer") if "asr" in config else ("detokenizer", "asr")
        raise ParamsError(f"{origin}: {lacking}: data.source manifests reads {given} only for speech-to-speech "
                          f"evaluation, which needs both a detokenizer (to speak the answers) and an asr section (to "
                          f"hear them); give {lacking}, or drop {given}")
    needs = [("text_tokenizer.kind", config["text_tokenizer"].get("kind", "train") == "pretrained", "pretrained"),
             ("speech_tokenizer.kind", config["speech_tokenizer"].get("kind") == "s3",
              "s3 (k-means units are learned from the world's clips)"),
             ("base_llm.import", bool(config["base_llm"].get("import")), "a transformers LLM folder")]
    for key, ok, what in needs:
        if not ok:
            raise ParamsError(f"{origin}: {key}: data.source {source} has no world to train it on; give {what}")
    for stage in ("prealign", "stage1", "stage2") + (() if config["encoder"].get("import") else ("encoder",)):
        if not config[stage].get("data"):
            raise ParamsError(f"{origin}: {stage}.data: name the manifests (in data.path) this stage trains on")
    if config.get("dpo") and not config["data"].get("preferences"):
        raise ParamsError(f"{origin}: data.preferences: with data.source {source} DPO trains on your preference "
                          "pairs; name their file")
    if config.get("detokenizer"):
        _check_detokenizer(config, origin)
    return config


def load(paths: list[str | Path]) -> dict:
    """Load and merge params files in order (base first, overlays after), then validate."""
    if not paths:
        raise ParamsError("no params file given")
    config: dict = {}
    for path in paths:
        config = merge(config, read_yaml(path))
    return validate(config, origin=" + ".join(str(p) for p in paths))


# The params only the model half reads (training, merge, evaluation, report, what jobs ask a scheduler for). Every
# other section (the data source, the world, the tokenizers, synthesis, ASR, noise, manifests, the seed, and any
# section added later) belongs to the data half.
MODEL_HALF_SECTIONS = frozenset({"experiment", "training_seed", "threads", "resources", "evaluation", "model", "init",
                                 "base_llm", "encoder", "prealign", "stage1", "merge", "stage2", "dpo", "ablations"})
DATA_RECORD = ".fac-data-params.json"  # in a data folder: the data-half params it is built (or being built) for
LENDER_RECORD = "data.from"  # in an experiment whose data are another's: that experiment's name


def data_half(config: dict) -> dict:
    """The params the data half's rules read: the config without the model half's sections."""
    return {key: value for key, value in config.items() if key not in MODEL_HALF_SECTIONS}


def data_record(config: dict) -> str:
    """What a data folder's DATA_RECORD holds for this config: its data half, canonical JSON."""
    import json

    return json.dumps(data_half(config), sort_keys=True, separators=(",", ":"), default=str) + "\n"


def _recorded(folder: Path) -> str | None:
    try:
        return (folder / DATA_RECORD).read_text()
    except OSError:
        return None


def data_folder(results_root: str, experiment: str, config: dict) -> tuple[str, bool]:
    """The folder an experiment's data half is built in, and whether it is the experiment's own.

    An experiment's own `results/<exp>/data` when it has one (a changed data param then reruns, in place, only what
    it touches); else the data folder of another experiment built for exactly the same data-half params (its
    DATA_RECORD), so that experiments that differ only in the model half (a grouping k, a stage's steps or seed)
    compute no data twice; else its own, new. A link `results/<exp>/data` to a folder whose record no longer
    matches (the other experiment changed its data params since) is stale: it is removed here and the experiment
    gets data of its own."""
    own = Path(results_root) / experiment / "data"
    wanted = data_record(config)
    if own.is_dir() and not own.is_symlink():
        return own.as_posix(), True
    if own.is_symlink():
        target = Path(os.path.normpath(own.parent / os.readlink(own)))
        if _recorded(target) == wanted:
            return target.as_posix(), False
        own.unlink()
    for candidate in sorted(Path(results_root).glob("*/data")):
        if candidate != own and candidate.is_dir() and not candidate.is_symlink() and _recorded(candidate) == wanted:
            return candidate.as_posix(), False
    return own.as_posix(), True


def claim_data_folder(results_root: str, experiment: str, config: dict, folder: str, own: bool) -> None:
    """When jobs are about to run: an own folder records the params it is being built for; a borrowed one is linked
    from `results/<exp>/data` (relative, replaced atomically), so the experiment's data are where they always are."""
    link = Path(results_root) / experiment / "data"
    lender = link.parent / LENDER_RECORD
    if own:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(folder) / f"{DATA_RECORD}.tmp{os.getpid()}"
        tmp.write_text(data_record(config))
        os.replace(tmp, Path(folder) / DATA_RECORD)
        lender.unlink(missing_ok=True)
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    lender.write_text(Path(folder).parent.name + "\n")  # fac.version saves that experiment with this one
    target = os.path.relpath(folder, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = link.parent / f".data.tmp{os.getpid()}"
    os.symlink(target, tmp)
    os.replace(tmp, link)
