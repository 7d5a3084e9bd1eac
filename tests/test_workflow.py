"""The Snakemake workflow: lint, the whole default DAG, a real micro run of `data`, and partial reruns."""
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from workflow_helpers import BIN, ROOT, env, planned_jobs, snakemake, snakemake_args

DATA_RULES = {"world", "text_tokenizer", "tts", "asr_lm", "asr_filter", "noisy", "speech_tokenizer",
              "speech_tokens", "detokenizer", "manifests", "data_report"}
TRAIN_RULES = {"base_llm", "encoder", "init_model", "train_drsr", "merge", "preferences", "dpo", "evaluate", "metrics", "report"}


def test_lint_is_clean():
    proc = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=ROOT, capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stderr
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_dry_run_of_the_default_dag_plans_every_stage(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, "-n", overlays=()))
    assert set(jobs) == DATA_RULES | TRAIN_RULES | {"all"}
    assert jobs["train_drsr"] == 3  # pre-alignment, stage 1, stage 2
    assert jobs["evaluate"] == 7  # base_llm, init, prealign, stage1, merged, stage2, dpo
    assert all(jobs[rule] == 1 for rule in DATA_RULES | {"base_llm", "encoder", "init_model", "merge", "preferences", "dpo", "metrics", "report"})


def test_invalid_params_stop_before_any_job(tmp_path):
    proc = snakemake(tmp_path, "-n", config="world={n_entitis: 3}", check=False)
    assert proc.returncode != 0
    assert "world.n_entitis: unknown key" in proc.stdout + proc.stderr


def params_of(proc: subprocess.CompletedProcess, action: str) -> dict:
    """The --params slice of the shell command a dry run (-p) printed for `fac <action>`."""
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if f"fac {action} " in line)
    words = shlex.split(line)
    return json.loads(words[words.index("--params") + 1])


# What params/paper.yaml reads from disk: the Qwen3 folder (tokenizer and LLM), the Whisper folder (encoder),
# CosyVoice 3's S3 tokenizer, the user's manifests and the detokenizer's speaker file.
PAPER_COMPONENTS = ("models/Qwen3-8B", "models/whisper-large-v3", "models/speech_tokenizer_v3.onnx",
                    "data/paper/manifests", "models/cosyvoice3_speaker.pt")


def paper_components(workdir, leave_out=None):
    for path in PAPER_COMPONENTS:
        if path != leave_out:
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path).mkdir() if "." not in Path(path).name else (workdir / path).touch()


def test_paper_params_stand_alone_without_the_tiny_worlds_keys(tmp_path):
    paper_components(tmp_path)
    proc = snakemake(tmp_path, "-n", "-p", overlays=(), base="params/paper.yaml")
    base_llm = params_of(proc, "train base-llm")
    # Only paper.yaml's keys: no tiny LLM geometry, no tiny-world steps leak in from params/default.yaml.
    assert base_llm == {"model": {"geometry": "paper_8b", "speech": {"group_size": 5}},
                        "stage": {"import": "models/Qwen3-8B"}}
    tokenizer = params_of(proc, "data text-tokenizer")
    assert tokenizer == {"kind": "pretrained", "path": "models/Qwen3-8B"}
    assert params_of(proc, "data speech-tokenizer")["kind"] == "s3"
    planned = planned_jobs(proc)
    assert "manifests" in planned and not {"world", "tts", "asr_lm", "asr_filter", "noisy"} & set(planned)
    assert "fac data import-manifests" in proc.stdout + proc.stderr  # the user's data, taken in
    # Speech out: CosyVoice 3's token2wav by command, and every DRSR stage's evaluation speaks and hears with it.
    assert params_of(proc, "data command-detokenizer")["kind"] == "command" and "detokenizer" in planned
    evaluations = [line for line in (proc.stdout + proc.stderr).splitlines() if "fac eval --stage" in line]
    assert len(evaluations) == 7
    assert all(("--detokenizer" in line) == ("--stage base_llm" not in line) for line in evaluations)


