"""The kill matrix, training half: every rule of the model half that takes more than a moment is SIGKILLed in the
middle of its work (fac/faults.py: `FAC_FAULTS` names the points), the same command is run again until it ends, and
the outputs are those of the run that was never killed (the micro experiment as built: its hash manifest). Where a
rule keeps resume state (the training stages), the rerun starts from the last resume point instead of step 0.

The killed experiment, `micro_killed`, is the micro experiment under another name, beside it in the micro_run folder:
its data half has the same params, so it borrows micro's (rules/common.smk), and only the model half runs here. The
data half's kill matrix is in tests/test_reliability.py."""
import json
import shutil
import signal

import pytest

from conftest import BUILT_DIGESTS
from workflow_helpers import digests, rerun_through_faults

# fac.faults points ([group:]place[@n]): each kills the job that reaches it first, once.
POINTS = {
    "group:saved.base_llm@1": "the whole snakemake process group, once the base LLM has saved its first resume point",
    "saved.encoder@1": "the encoder stage, once it has saved its first resume point (step 2 of 4)",
    "write.stage1": "stage 1, its checkpoint written but not yet renamed into place",
    "group:write.merged": "the whole snakemake process group, the merge's checkpoint written but not yet renamed",
    "preferences": "preference building, once the first candidates are generated",
    "write.dpo": "DPO, its checkpoint written but not yet renamed into place",
    "answers": "an evaluation, once its first questions are answered",
}
# The DPO model and the stage-2 evaluation: every rule of the model half on the way (the other stages'
# evaluations, the metrics and the report are more of the same, a job's start-up each).
TARGETS = ("results/micro_killed/checkpoints/dpo", "results/micro_killed/eval/stage2.json")
# Resume points the reruns start from: the stage's log -> the step (the last resume point before the kill).
RESUMED = {"train/base_llm.log": 3, "train/encoder.log": 2, "train/stage1.log": 2}


@pytest.fixture
def killed_experiment(micro_run):
    """results/micro_killed in the micro_run folder, removed afterwards: the other tests see micro_run as built."""
    yield micro_run / "results/micro_killed"
    shutil.rmtree(micro_run / "results/micro_killed", ignore_errors=True)


def test_every_model_half_rule_killed_mid_work_reruns_to_the_uninterrupted_outputs(micro_run, killed_experiment,
                                                                                    tmp_path):
    overlay = tmp_path / "killed.yaml"
    overlay.write_text("experiment: micro_killed\n")
    overlays = ("tests/configs/micro.yaml", str(overlay))
    codes = rerun_through_faults(micro_run, *TARGETS, points=POINTS, fired=tmp_path / "fired", overlays=overlays)
    assert -signal.SIGKILL in codes and 1 in codes  # the group kill ended a run; a job's kill failed one

    results = killed_experiment
    for log, step in RESUMED.items():
        assert f"resuming from step {step} " in (results / "logs" / log).read_text(), log
    built = json.loads((micro_run / BUILT_DIGESTS).read_text())
    # A stage's summary names its inputs' paths (results/micro_killed/checkpoints/...): they read as micro's.
    ours = {f: d for f, d in digests(results, ("results/micro_killed/", "results/micro/")).items()
            if not f.startswith("data/") and f != "data.from"}  # data/: micro's, borrowed (data.from says so)
    stages = ("base_llm", "encoder", "init", "prealign", "stage1", "merged", "stage2", "dpo")
    assert {f.split("/")[1] for f in ours if f.startswith("checkpoints/")} == set(stages)
    assert {"preferences.jsonl", "eval/stage2.json"} <= set(ours)
    differ = [f for f in ours if ours[f] != built.get(f)]
    assert differ == [], f"outputs of the killed and rerun experiment that differ from the uninterrupted one: {differ}"
