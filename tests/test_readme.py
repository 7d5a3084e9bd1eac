"""The README's shell commands, run as written: every command in its fenced shell blocks is either run here on the
micro world (a scratch checkout with `my_overlay.yaml` = the micro overlay and `results/default/` = the built micro
experiment) with a PATH that does not hold `.venv/bin`, or listed below as skipped with the reason. A README command
that is in neither list, or a list entry that no README command matches, fails the test, so the two cannot drift."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workflow_helpers import ROOT

VENV_BIN = Path(sys.executable).parent
MICRO_OVERLAY = ROOT / "tests/configs/micro.yaml"


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"(^|\s)#.*$", "", line).strip()
            if command:
                commands.append(" ".join(command.split()))
    return commands


def _ok(proc, workspace):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _help_lists_actions(proc, workspace):
    _ok(proc, workspace)
    assert all(action in proc.stdout for action in ("params", "data", "train", "eval", "infer", "merge", "version"))


def _dry_run(proc, workspace):
    _ok(proc, workspace)
    assert "Job stats" in proc.stdout + proc.stderr or "Nothing to be done" in proc.stdout + proc.stderr


def _params_ok(proc, workspace):
    _ok(proc, workspace)
    assert proc.stdout.startswith("ok: params/default.yaml + my_overlay.yaml (experiment 'micro')")


def _until_tokenizer(proc, workspace):
    _ok(proc, workspace)
    data = workspace / "results/micro/data"
    assert (data / "world/world.json").is_file() and (data / "tokenizer/tokenizer.json").is_file()
    assert (workspace / "results/micro/data/logs/text_tokenizer.log").is_file()
    assert not (data / "tts").exists()  # --until stops at the tokenizer: nothing past it ran


def _text_answer(proc, workspace):
    _ok(proc, workspace)
    # One line: the text answer (the micro world's model, trained a few steps, may well answer nothing).
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1, proc.stdout


def _json_answer(proc, workspace):
    _ok(proc, workspace)
    result = json.loads(proc.stdout)
    assert result["mode"] == "s2m" and isinstance(result["text"], str) and isinstance(result["speech_tokens"], list)


def _spoken(proc, workspace):
    _ok(proc, workspace)
    from fac.data.audio import read_wav

    lines = proc.stdout.splitlines()
    assert lines[-1] == "spoken answer: answer.wav", proc.stdout
    units = lines[-2].removeprefix("speech tokens:").split()
    assert len(read_wav(workspace / "answer.wav")) == 640 * len(units)  # read_wav refuses a silent file


def _merged(proc, workspace):
    _ok(proc, workspace)
    assert (workspace / "merged_0.3/config.json").is_file() and (workspace / "merged_0.3/model.safetensors").is_file()


SNAKEMAKE = ".venv/bin/snakemake --profile workflow/profiles/local"
STAGES = "results/default/checkpoints"
# README command -> (how it is run: "as written" or with words appended, check). Run in the README's order.
RUN = {
    ".venv/bin/fac --help": ("", _help_lists_actions),
    f"{SNAKEMAKE} -n": ("", _dry_run),
    # The whole micro DAG takes minutes (the micro_run fixture runs it); here it is planned, `-n` appended.
    f"{SNAKEMAKE} --configfile params/default.yaml my_overlay.yaml": (" -n", _dry_run),
    f"{SNAKEMAKE} --configfile params/default.yaml my_overlay.yaml --until text_tokenizer": ("", _until_tokenizer),
    ".venv/bin/fac params check params/default.yaml my_overlay.yaml": ("", _params_ok),
    f".venv/bin/fac infer --model {STAGES}/stage2 --audio question.wav": ("", _text_answer),
    f".venv/bin/fac infer --model {STAGES}/stage2 --audio question.wav --mode s2m --json": ("", _json_answer),
    # The micro world's model, trained a few steps, may end its answer at once: made to say a few tokens first.
    f".venv/bin/fac infer --model {STAGES}/stage2 --audio question.wav --mode s2m --speak answer.wav": (
        " --min-new-tokens 6", _spoken),
    f".venv/bin/fac merge --base {STAGES}/prealign --other {STAGES}/stage1 --alpha 0.3 --out merged_0.3": ("", _merged),
}
SKIP = {
    ".venv/bin/snakemake --profile workflow/profiles/local --configfile params/paper.yaml my_paths.yaml":
        "needs Qwen3, Whisper and your data on disk; test_paper_rehearsal runs it over stand-ins with such an overlay",
    ".venv/bin/snakemake --profile workflow/profiles/slurm --configfile params/paper.yaml my_paths.yaml":
        "needs a SLURM cluster with GPUs and the paper's components; test_slurm submits the micro DAG through this "
        "profile and dry-runs params/paper.yaml through it",
    "make reproduce": "the whole reproduction (about 23 minutes); the micro_run fixture runs the same DAG",
    "make test": "this test suite itself",
    "make data": "the default world's data half (minutes); the micro world runs the same rules (micro_run)",
    "make ablations": "every ablation (about 2 hours); test_ablations_target_plans_every_alpha_and_dimension plans them",
    'make reproduce ARGS="--configfile params/default.yaml params/overlays/k1.yaml"':
        "a whole grouping experiment; test_grouping_ablation_overlay_trains_the_recipe_at_that_k trains k1 to DPO on the micro world",
    ".venv/bin/dvc pull": "rewrites this repository's data/ from its remote",
    ".venv/bin/dvc add data && git add data.dvc": "records a new version of data/ in this repository",
    ".venv/bin/dvc remote add -d shared /mnt/storage/fac-dvc": "edits this repository's DVC config; the path is an example",
    ".venv/bin/dvc push": "a remote push",
    ".venv/bin/dvc pull -r shared": "needs the example remote",
    ".venv/bin/dvc remote add store /mnt/storage/fac-dvc": "edits this repository's DVC config; the path is an example",
    ".venv/bin/fac version save --experiment default --remote store":
        "a remote push; test_saved_experiment_restores_in_a_fresh_clone_with_nothing_to_do saves the micro experiment",
    'git commit -m "default: new encoder"': "commits to this repository",
    ".venv/bin/dvc metrics diff HEAD~1": "needs a saved experiment in the history; the versioning test diffs one",
    ".venv/bin/dvc params diff HEAD~1": "needs a saved experiment in the history; the versioning test diffs one",
    ".venv/bin/dvc exp show -A --csv": "needs saved experiments; the versioning test reads this table",
    ".venv/bin/fac version restore --experiment default --remote store":
        "needs a remote holding the experiment; the versioning test restores the micro experiment in a fresh clone",
    f".venv/bin/fac demo --model {STAGES}/stage2":
        "serves until interrupted; tests/test_demo.py runs it on the micro experiment, and drives its page in headless "
        "Chromium",
}


def test_every_readme_command_is_run_or_skipped_with_a_reason():
    commands = set(readme_commands())
    assert commands, "no shell commands found in README.md"
    unlisted = sorted(commands - set(RUN) - set(SKIP))
    assert not unlisted, f"README commands neither run nor skipped by tests/test_readme.py: {unlisted}"
    stale = sorted((set(RUN) | set(SKIP)) - commands)
    assert not stale, f"tests/test_readme.py lists commands the README no longer has: {stale}"
    assert not set(RUN) & set(SKIP)


def path_without_venv() -> str:
    """The caller's PATH less the project's venv: a new shell where nothing was activated."""
    keep = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != VENV_BIN.resolve() and not Path(p).resolve().is_relative_to(ROOT / ".venv")]
    return os.pathsep.join(keep)


@pytest.fixture(scope="module")
def workspace(micro_run, tmp_path_factory) -> Path:
    """A checkout as a user has it after `make setup`, the README's example files, and a built experiment."""
    ws = tmp_path_factory.mktemp("readme")
    for name in (".venv", "workflow", "rules", "params", "data"):
        (ws / name).symlink_to(ROOT / name)
    shutil.copy(MICRO_OVERLAY, ws / "my_overlay.yaml")
    built = micro_run / "results/micro"
    (ws / "results/default").mkdir(parents=True)
    (ws / "results/default/checkpoints").symlink_to(built / "checkpoints")
    question = json.loads(json.loads((built / "data/manifests/spoken_qa_test.jsonl").read_text().splitlines()[0])["audio"][0])
    shutil.copy(built / "data" / question["path"], ws / "question.wav")
    return ws


def test_readme_commands_run_as_written_without_the_venv_on_path(workspace):
    env = dict(os.environ, PATH=path_without_venv(), HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("VIRTUAL_ENV", None)
    assert shutil.which("fac", path=env["PATH"]) is None and shutil.which("snakemake", path=env["PATH"]) is None
    commands = [c for c in dict.fromkeys(readme_commands()) if c in RUN]
    assert len(commands) == len(RUN)
    for command in commands:
        appended, check = RUN[command]
        proc = subprocess.run(["bash", "-c", command + appended], cwd=workspace, env=env, capture_output=True,
                              text=True, timeout=900)
        try:
            check(proc, workspace)
        except AssertionError as error:
            raise AssertionError(f"README command failed: {command}{appended}\n{error}") from None