@pytest.mark.parametrize("component", PAPER_COMPONENTS)
def test_a_missing_pretrained_component_stops_before_any_job_and_is_named(component, tmp_path):
    paper_components(tmp_path, leave_out=component)
    proc = snakemake(tmp_path, "-n", overlays=(), base="params/paper.yaml", check=False)
    assert proc.returncode != 0
    assert "Missing input files for rule" in proc.stdout + proc.stderr and component in proc.stdout + proc.stderr


def test_a_null_in_an_overlay_removes_the_key_before_validation(tmp_path):
    proc = snakemake(tmp_path, "-n", overlays=overlay(tmp_path, "text_tokenizer: {vocab_size: null}\n"), check=False)
    assert proc.returncode != 0
    assert "text_tokenizer.vocab_size: required key is missing" in proc.stdout + proc.stderr


def test_unknown_voice_stops_before_any_job_and_names_it(tmp_path):
    proc = snakemake(tmp_path, "-n", config="tts={test_voices: [en-klingon+m9]}", check=False)
    assert proc.returncode != 0
    assert "en-klingon+m9" in proc.stdout + proc.stderr


def test_data_target_writes_manifests_report_and_logs(micro_run):
    data = micro_run / "results/micro/data"
    report = json.loads((data / "report.json").read_text())
    assert report["asr_filter"]["total"] == report["synthesised"]["utterances"]
    assert 0 < report["kept"]["utterances"] <= report["synthesised"]["utterances"]
    counts = report["manifests"]
    assert counts["spoken_qa_train"] > 0 and counts["spoken_qa_test_unseen_voices"] > 0
    assert counts["spoken_qa_test_snr10"] > 0 and counts["paraling_train"] > 0
    assert counts["multiturn_train"] > 0 and counts["multiturn_test"] > 0
    dialogue = json.loads((data / "manifests/multiturn_test.jsonl").read_text().splitlines()[0])
    assert len(dialogue["audio"]) == 1 + dialogue["meta"]["distance"] and dialogue["meta"]["answer"]
    first = json.loads((data / "manifests/spoken_qa_test.jsonl").read_text().splitlines()[0])
    user = json.loads(first["audio"][0])
    assert (data / user["path"]).is_file()
    for rule in DATA_RULES:
        assert (micro_run / f"results/micro/data/logs/{rule}.log").is_file()
    assert "asr filter on splits ['train']: kept" in (micro_run / "results/micro/data/logs/asr_filter.log").read_text()


def test_second_run_has_nothing_to_do(micro_run):
    assert planned_jobs(snakemake(micro_run, "data", "-n")) == {}


def test_after_a_change_inside_fac_forcerun_reruns_that_rule_and_what_follows(micro_run):
    """Snakemake does not see edits inside the package; the README's rule, `--forcerun <rule>` for the rule the
    change touches, reruns it and everything downstream of it, nothing upstream and nothing beside it."""
    assert planned_jobs(snakemake(micro_run, "-n")) == {}  # the built experiment is complete
    jobs = planned_jobs(snakemake(micro_run, "-n", "--forcerun", "asr_filter"))
    assert jobs["asr_filter"] == 1 and {"manifests", "encoder", "train_drsr", "dpo", "evaluate", "report"} <= set(jobs)
    assert not {"world", "tts", "text_tokenizer", "base_llm"} & set(jobs)


def overlay(workdir, text: str) -> tuple[str, str]:
    """The micro overlay plus one more params file (nested overrides go in files: --config gives strings)."""
    path = workdir / "overlay.yaml"
    path.write_text(text)
    return ("tests/configs/micro.yaml", str(path))


def test_changing_a_synthesis_parameter_reruns_exactly_what_depends_on_it(micro_run):
    jobs = planned_jobs(snakemake(micro_run, "data", "-n", overlays=overlay(micro_run, "tts:\n  rate: [150, 180]\n")))
    assert set(jobs) == {"tts", "asr_filter", "noisy", "speech_tokenizer", "speech_tokens", "detokenizer",
                         "manifests", "data_report", "data"}


def test_changing_the_wer_threshold_keeps_synthesis(micro_run):
    jobs = planned_jobs(snakemake(micro_run, "data", "-n", overlays=overlay(micro_run, "asr:\n  max_wer: 0.4\n")))
    assert set(jobs) == {"asr_filter", "noisy", "speech_tokenizer", "speech_tokens", "detokenizer", "manifests",
                         "data_report", "data"}


