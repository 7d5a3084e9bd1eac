"""SLURM for real: a one-node cluster from Debian's packages (workflow/cluster/local-slurm.sh: slurmctld, slurmd,
slurmdbd on MariaDB, munge), brought up by the session (tests/slurm_cluster.py), runs the micro world's data half,
the base LLM stage and its evaluation through `--profile workflow/profiles/slurm`, one sbatch job per rule. The jobs
are checked in SLURM's accounting, their requests against params, and their outputs against the local run of the
same DAG (micro_run). A stage that asks for GPUs is submitted with them (the node advertises two as a count) and,
finding no CUDA in its job, stops with an error that names it. The paper's dry run through the same profile shows
every stage's request.
"""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BUILT_DIGESTS
from slurm_cluster import PARTITION, PROFILE, RUN, Unavailable, slurm_env, slurm_snakemake
from workflow_helpers import BIN, ROOT, digests, env

# The rules of the micro world's data target, then the stage and its evaluation: one sbatch job each.
DATA_RULES = {"world", "tts", "text_tokenizer", "asr_lm", "asr_filter", "noisy", "speech_tokenizer", "speech_tokens",
              "detokenizer", "manifests", "data_report"}


def submissions(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    """rule (with its wildcards: `evaluate:base_llm`) -> {'call': the sbatch command, 'jobid': SLURM's id}, from the
    plugin's log (its calls name the job by --comment, its submissions by the SLURM log's folder)."""
    text = proc.stdout + proc.stderr
    calls = {}
    for call in re.findall(r"sbatch call: (sbatch .*?) --wrap=", text):
        rule = re.search(r"--comment (\S+)", call).group(1)
        calls[rule.removeprefix("rule_").replace("_wildcards_", ":")] = call
    ids = {}
    for jobid, folder in re.findall(r"has been submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/(\S+)/\d+\.log",
                                    text):
        rule, _, wildcards = folder.removeprefix("rule_").partition("/")
        ids[f"{rule}:{wildcards}" if wildcards else rule] = jobid
    assert sorted(calls) == sorted(ids), (sorted(calls), sorted(ids), text[-3000:])
    return {rule: {"call": calls[rule], "jobid": ids[rule]} for rule in calls}


def accounting(jobids: list[str]) -> dict[str, dict]:
    """SLURM's accounting of jobs (sacct, kept by slurmdbd): id -> comment, state, requested TRES."""
    proc = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(jobids), "-o", "JobID,Comment,State,ReqTRES"],
                          capture_output=True, text=True, env=slurm_env(), check=True)
    rows = [line.split("|") for line in proc.stdout.splitlines() if line]
    return {r[0]: {"comment": r[1], "state": r[2], "tres": r[3]} for r in rows}


@pytest.fixture(scope="module")
def slurm_run():
    """The run through SLURM (slurm_cluster.RUN: started in the background by micro_run, or here)."""
    try:
        workdir, proc = RUN.result()
    except Unavailable as why:
        pytest.skip(str(why))
    assert proc.returncode == 0, f"snakemake through SLURM failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return workdir, proc


def test_every_job_went_through_sbatch_and_slurm_accounted_it(slurm_run):
    _, proc = slurm_run
    submitted = submissions(proc)
    assert set(submitted) == DATA_RULES | {"base_llm", "evaluate:base_llm"}
    jobs = accounting([s["jobid"] for s in submitted.values()])
    assert sorted(jobs) == sorted(s["jobid"] for s in submitted.values())
    for rule, sub in submitted.items():
        job = jobs[sub["jobid"]]
        assert job["state"] == "COMPLETED", (rule, job)
        assert job["comment"].startswith(f"rule_{rule.split(':')[0]}"), (rule, job)


def test_each_request_comes_from_params_and_the_profiles_overrides(slurm_run):
    submitted = submissions(slurm_run[1])
    # tests/configs/micro.yaml over params/default.yaml: stages ask 4000 MB for 60 min with `threads` (2) cores;
    # data rules 2000 MB for 30 min with their own workers (tts, asr_filter) or one core; --set-resources wins.
    stage, evaluation, tts, world = (submitted[r]["call"] for r in ("base_llm", "evaluate:base_llm", "tts", "world"))
    assert re.search(r" -t 60 --mem 4000 .*--cpus-per-task=2", stage), stage
    assert re.search(r" -t 7 --mem 2000 .*--cpus-per-task=2", evaluation), evaluation
    assert re.search(r" -t 30 --mem 2000 .*--cpus-per-task=2", tts), tts
    assert re.search(r" -t 30 --mem 2000 .*--cpus-per-task=1", world), world
    assert all(f"-p {PARTITION}" in s["call"] and "--gpus" not in s["call"] for s in submitted.values())


