"""The `fac` command line: what every Snakemake rule calls, and what a person uses by hand.

`fac params check FILE...` validates params; `fac data <step>` runs one step of the data half.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Nothing may wait on a network: a hub id costs ~26 s of retries before failing (DESIGN.md).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

log = logging.getLogger("fac")


def parse_params(value: str) -> dict:
    """--params is inline JSON (as rules pass their slice), or FILE.yaml[:section] by hand."""
    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"--params is not valid JSON: {err}") from err
    from fac.params import read_yaml

    path, _, section = value.partition(":")
    data = read_yaml(path)
    for key in filter(None, section.split(".")):
        if key not in data:
            raise argparse.ArgumentTypeError(f"{path}: no section '{section}'")
        data = data[key]
    return data


def _params_check(args) -> None:
    from fac.params import load

    config = load(args.files)
    print(f"ok: {' + '.join(args.files)} (experiment '{config['experiment']}')")


def _data(args) -> None:
    from fac.data import steps

    p = getattr(args, "params", None)
    step = args.step
    if step == "world":
        steps.build_world(p, args.source, args.out)
    elif step == "text-tokenizer":
        steps.build_text_tokenizer(p, args.world, args.out)
    elif step == "tts":
        steps.synthesize(p, args.world, args.source, args.data_root, args.out)
    elif step == "asr-lm":
        steps.build_asr_lm(p, args.world, args.out)
    elif step == "asr-filter":
        steps.asr_filter(p, args.utterances, args.lm, args.data_root, args.out, args.report)
    elif step == "noisy":
        steps.make_noisy(p, args.filtered, args.data_root, args.out)
    elif step == "speech-tokenizer":
        steps.train_speech_tokenizer(p, args.filtered, args.data_root, args.out)
    elif step == "speech-tokens":
        steps.speech_tokens(args.tokenizer, args.inputs, args.data_root, args.out, args.stats)
    elif step == "manifests":
        steps.make_manifests(p, args.inputs, args.tokens, args.out)
    elif step == "report":
        steps.data_report(args.tts, args.filtered, args.asr_report, args.noisy, args.token_stats,
                          args.manifest_counts, args.tokenizer_stats, args.out, args.json, args.plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fac", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    params = sub.add_parser("params", help="validate parameter files")
    params_sub = params.add_subparsers(dest="action", required=True)
    check = params_sub.add_parser("check", help="load FILE [OVERLAY...] and validate against the schema")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=_params_check)

    data = sub.add_parser("data", help="one step of the data half of the DAG")
    data_sub = data.add_subparsers(dest="step", required=True)

    def step(name: str, help_text: str, *options: str) -> argparse.ArgumentParser:
        sp = data_sub.add_parser(name, help=help_text)
        for opt in options:
            if opt == "--inputs":
                sp.add_argument(opt, nargs="+", required=True)
            elif opt == "--params":
                sp.add_argument(opt, type=parse_params, required=True,
                                help="inline JSON, or FILE.yaml:section")
            else:
                sp.add_argument(opt, required=True)
        sp.set_defaults(func=_data)
        return sp

    step("world", "build the knowledge base, documents and QA pairs", "--params", "--source", "--out")
    step("text-tokenizer", "train the BPE text tokenizer", "--params", "--world", "--out")
    step("tts", "synthesise every planned utterance with espeak-ng", "--params", "--world", "--source",
         "--data-root", "--out")
    step("asr-lm", "build the ASR language model and dictionary from the world's text", "--params", "--world",
         "--out")
    step("asr-filter", "transcribe, score WER, drop bad utterances", "--params", "--utterances", "--lm",
         "--data-root", "--out", "--report")
    step("noisy", "noisy copies at the configured SNRs", "--params", "--filtered", "--data-root", "--out")
    step("speech-tokenizer", "learn 25 Hz speech units (k-means)", "--params", "--filtered", "--data-root",
         "--out")
    step("speech-tokens", "encode every utterance into speech units", "--tokenizer", "--inputs", "--data-root",
         "--out", "--stats")
    step("manifests", "write conversation manifests", "--params", "--inputs", "--tokens", "--out")
    step("report", "write the data report", "--tts", "--filtered", "--asr-report", "--noisy", "--token-stats",
         "--manifest-counts", "--tokenizer-stats", "--out", "--json", "--plot")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not sys.stderr.isatty():
        # Progress bars into a rule's log: a line every few seconds, not hundreds of redraws.
        os.environ.setdefault("TQDM_MININTERVAL", "5")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        # Known bad input: one clear line naming the file or value, no traceback.
        print(f"fac {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