def test_changing_what_a_job_asks_the_scheduler_for_reruns_nothing(micro_run):
    """resources (memory, wall time, cores, the eval GPU model) never reach what decides a rerun."""
    text = ("resources: {data: {mem_mb: 999, runtime: 5}, eval: {mem_mb: 3000, cpus: 1}, models: {mem_mb: 5000}, default: {runtime: 9}}\n"
            "stage1: {resources: {mem_mb: 123, runtime: 7, cpus: 1}}\n")
    assert planned_jobs(snakemake(micro_run, "-n", overlays=overlay(micro_run, text))) == {}


@pytest.mark.parametrize("stage", ["stage2", "dpo"])
def test_batched_evaluation_scores_exactly_as_one_question_at_a_time(micro_run, tmp_path, stage):
    """`evaluation.batch_size` changes how fast, never what: every metric of a trained stage (spoken QA, noisy and
    unseen voices, emotion, empathy, instruction following, multi-turn) equals the one-at-a-time evaluation's."""
    results = micro_run / "results/micro"
    scores = {}
    for batch in (1, 7):
        out = tmp_path / f"batch{batch}.json"
        subprocess.run([str(BIN / "fac"), "eval", "--stage", stage, "--model", str(results / f"checkpoints/{stage}"),
                        "--world", str(results / "data/world"), "--manifests", str(results / "data/manifests"),
                        "--data-root", str(results / "data"), "--out", str(out), "--batch-size", str(batch),
                        "--threads", "2"], check=True, capture_output=True, text=True, env=env(), cwd=micro_run)
        scores[batch] = {k: v for k, v in json.loads(out.read_text()).items() if not k.startswith("train_")}
    assert scores[1] == scores[7]
    assert {"spoken_qa_acc", "spoken_qa_acc_noisy", "emotion_acc", "empathy_acc", "instruction_acc",
            "multiturn_acc"} <= set(scores[1])


def test_whole_dag_writes_per_stage_metrics(micro_run):
    metrics = json.loads((micro_run / "results/micro/metrics.json").read_text())
    assert list(metrics) == ["base_llm", "init", "prealign", "stage1", "merged", "stage2", "dpo", "encoder"]
    efficiency = {"train_step_seconds", "train_tokens_per_second"}
    assert set(metrics["base_llm"]) == {"text_qa_acc"} | efficiency
    accuracies = {"spoken_qa_acc", "spoken_qa_acc_unseen_voices", "text_qa_acc", "speech_token_acc",
                  "spoken_qa_acc_noisy", "emotion_acc", "empathy_acc", "instruction_acc", "instruction_units_acc",
                  "s2s_acc", "s2s_acc_unseen_voices", "multiturn_acc", "multiturn_acc_d1", "multiturn_acc_d2"}
    lengths = {"instruct_length_ratio_quickly", "instruct_length_ratio_slowly", "instruct_duration_ratio_quickly",
               "instruct_duration_ratio_slowly", "answer_wer", "answer_wer_unseen_voices"}
    # speech to speech: the micro test sets are smaller than evaluation.speech_questions (60): every question asked
    asked = {f"s2s_questions{suffix}": sum(1 for _ in open(micro_run / f"results/micro/data/manifests/{name}.jsonl"))
             for suffix, name in (("", "spoken_qa_test"), ("_unseen_voices", "spoken_qa_test_unseen_voices"))}
    for stage in ("init", "prealign", "stage1", "merged", "stage2", "dpo"):
        # init and merged are not trained (no step time); every trained stage reports its cost
        assert set(metrics[stage]) == (accuracies | lengths | set(asked)
                                       | (set() if stage in ("init", "merged") else efficiency))
        assert all(0.0 <= metrics[stage][m] <= 1.0 for m in accuracies)
        assert all(metrics[stage][m] >= 0.0 for m in lengths)
        assert {k: metrics[stage][k] for k in asked} == asked
        assert stage in ("init", "merged") or metrics[stage]["train_step_seconds"] > 0 < metrics[stage]["train_tokens_per_second"]
        # the first 3 answers heard per test set, kept for the report: what the scorer heard, from the units kept
        examples = json.loads((micro_run / f"results/micro/eval/examples/{stage}.json").read_text())
        assert [e["set"] for e in examples] == ["spoken_qa_test"] * 3 + ["spoken_qa_test_unseen_voices"] * 3
        assert all(e["question_audio"] and e["reference_audio"] and isinstance(e["units"], list) for e in examples)
    assert json.loads((micro_run / "results/micro/eval/examples/base_llm.json").read_text()) == []
    assert set(metrics["encoder"]) == {"encoder_wer", "encoder_wer_unseen_voices"}
    assert "| stage |" in (micro_run / "results/micro/metrics.md").read_text()
    assert "<h2>Per-stage metrics</h2>" in (micro_run / "results/micro/report.html").read_text()
    merged = json.loads((micro_run / "results/micro/checkpoints/merged/merge.json").read_text())
    assert merged["alpha"] == 0.5
    # one offline wandb run per trained stage (base LLM, encoder, pre-alignment, stage 1, stage 2, DPO)
    runs = sorted((micro_run / "results/micro/wandb/wandb").glob("offline-run-*"))
    assert len(runs) == 6 and all(list(run.glob("run-*.wandb")) for run in runs), runs


