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
    elif step == "detokenizer":
        steps.train_detokenizer(p, args.tokenizer, args.filtered, args.tokens, args.lm, args.data_root, args.out,
                                int(args.threads))
    elif step == "command-detokenizer":
        from fac.data.detokenizer import write_command_detokenizer

        log.info("detokenizer (command): checked, %s", json.dumps(write_command_detokenizer(p, args.out)))
    elif step == "text-corpus":
        from fac.data.spoken import text_corpus

        log.info("text corpus: %s", json.dumps(text_corpus(args.source, args.names, args.out)))
    elif step == "speak":
        from fac.data.spoken import speak_shard

        speak_shard(p, args.source, int(args.shard), int(args.shards), args.lm, args.data_root, args.out, args.report)
    elif step == "merge-spoken":
        from fac.data.spoken import merge_shards

        log.info("spoken: %s", json.dumps(merge_shards(args.inputs, args.reports, args.out, args.report)))
    elif step == "import-manifests":
        from fac.data.imported import import_manifests

        summary = import_manifests(args.source, args.media, args.names, args.preferences, args.speech_tokenizer,
                                   args.data_root, args.out)
        log.info("manifests taken in: %s", json.dumps(summary))
    elif step == "report":
        steps.data_report(args.tts, args.filtered, args.asr_report, args.noisy, args.token_stats,
                          args.manifest_counts, args.tokenizer_stats, args.out, args.json, args.plot)


def _threads(args) -> None:
    """Torch uses exactly the cores Snakemake gave the job (two jobs sharing cores run far slower)."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def _run_info(args) -> dict:
    return {"experiment": args.experiment, "wandb_dir": args.wandb_dir}


# `fac train` stages that train (the one Trainer; a deepspeed stage may run in several processes under torchrun).
# `init` and `preferences` train nothing: one process each.
TRAINING_STAGES = ("base-llm", "encoder", "prealign", "stage1", "stage2", "dpo")


def _one_process_placement(what: str, gpus: int, precision: str):
    """fac.devices.resolve for a job of one process (evaluation, preferences): on CPU, or on one GPU."""
    from fac.devices import resolve

    if gpus > 1:
        raise ValueError(f"{what}: runs in one process on at most one GPU; got --gpus {gpus}")
    return resolve(what, gpus, precision)


def _train_placement(args):
    """Check, before anything heavy is loaded, that this machine can give the stage what its params ask for
    (fac.devices.resolve): a job without the GPUs it asked for fails in seconds with one line. A training stage's
    gpus and precision are its params'; `preferences` takes --gpus and --precision. Returns the placement of
    `preferences` (None for the other stages)."""
    if args.stage != "preferences" and (args.gpus is not None or args.precision is not None
                                        or args.batch_size is not None):
        raise ValueError(f"--gpus, --precision and --batch-size are for `fac train preferences`; stage {args.stage} "
                         "takes gpus, precision and batches from its params")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.stage == "preferences":
        return _one_process_placement("preferences", args.gpus or 0, args.precision or "fp32")
    if args.stage in TRAINING_STAGES:
        from fac.train.distributed import process_count

        process_count(args.params.get("stage") or {}, f"stage {args.stage.replace('-', '_')}")
    return None


def _train(args) -> None:
    from fac.train import stages
    from fac.train.distributed import threads_per_process

    args.threads = threads_per_process(args.threads)  # torchrun's processes share the job's cores
    _threads(args)
    p = args.params
    if args.stage == "base-llm":
        summary = stages.train_base_llm(p["stage"], p["model"], args.world, args.tokenizer, args.out,
                                        args.state_root, _run_info(args))
    elif args.stage == "encoder":
        summary = stages.train_encoder(p["stage"], p["model"], args.manifests, args.data_root, args.tokenizer,
                                       args.base_llm, args.out, args.state_root, _run_info(args))
    elif args.stage == "preferences":
        from fac.train.dpo import build_preferences

        summary = build_preferences(args.model, args.manifests, args.data_root, args.world, args.out,
                                    seed=p.get("seed", 0), max_per_dimension=p["stage"].get("max_pairs_per_dimension"),
                                    placement=getattr(args, "placement", None) or _train_placement(args),
                                    batch_size=args.batch_size or 16)
    elif args.stage == "dpo":
        from fac.train.dpo import train_dpo

        summary = train_dpo(p["stage"], args.model, args.pairs, args.data_root, args.out, args.state_root,
                            _run_info(args))
    elif args.stage == "init" and (p.get("init") or {}).get("released"):
        summary = stages.init_from_released(p["init"]["released"], args.tokenizer, args.speech_tokenizer, args.out)
    elif args.stage == "init":
        summary = stages.init_model(p["model"], args.base_llm, args.encoder, args.tokenizer, args.speech_tokenizer,
                                    args.manifests, args.data_root, args.out, p["seed"],
                                    p.get("scale_manifest", "asr_train"))
    else:
        summary = stages.train_drsr(args.name or args.stage, p["stage"], args.model, args.manifests,
                                    args.data_root, args.out, args.state_root, _run_info(args))
    log.info("%s done: %s", args.stage, json.dumps(summary, default=str))


def _merge(args) -> None:
    from fac.train.merge import merge_checkpoints

    per_module = dict(item.split("=", 1) for item in args.per_module or [])
    info = merge_checkpoints(args.base, args.other, args.alpha, args.out,
                             {k: float(v) for k, v in per_module.items()})
    print(json.dumps(info, indent=2))


def _eval(args) -> None:
    # Before anything heavy: a job without the GPU it asked for fails in seconds with one line.
    placement = _one_process_placement(f"evaluation of {args.stage}", args.gpus, args.precision)
    from fac.data.steps import write_json
    from fac.eval.metrics import evaluate

    _threads(args)
    if not args.world and not args.sets:
        raise SystemExit("fac eval: give --world (source world) or --sets (source manifests)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1; got {args.batch_size}")
    speech_out = None
    if args.detokenizer:
        from fac.eval.metrics import SpeechOut

        speech = json.loads(args.speech_out)
        speech_out = SpeechOut(args.detokenizer, speech["asr"], args.lm, speech["questions"])
    metrics = evaluate(args.stage, args.model, args.world, args.manifests, args.data_root, args.sets, placement,
                       args.batch_size, speech_out)
    if args.examples:  # the first answers heard, for the report to play ([] without speech out)
        write_json(speech_out.examples if speech_out is not None else [], args.examples)
    write_json(metrics, args.out)
    print(json.dumps(metrics))


def _metrics(args) -> None:
    from fac.data.steps import write_json
    from fac.eval.metrics import collect, markdown_table

    stage_files = dict(item.split("=", 1) for item in args.inputs)
    extra = dict(item.split("=", 1) for item in args.extra or [])
    table = collect(stage_files, extra)
    write_json(table, args.out)
    Path(args.table).write_text(markdown_table(table))
    print(markdown_table(table))


def _report(args) -> None:
    from fac.eval.report import build_report

    print(json.dumps(build_report(args.results, args.experiment, args.out, args.detokenizer, args.data_root)))


def _version(args) -> None:
    from fac import version

    if args.action == "save":
        print(version.save(args.repo, args.experiment, args.remote))
    else:
        version.restore(args.repo, args.experiment, args.remote, args.snakemake_args or None)


def default_detokenizer(model_dir: str) -> str:
    """The experiment's detokenizer: results/<exp>/data/detokenizer, two folders above checkpoints/<stage>."""
    return str(Path(model_dir).resolve().parent.parent / "data" / "detokenizer")