def test_outputs_equal_the_local_runs(slurm_run, micro_run):
    workdir, _ = slurm_run
    ours, local = digests(workdir / "results" / "micro"), json.loads((micro_run / BUILT_DIGESTS).read_text())
    assert "data/manifests/counts.json" in ours and "eval/base_llm.json" in ours
    assert any(f.startswith("checkpoints/base_llm/") and f.endswith(".safetensors") for f in ours)
    differ = [f for f, digest in ours.items() if local.get(f) != digest]
    assert differ == [], f"outputs of the SLURM run that differ from the local run's: {differ}"


def test_a_gpu_stage_is_submitted_with_its_gpus_and_stops_without_cuda(slurm_run, tmp_path):
    """The node advertises GPUs it does not have: the request is accepted and accounted, and the stage, finding no
    CUDA device in its job, fails at once with an error naming it instead of training on the CPU."""
    workdir = tmp_path / "gpu"
    shutil.copytree(slurm_run[0], workdir, symlinks=True)
    overlay = tmp_path / "gpus.yaml"
    overlay.write_text("base_llm: {gpus: 2, backend: deepspeed}\n")
    proc = slurm_snakemake(workdir, "results/micro/checkpoints/base_llm",
                           overlays=("tests/configs/micro.yaml", str(overlay)))
    assert proc.returncode != 0
    submitted = submissions(proc)
    assert list(submitted) == ["base_llm"], submitted
    assert "--gpus=2" in submitted["base_llm"]["call"]
    job = accounting([submitted["base_llm"]["jobid"]])[submitted["base_llm"]["jobid"]]
    assert job["state"] == "FAILED" and "gres/gpu=2" in job["tres"], job
    log = (workdir / "results/micro/logs/train/base_llm.log").read_text()
    assert "fac train: error: stage base_llm: gpus: 2 asks for CUDA" in log and "CUDA_VISIBLE_DEVICES=" in log, log[-2000:]
    assert not (workdir / "results/micro/checkpoints/base_llm").exists()


def test_the_paper_dry_run_through_the_slurm_profile_shows_every_stages_gpus(tmp_path):
    """params/paper.yaml through workflow/profiles/slurm: every DeepSpeed stage asks for its 8 GPUs and its node's
    cores and memory, every evaluation for one GPU; no job runs (a dry run needs no cluster)."""
    for folder in ("models/Qwen3-8B", "models/whisper-large-v3", "data/paper/manifests"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "models/speech_tokenizer_v3.onnx").write_bytes(b"")
    (tmp_path / "models/cosyvoice3_speaker.pt").write_bytes(b"")  # the detokenizer's speaker file
    proc = subprocess.run([str(BIN / "snakemake"), "--profile", str(PROFILE), "-n", "-s", str(ROOT / "workflow/Snakefile"),
                           "--directory", str(tmp_path), "--configfile", str(ROOT / "params/paper.yaml")],
                          capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = {}
    for block in re.split(r"\n(?=rule \w+:)", proc.stdout):
        head = re.match(r"rule (\w+):", block)
        resources = re.search(r"resources: (.*)", block)
        if head and resources:
            stage = re.search(r"wildcards: stage=(\w+)", block)
            name = head.group(1) + (f":{stage.group(1)}" if stage else "")
            threads = re.search(r"threads: (\d+)", block)
            jobs[name] = dict(kv.split("=", 1) for kv in resources.group(1).split(", ") if "=" in kv)
            jobs[name]["threads"] = threads.group(1) if threads else "1"
    for stage in ("train_drsr:prealign", "train_drsr:stage1", "train_drsr:stage2", "dpo"):
        assert jobs[stage]["gpu"] == "8" and jobs[stage]["threads"] == "64" and jobs[stage]["mem_mb"] == "960000", \
            (stage, jobs[stage])
    evaluations = [name for name in jobs if name.startswith("evaluate:")]
    assert len(evaluations) == 7 and all(jobs[name]["gpu"] == "1" for name in evaluations)
    assert all(jobs[name].get("gpu", "0") == "0" for name in ("manifests", "speech_tokenizer", "merge", "init_model"))