def test_dpo_trains_on_pairs_of_the_four_dimensions_and_logs_rewards(micro_run):
    pairs = [json.loads(line) for line in (micro_run / "results/micro/preferences.jsonl").read_text().splitlines()]
    assert {p["dimension"] for p in pairs} == {"robustness", "instruction_following", "audio_understanding", "empathy"}
    for p in pairs:
        if p["dimension"] == "instruction_following":  # the same answer, said in the asked style or not
            assert p["system"].startswith("You are asked to generate both") and "Say the answer" in p["system"]
            assert p["chosen"]["text"] == p["rejected"]["text"] and p["chosen"]["codes"] != p["rejected"]["codes"]
        else:
            assert p["chosen"]["text"] != p["rejected"]["text"]
    history = [json.loads(line) for line in
               (micro_run / "results/micro/checkpoints/dpo/history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and {"loss", "reward_margin", "reward_accuracy"} <= set(history[0])
    # Policy == reference at the first step: every pair's loss is log 2, margins 0.
    assert abs(history[0]["loss"] - 0.693147) < 1e-4 and abs(history[0]["reward_margin"]) < 1e-4


def test_changing_merge_alpha_reruns_only_the_merge_and_what_follows(micro_run):
    proc = snakemake(micro_run, "-n", overlays=overlay(micro_run, "merge:\n  alpha: 0.7\n"))
    jobs = planned_jobs(proc)
    assert set(jobs) == {"merge", "train_drsr", "preferences", "dpo", "evaluate", "metrics", "report", "all"}
    assert jobs["train_drsr"] == 1 and jobs["evaluate"] == 3  # stage 2; merged, stage 2 and DPO re-evaluated


def dvc(*args, cwd):
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, env=env())
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_version_command_line_as_the_readme_writes_it():
    """`fac version save --experiment E --remote R` keeps its options (a REMAINDER positional once swallowed
    them); only `restore` takes arguments after --, which go to snakemake untouched."""
    from fac.cli import parse_args

    saved = parse_args(["version", "save", "--experiment", "default", "--remote", "store"])
    assert (saved.action, saved.experiment, saved.remote, saved.snakemake_args) == ("save", "default", "store", [])
    restored = parse_args(["version", "restore", "--experiment", "k1", "--", "--configfile", "params/overlays/k1.yaml"])
    assert (restored.experiment, restored.remote) == ("k1", None)
    assert restored.snakemake_args == ["--configfile", "params/overlays/k1.yaml"]
    with pytest.raises(SystemExit):
        parse_args(["version", "save", "--experiment", "default", "--", "-n"])


def test_saved_experiment_restores_in_a_fresh_clone_with_nothing_to_do(micro_run, tmp_path):
    """fac version save: the experiment's outputs in DVC, metrics and params comparable across revisions;
    a fresh clone with the remote restores them and Snakemake then has nothing to do."""
    from fac import version

    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    _git("config", "user.email", "t@example.org", cwd=repo)
    _git("config", "user.name", "t", cwd=repo)
    dvc("init", "-q", cwd=repo)
    dvc("remote", "add", "-d", "store", str(remote), cwd=repo)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / "params").mkdir()
    shutil.copy(ROOT / "params/default.yaml", repo / "params/default.yaml")
    shutil.copytree(micro_run / "results", repo / "results", symlinks=True)  # copy2: times kept; data link kept
    version.save(repo, "micro")
    _git("add", "-A", cwd=repo)
    _git("commit", "-qm", "micro experiment", cwd=repo)
    assert "state" not in dvc("ls", ".", "results/micro", cwd=repo)  # resume points stay out

    # The same experiment at a new revision: a changed metric and param show in dvc's diffs.
    metrics_path = repo / "results/micro/metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["stage2"]["text_qa_acc"] = 0.125
    metrics_path.write_text(json.dumps(metrics))
    params = (repo / "params/default.yaml").read_text().replace("seed: 1234", "seed: 4321", 1)
    (repo / "params/default.yaml").write_text(params)
    version.save(repo, "micro")
    _git("commit", "-qam", "new revision", cwd=repo)
    assert "stage2.text_qa_acc" in dvc("metrics", "diff", "HEAD~1", cwd=repo)
    assert "seed" in dvc("params", "diff", "HEAD~1", cwd=repo)
    table = dvc("exp", "show", "--no-pager", "--csv", "-A", cwd=repo).splitlines()
    columns = table[0].split(",")
    acc, seed = columns.index("stage2.text_qa_acc"), columns.index("seed")
    revisions = {row.split(",")[acc] + "/" + row.split(",")[seed] for row in table[1:]}
    assert "0.125/4321" in revisions and len(revisions) == 2  # both revisions, each with its metric and param

    clone = tmp_path / "clone"
    _git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    _git("checkout", "-q", "HEAD~1", cwd=clone)
    assert not (clone / "results/micro").exists()
    version.restore(clone, "micro", snakemake_args=snakemake_args(clone))
    assert json.loads((clone / "results/micro/metrics.json").read_text()) != metrics  # the first revision's
    assert planned_jobs(snakemake(clone, "-n")) == {}