def _infer(args) -> None:
    from fac.eval.infer import answer, speak

    if args.speak and args.mode != "s2m":
        raise SystemExit("fac infer: --speak needs --mode s2m (the speech tokens it speaks)")
    result = answer(args.model, args.audio, mode=args.mode, max_new_tokens=args.max_new_tokens,
                    sample=args.sample, seed=args.seed, min_new_tokens=args.min_new_tokens)
    if args.speak:
        result["wav"] = speak(result["speech_tokens"], args.speak, args.detokenizer or default_detokenizer(args.model))
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        if args.mode == "s2m":
            print("speech tokens:", " ".join(map(str, result["speech_tokens"])))
        if args.speak:
            print("spoken answer:", result["wav"])


def _demo(args) -> None:
    from fac.eval.demo import serve

    serve(args.model, args.detokenizer or default_detokenizer(args.model), args.host, args.port, args.max_new_tokens,
          args.min_new_tokens)


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
        for opt in options:  # "--name?" is optional (given by the rule only where the component needs it)
            if opt.endswith("?"):
                sp.add_argument(opt[:-1], nargs="+" if opt[:-1] == "--names" else None)
            elif opt in ("--inputs", "--names", "--reports"):
                sp.add_argument(opt, nargs="+", required=True)
            elif opt == "--params":
                sp.add_argument(opt, type=parse_params, required=True,
                                help="inline JSON, or FILE.yaml:section")
            else:
                sp.add_argument(opt, required=True)
        sp.set_defaults(func=_data)
        return sp

    train = sub.add_parser("train", help="one training stage")
    train.add_argument("stage", choices=["base-llm", "encoder", "init", "prealign", "stage1", "stage2",
                                         "preferences", "dpo"])
    train.add_argument("--params", type=parse_params, required=True,
                       help='inline JSON {"stage": {...}, "model": {...}, "seed": N}, or FILE.yaml:section')
    for opt in ("--world", "--tokenizer", "--speech-tokenizer", "--manifests", "--data-root", "--base-llm",
                "--encoder", "--model", "--name", "--pairs"):
        train.add_argument(opt)
    train.add_argument("--out", required=True)
    train.add_argument("--state-root", default="results/state", help="where resume points live (undeclared)")
    train.add_argument("--experiment", default="default")
    train.add_argument("--wandb-dir")
    train.add_argument("--threads", type=int)
    train.add_argument("--gpus", type=int, help="preferences only: 0 (default) generate on CPU, 1 on the first "
                                                "visible GPU; training stages take gpus from their params")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                       help="preferences only: fp32 (default), or bf16/fp16 autocast on GPU")
    train.add_argument("--batch-size", type=int, help="preferences only: answers per left-padded generation batch "
                                                      "(default 16; each exactly its one-at-a-time answer)")
    train.set_defaults(func=_train)

    merge = sub.add_parser("merge", help="M = alpha * OTHER + (1 - alpha) * BASE (Core-Cocktail merge)")
    merge.add_argument("--base", required=True, help="M_0: the pre-aligned model")
    merge.add_argument("--other", required=True, help="M_stage1")
    merge.add_argument("--alpha", type=float, required=True)
    merge.add_argument("--per-module", nargs="*", metavar="PREFIX=ALPHA")
    merge.add_argument("--out", required=True)
    merge.set_defaults(func=_merge)

    ev = sub.add_parser("eval", help="evaluate one checkpoint")
    for opt in ("--stage", "--model", "--manifests", "--data-root", "--out"):
        ev.add_argument(opt, required=True)
    ev.add_argument("--world", help="the world's folder (source world: its text QA and named test sets)")
    ev.add_argument("--sets", nargs="+", help="source manifests: the evaluation manifests (params data.eval)")
    ev.add_argument("--threads", type=int)
    ev.add_argument("--gpus", type=int, default=0, help="0 (default): evaluate on CPU; 1: on the first visible GPU")
    ev.add_argument("--batch-size", type=int, default=16,
                    help="questions per left-padded generation batch (each answer exactly its batch-of-one answer)")
    ev.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="fp32 (default), or bf16/fp16 autocast on GPU")
    ev.add_argument("--detokenizer", help="speech to speech: the detokenizer folder that speaks the answers")
    ev.add_argument("--speech-out", default='{"asr": {"engine": "pocketsphinx"}, "questions": 0}',
                    help='speech to speech: JSON {"asr": the ASR scorer params, "questions": per test set, 0 all}')
    ev.add_argument("--lm", help="speech to speech: the pocketsphinx LM folder (rule asr_lm)")
    ev.add_argument("--examples", metavar="JSON", help="speech to speech: write the first answers heard of each test "
                    "set (question, text, units, transcript) here, for the report to play")
    ev.set_defaults(func=_eval)

    met = sub.add_parser("metrics", help="collect per-stage metrics into metrics.json and a table")
    met.add_argument("--inputs", nargs="+", required=True, metavar="STAGE=FILE")
    met.add_argument("--extra", nargs="*", metavar="STAGE=FILE")
    met.add_argument("--out", required=True)
    met.add_argument("--table", required=True)
    met.set_defaults(func=_metrics)

    rep = sub.add_parser("report", help="the HTML report of an experiment (with every experiment beside it)")
    rep.add_argument("--results", default="results", help="the folder holding results/<experiment>/")
    rep.add_argument("--experiment", required=True)
    rep.add_argument("--out", required=True)
    rep.add_argument("--detokenizer", help="the detokenizer that speaks the examples' answers (eval/examples/*.json)")
    rep.add_argument("--data-root", help="the experiment's data folder (the examples' question and reference audio)")
    rep.set_defaults(func=_report)

    ver = sub.add_parser("version", help="save an experiment's outputs with DVC, or restore them",
                         epilog="restore: arguments after -- go to `snakemake --touch` (default: the default profile)")
    ver.add_argument("action", choices=["save", "restore"])
    ver.add_argument("--experiment", required=True)
    ver.add_argument("--remote", help="DVC remote name (default: the repository's default remote)")
    ver.add_argument("--repo", default=".")
    ver.set_defaults(func=_version)

    infer = sub.add_parser("infer", help="answer one spoken question")
    infer.add_argument("--model", required=True)
    infer.add_argument("--audio", required=True)
    infer.add_argument("--mode", choices=["s2t", "s2m"], default="s2t")
    infer.add_argument("--json", action="store_true")
    infer.add_argument("--max-new-tokens", type=int, default=32)
    infer.add_argument("--min-new-tokens", type=int, default=0,
                       help="no end of the answer (text or speech) before this many tokens (default 0: where the model "
                       "ends it)")
    infer.add_argument("--sample", action="store_true", help="sample speech (official settings) instead of greedy")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--speak", metavar="WAV", help="write the spoken answer (--mode s2m) to this wav")
    infer.add_argument("--detokenizer", help="the detokenizer folder (default: the experiment's data/detokenizer, "
                                             "two folders above --model)")
    infer.set_defaults(func=_infer)

    demo = sub.add_parser("demo", help="a local page: ask a spoken question (upload or record), hear the answer")
    demo.add_argument("--model", required=True, help="a DRSR checkpoint folder (e.g. results/<exp>/checkpoints/stage2)")
    demo.add_argument("--detokenizer", help="the detokenizer folder (default: the experiment's data/detokenizer, "
                                            "two folders above --model)")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860; 0: any free one)")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="the longest answer, in tokens (default 64)")
    demo.add_argument("--min-new-tokens", type=int, default=0,
                      help="no end of the answer (text or speech) before this many tokens (default 0: where the model "
                      "ends it)")
    demo.set_defaults(func=_demo)

    step("world", "build the knowledge base, documents and QA pairs", "--params", "--source", "--out")
    step("text-tokenizer", "train the BPE text tokenizer, or adopt a pretrained one", "--params", "--world?", "--out")
    step("tts", "synthesise every planned utterance (espeak-ng, or a command template)", "--params", "--world", "--source",
         "--data-root", "--out")
    step("asr-lm", "build the ASR language model and dictionary from the world's text", "--params", "--world",
         "--out")
    step("asr-filter", "transcribe (pocketsphinx or Whisper), score WER, drop bad utterances", "--params", "--utterances", "--lm?",
         "--data-root", "--out", "--report")
    step("noisy", "noisy copies at the configured SNRs", "--params", "--filtered", "--data-root", "--out")
    step("speech-tokenizer", "learn 25 Hz speech units (k-means), or adopt CosyVoice's S3 tokenizer", "--params", "--filtered?",
         "--data-root", "--out")
    step("speech-tokens", "encode every utterance into speech units", "--tokenizer", "--inputs", "--data-root",
         "--out", "--stats")
    step("manifests", "write conversation manifests", "--params", "--inputs", "--tokens", "--out")
    step("detokenizer", "train the units -> speech detokenizer in the assistant's voice, measure resynthesis",
         "--params", "--tokenizer", "--filtered", "--tokens", "--lm?", "--data-root", "--out", "--threads")
    step("command-detokenizer", "speech out at paper scale: write the folder of a command detokenizer (CosyVoice 3's "
         "token2wav run once per batch from a template), checked by speaking once", "--params", "--out")
    step("text-corpus", "data source text: the conversations' sentences and words (the ASR scorer's LM)",
         "--source", "--names", "--out")
    step("speak", "data source text: speak one shard of a conversation file, ASR-filter it, write it officially",
         "--params", "--source", "--shard", "--shards", "--lm?", "--data-root", "--out", "--report")
    step("merge-spoken", "data source text: merge the shards of one conversation file", "--inputs", "--reports",
         "--out", "--report")
    step("import-manifests", "data source manifests: take in the user's official-format JSONL (refusals listed)",
         "--source", "--media?", "--names", "--preferences?", "--speech-tokenizer", "--data-root", "--out")
    step("report", "write the data report", "--tts", "--filtered", "--asr-report", "--noisy", "--token-stats",
         "--manifest-counts", "--tokenizer-stats", "--out", "--json", "--plot")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with everything after the first `--` kept apart as `snakemake_args` (only
    `fac version restore` takes any). An argparse REMAINDER positional would swallow the options that
    follow the action (`fac version save --experiment ...`), so the split happens before parsing."""
    parser = build_parser()
    passthrough = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if passthrough and not (args.command == "version" and args.action == "restore"):
        parser.error(f"arguments after -- ({' '.join(passthrough)}) are only for `fac version restore`")
    args.snakemake_args = passthrough
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not sys.stderr.isatty():
        # Progress bars into a rule's log: a line every few seconds, not hundreds of redraws.
        os.environ.setdefault("TQDM_MININTERVAL", "5")
    try:
        if args.command == "train":
            args.placement = _train_placement(args)  # in every process: here, and in each torchrun worker
            if args.stage in TRAINING_STAGES:
                from fac.train.distributed import relaunch

                # A deepspeed stage in several processes: this process becomes torchrun running this command again.
                relaunch(args.params.get("stage") or {}, sys.argv[1:] if argv is None else list(argv), args.threads,
                         f"stage {args.stage.replace('-', '_')}")
        args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as err:
        # Known bad input: one clear line naming the file or value, no traceback.
        print(f"fac {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