def test_ablations_target_plans_every_alpha_and_dimension(tmp_path):
    jobs = planned_jobs(snakemake(tmp_path, "ablations", "-n", overlays=()))
    assert jobs["ablation_merge"] == 5 and jobs["ablation_stage2"] == 5  # alpha 0, 0.3, 0.5, 0.7, 1
    assert jobs["ablation_dpo"] == 4  # robustness, instruction following, audio understanding, empathy
    assert jobs["ablation_eval"] == 5 * 2 + 4


def test_alpha_ablation_ends_at_the_merge_inputs_and_dpo_per_dimension_runs(micro_run):
    extra = micro_run / "ablate.yaml"
    extra.write_text("ablations:\n  in_all: true\n  alpha: [0, 1]\n  dpo_dimensions: [empathy]\n")
    snakemake(micro_run, overlays=("tests/configs/micro.yaml", str(extra)))
    table = json.loads((micro_run / "results/micro/ablations.json").read_text())
    assert set(table) == {"alpha0/merged", "alpha0/stage2", "alpha1/merged", "alpha1/stage2", "dpo_empathy",
                          "recipe/stage2", "recipe/dpo (multi-task)"}
    per_stage = json.loads((micro_run / "results/micro/metrics.json").read_text())
    # alpha 0 is the pre-aligned model and alpha 1 stage 1, weight for weight: the same evaluation.
    for variant, stage in (("alpha0/merged", "prealign"), ("alpha1/merged", "stage1")):
        accuracies = {k: v for k, v in per_stage[stage].items() if not k.startswith("train_")}
        assert table[variant] == accuracies
    pairs = json.loads((micro_run / "results/micro/ablations/dpo_empathy/dpo/train_summary.json").read_text())["pairs"]
    assert pairs == {"empathy": 3}
    assert "Ablation: merge alpha" in (micro_run / "results/micro/report.html").read_text()


@pytest.mark.parametrize("k", [1, 6])
def test_grouping_ablation_overlay_trains_the_recipe_at_that_k(k, micro_run, tmp_path):
    """params/overlays/k{1,4,6}.yaml: the recipe as its own experiment at another grouping factor, beside the micro
    run (k = 5) in its folder: the data half does not depend on k, so the new experiment builds none of it and links
    to the micro run's. k = 1 (a 25 Hz backbone, no grouping) trains every stage to DPO and evaluates the DPO model;
    k = 6 (a k that does not divide 25 Hz) runs every rule that lays audio out by k (base LLM slots, encoder CTC,
    init, pre-alignment). Both plan the rest (the other stages' evaluation, the metrics and the report: the micro
    run at k = 5 runs those)."""
    micro_k = tmp_path / "micro_k.yaml"
    micro_k.write_text(f"experiment: micro_k{k}\nmodel:\n  speech: {{group_size: {k}}}\n")
    overlays = ("tests/configs/micro.yaml", str(micro_k))
    results = micro_run / f"results/micro_k{k}"
    plan = planned_jobs(snakemake(micro_run, "-n", overlays=overlays))
    assert not set(plan) & (set(DATA_RULES) | {"data_report"}), plan  # nothing of the data half is built again
    if k == 1:
        snakemake(micro_run, f"results/micro_k{k}/eval/dpo.json", overlays=overlays)
        metrics = json.loads((results / "eval/dpo.json").read_text())
        assert {"spoken_qa_acc", "text_qa_acc", "speech_token_acc", "instruction_acc"} <= set(metrics)
        last = "dpo"
    else:
        snakemake(micro_run, f"results/micro_k{k}/checkpoints/prealign", overlays=overlays)
        last = "prealign"
    assert set(planned_jobs(snakemake(micro_run, "-n", overlays=overlays))) >= {"evaluate", "metrics", "report"}
    config = json.loads((results / f"checkpoints/{last}/config.json").read_text())
    assert config["audio_config"]["group_size"] == k
    assert (results / "data").resolve() == (micro_run / "results/micro/data").resolve()


def test_a_training_seed_moves_every_seed_of_training_and_shares_the_data_half(micro_run, tmp_path):
    """params `training_seed`: an experiment that differs from the micro run only in it builds nothing of the data
    half (it links to the micro run's), and every job that draws at random in training gets its seed moved by 1000
    per unit: each stage's, the assembled model's initialisation and the preference pairs' draw."""
    import yaml

    seeded = tmp_path / "seeded.yaml"
    seeded.write_text("experiment: micro_seed2\ntraining_seed: 2\n")
    proc = snakemake(micro_run, "-n", overlays=("tests/configs/micro.yaml", str(seeded)))
    assert not set(planned_jobs(proc)) & (set(DATA_RULES) | {"data_report"})
    commands = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("Shell command: fac train "):
            words = shlex.split(line.split("Shell command: ", 1)[1])
            commands[words[2]] = json.loads(words[words.index("--params") + 1])
    written = yaml.safe_load((ROOT / "params/default.yaml").read_text())  # the micro overlay sets no seed
    for stage in ("base_llm", "encoder", "prealign", "stage1", "stage2", "dpo"):
        assert commands[stage.replace("_", "-")]["stage"]["seed"] == written[stage]["seed"] + 2000, stage
    assert commands["init"]["seed"] == written["seed"] + 2000
    assert commands["preferences"]["seed"] == written["seed"] + 2000
    assert commands["preferences"]["stage"]["seed"] == written["dpo"]["seed"] + 2000


def test_tts_rule_speaks_through_a_command_template(tmp_path):
    """tts.engine command in the DAG: the tts job runs the template for every clip (here espeak-ng behind it)."""
    command = "espeak-ng -v {voice} -s {rate} -p {pitch} -a {amplitude} -w {out} {text}"
    snakemake(tmp_path, "--until", "tts",
              overlays=overlay(tmp_path, f"tts:\n  engine: command\n  command: \"{command}\"\n"))
    rows = [json.loads(line) for line in (tmp_path / "results/micro/data/tts/utterances.jsonl").read_text().splitlines()]
    folders = {Path(row["path"]).parent.as_posix() for row in rows}
    assert len(rows) > 10 and len(folders) == 1 and folders.pop().startswith("tts/wavs-command-")
    assert all((tmp_path / "results/micro/data" / row["path"]).is_file() for row in rows)


def test_init_from_released_weights_starts_from_that_folder_instead_of_the_assembly(tmp_path):
    (tmp_path / "released").mkdir()
    proc = snakemake(tmp_path, "-n", "-p", overlays=overlay(tmp_path, f"init: {{released: {tmp_path / 'released'}}}\n"))
    init = next(line for line in (proc.stdout + proc.stderr).splitlines() if "fac train init " in line)
    assert params_of(proc, "train init")["init"] == {"released": str(tmp_path / "released")}
    assert "--base-llm" not in init and "--encoder" not in init
    missing = snakemake(tmp_path, "-n", overlays=overlay(tmp_path, "init: {released: no/such/folder}\n"), check=False)
    assert missing.returncode != 0 and "no/such/folder" in missing.stdout + missing.stderr


def test_the_detokenizer_rule_learns_the_assistants_voice_and_measures_held_out_answers(micro_run):
    """Rule detokenizer on the micro world: the flow learns from the assistant's answer clips and the training
    sentences spoken again in its voice (detokenizer_speech/), none with a held-out answer word, and quality.json scores
    the held-out answers with the world's ASR scorer three ways: as recorded, their own mel through Griffin-Lim, their
    units resynthesised."""
    from fac.data.detokenizer import load_detokenizer

    data = micro_run / "results/micro/data"
    quality = json.loads((data / "detokenizer/quality.json").read_text())
    rows = [json.loads(line) for line in (data / "asr/filtered.jsonl").read_text().splitlines()]
    assistant = [r for r in rows if r["split"] == "assistant"]
    held = set(quality["held_out_values"])
    assert quality["voice"] == assistant[0]["voice"] and held and held < {r["text"] for r in assistant}
    assert quality["answer_clips"] == sum(r["text"] not in held for r in assistant)
    sentences = sorted((data / "detokenizer_speech").glob("d-*.wav"))
    assert quality["sentence_clips"] == len(sentences) > 0
    assert quality["train_clips"] == quality["answer_clips"] + quality["sentence_clips"]
    # the recorded held-out answers, then each held-out value spoken again at 150 words per minute, at most 6
    assert len(list((data / "detokenizer_speech").glob("t-*-150.wav"))) == len(held)
    assert quality["test_clips"] == min(6, sum(r["text"] in held for r in assistant) + len(held))
    for key in ("wer_original", "wer_vocoder_of_original_mel", "wer_resynthesised", "mel_l1"):
        assert quality[key] >= 0.0
    detokenizer = load_detokenizer(data / "detokenizer")
    assert len(detokenizer.synthesize([1, 2, 3])) == 3 * 640 and detokenizer.config["voices"] == [quality["voice"]]


def test_infer_speaks_the_answer_through_the_experiments_detokenizer(micro_run, tmp_path):
    """`fac infer --mode s2m --speak answer.wav`: the spoken answer (its units through the experiment's
    data/detokenizer) is written, 640 samples per unit, not silent; --json names it beside text and units."""
    from fac.data.audio import read_wav

    data = micro_run / "results/micro/data"
    wav = json.loads(json.loads((data / "manifests/spoken_qa_test.jsonl").read_text().splitlines()[0])["audio"][0])["path"]
    out = tmp_path / "answer.wav"
    model = str(micro_run / "results/micro/checkpoints/stage2")
    proc = subprocess.run([str(BIN / "fac"), "infer", "--model", model, "--audio", str(data / wav), "--mode", "s2m",
                           "--max-new-tokens", "12", "--min-new-tokens", "6", "--speak", str(out), "--json"], capture_output=True, text=True,
                          env=env(), cwd=micro_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["wav"] == str(out) and result["speech_tokens"]
    samples = read_wav(out)  # read_wav refuses a silent or broken file
    assert len(samples) == 640 * len(result["speech_tokens"])
    refused = subprocess.run([str(BIN / "fac"), "infer", "--model", model, "--audio", str(data / wav), "--speak",
                              str(out)], capture_output=True, text=True, env=env(), cwd=micro_run)
    assert refused.returncode != 0 and "--speak needs --mode s2m" in refused.stderr
