"""The one trainer: its learning-rate schedule is `cosine_lr`, `set_trainable` freezes exactly what lies outside
the prefixes, a killed stage resumes bit-exactly from its last resume point, resume state is keyed by a
fingerprint of the stage and its inputs, and it is removed once the stage has finished."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fac.model import FunAudioChatForConditionalGeneration
from fac.train import stages
from fac.train.trainer import StageConfig, Trainer, cosine_lr, set_trainable
from train_fixtures import fac_command, one_thread, subprocess_env, tiny_world  # noqa: F401 (fixtures)

PREALIGN = ["continuous_audio_tower", "audio_tower", "audio_invert_tower"]


def linear_trainer(cfg: StageConfig, state_dir: Path, seen_lrs: list | None = None) -> Trainer:
    """A Trainer on a 4->1 linear regression; records the learning rate each micro-step trains with."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    holder = {}

    def loss_fn(m, batch):
        if seen_lrs is not None:
            seen_lrs.append(holder["trainer"].optimizer.param_groups[0]["lr"])
        return ((m(batch["x"]) - batch["y"]) ** 2).mean(), {}

    trainer = Trainer(model, cfg, loss_fn, lambda step: {"x": x, "y": y}, state_dir, "linear")
    holder["trainer"] = trainer
    return trainer


def base_llm_stage(**overrides) -> dict:
    return {"steps": 3, "lr": 3e-3, "batch_size": 2, "save_every": 1, "seed": 5, **overrides}


# ------------------------------------------------------------------------------------------- schedule


def test_cosine_lr_warms_up_linearly_then_decays_to_min_lr():
    cfg = StageConfig(steps=25, lr=0.01, min_lr=0.001, warmup_ratio=0.2)  # 5 warmup steps, 20 of decay
    assert cosine_lr(0, cfg) == 0.0
    assert cosine_lr(2, cfg) == pytest.approx(0.004)
    assert cosine_lr(5, cfg) == pytest.approx(0.01)
    assert cosine_lr(15, cfg) == pytest.approx((0.01 + 0.001) / 2)  # half way through the decay
    assert cosine_lr(25, cfg) == pytest.approx(0.001)


def test_trainer_trains_every_step_at_the_learning_rate_of_cosine_lr(tmp_path):
    cfg = StageConfig(steps=25, lr=0.01, min_lr=0.001, warmup_ratio=0.2, save_every=1000)
    seen = []
    trainer = linear_trainer(cfg, tmp_path / "state", seen)
    trainer.train()
    assert seen == pytest.approx([cosine_lr(s, cfg) for s in range(25)], rel=1e-9, abs=1e-15)
    assert seen[0] == 0.0 and seen[5] == pytest.approx(0.01) and seen[15] == pytest.approx(0.0055)


def test_constant_schedule_holds_lr_after_warmup(tmp_path):
    cfg = StageConfig(steps=8, lr=0.01, warmup_ratio=0.25, schedule="constant", save_every=1000)
    seen = []
    linear_trainer(cfg, tmp_path / "state", seen).train()
    assert seen == pytest.approx([0.0, 0.005] + [0.01] * 6)


# ------------------------------------------------------------------------------------------- trainable


@pytest.fixture(scope="module")
def drsr_model(tiny_world):
    torch.manual_seed(0)
    return FunAudioChatForConditionalGeneration(tiny_world.drsr_config())


def test_set_trainable_freezes_exactly_the_parameters_outside_the_prefixes(drsr_model):
    trainable, total = set_trainable(drsr_model, PREALIGN)
    params = dict(drsr_model.named_parameters())
    inside = {n for n in params if any(n.startswith(p) for p in PREALIGN)}
    assert {n for n, p in params.items() if p.requires_grad} == inside
    assert {n.split(".")[0] for n in set(params) - inside} == {"language_model"}
    assert trainable == sum(params[n].numel() for n in inside)
    assert total == sum(p.numel() for p in params.values())


def test_set_trainable_with_the_empty_prefix_trains_everything(drsr_model):
    trainable, total = set_trainable(drsr_model, [""])
    assert trainable == total
    assert all(p.requires_grad for p in drsr_model.parameters())


def test_set_trainable_rejects_prefixes_that_match_no_parameter(drsr_model):
    with pytest.raises(ValueError, match="audio_towr"):
        set_trainable(drsr_model, ["audio_towr"])


def test_set_trainable_rejects_a_misspelt_prefix_listed_with_valid_ones(drsr_model):
    # A typo in one prefix of a stage's list would silently freeze that module for the whole stage.
    with pytest.raises(ValueError, match="audio_invert_towr"):
        set_trainable(drsr_model, ["continuous_audio_tower", "audio_tower", "audio_invert_towr"])


# ------------------------------------------------------------------------------------------- resume points


def _resume_step(state_root: Path) -> int | None:
    """The step of the (single) stage's last resume point under state_root, if one is written."""
    for state in state_root.glob("*/last/trainer_state.json"):
        try:
            return json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):  # read while being renamed into place
            return None
    return None


@pytest.fixture(scope="module")
def killed_and_rerun(tiny_world, tmp_path_factory):
    """`fac train base-llm` three times: uninterrupted, killed by SIGKILL after a resume point, and rerun."""
    base = tmp_path_factory.mktemp("resume")
    steps, save_every = 120, 10
    params = json.dumps({"stage": {"steps": steps, "lr": 3e-3, "min_lr": 3e-4, "warmup_ratio": 0.05,
                                   "batch_size": 4, "save_every": save_every, "seed": 11},
                         "model": tiny_world.model_params})

    def command(run: str) -> list[str]:
        return fac_command("train", "base-llm", "--params", params, "--world", str(tiny_world.world_dir),
                           "--tokenizer", str(tiny_world.tokenizer_dir), "--out", str(base / run / "out"),
                           "--state-root", str(base / run / "state"), "--threads", "1")

    def start(run: str, log_name: str) -> subprocess.Popen:
        (base / run).mkdir(exist_ok=True)
        with open(base / run / log_name, "w") as log:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(command(run), stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())

    uninterrupted = start("uninterrupted", "log.txt")
    killed = start("resumed", "killed.log")
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        step = _resume_step(base / "resumed" / "state")
        if step is not None and step >= save_every:
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    killed.wait(timeout=60)
    log = (base / "resumed" / "killed.log").read_text()
    assert killed.returncode == -signal.SIGKILL, f"the run ended ({killed.returncode}) before its kill:\n{log[-3000:]}"
    killed_at = _resume_step(base / "resumed" / "state")
    assert killed_at is not None and save_every <= killed_at < steps

    rerun = subprocess.run(command("resumed"), capture_output=True, text=True, env=subprocess_env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert uninterrupted.wait(timeout=120) == 0, (base / "uninterrupted/log.txt").read_text()[-3000:]
    return {"base": base, "killed_at": killed_at, "rerun_log": rerun.stderr, "steps": steps}


def test_killed_stage_rerun_ends_with_bit_identical_weights(killed_and_rerun):
    base = killed_and_rerun["base"]
    resumed = load_file(base / "resumed/out/model.safetensors")
    reference = load_file(base / "uninterrupted/out/model.safetensors")
    assert resumed.keys() == reference.keys()
    different = [name for name in reference if not torch.equal(resumed[name], reference[name])]
    assert different == []


def test_killed_stage_rerun_replays_the_same_batches(killed_and_rerun):
    base = killed_and_rerun["base"]
    resumed = (base / "resumed/out/history.jsonl").read_text().splitlines()
    reference = (base / "uninterrupted/out/history.jsonl").read_text().splitlines()
    assert len(resumed) == killed_and_rerun["steps"]
    assert [json.loads(r)["loss"] for r in resumed] == [json.loads(r)["loss"] for r in reference]


def test_rerun_log_says_it_resumed_from_the_last_resume_point(killed_and_rerun):
    assert f"base_llm: resuming from step {killed_and_rerun['killed_at']} " in killed_and_rerun["rerun_log"]


def test_rerun_removes_the_resume_state_it_resumed_from(killed_and_rerun):
    assert list((killed_and_rerun["base"] / "resumed/state").iterdir()) == []


def _keep_resume_state(monkeypatch):
    monkeypatch.setattr(Trainer, "finish", lambda self: None)


def test_changed_stage_config_trains_in_a_new_resume_folder(tiny_world, tmp_path, monkeypatch, caplog):
    _keep_resume_state(monkeypatch)
    state = tmp_path / "state"
    args = (tiny_world.model_params, tiny_world.world_dir, tiny_world.tokenizer_dir)
    stages.train_base_llm(base_llm_stage(), *args, tmp_path / "a", state, {})
    first = {p.name for p in state.iterdir()}
    caplog.clear()
    with caplog.at_level("INFO", logger="fac.train"):
        stages.train_base_llm(base_llm_stage(lr=1e-3), *args, tmp_path / "b", state, {})
    folders = {p.name for p in state.iterdir()}
    assert len(first) == 1 and len(folders) == 2 and first < folders
    assert all(name.startswith("base_llm-") for name in folders)
    assert "resuming" not in caplog.text and "base_llm: starting" in caplog.text


def test_unchanged_stage_resumes_from_its_own_folder(tiny_world, tmp_path, monkeypatch, caplog):
    _keep_resume_state(monkeypatch)
    state = tmp_path / "state"
    args = (tiny_world.model_params, tiny_world.world_dir, tiny_world.tokenizer_dir)
    stages.train_base_llm(base_llm_stage(), *args, tmp_path / "a", state, {})
    with caplog.at_level("INFO", logger="fac.train"):
        stages.train_base_llm(base_llm_stage(), *args, tmp_path / "b", state, {})
    assert len(list(state.iterdir())) == 1
    assert "base_llm: resuming from step 2" in caplog.text  # the last resume point of a 3-step run


def test_changed_training_text_trains_in_a_new_resume_folder(tiny_world, tmp_path, monkeypatch, caplog):
    # The same number of documents with other facts: resuming would continue training on the old world.
    _keep_resume_state(monkeypatch)
    world = tmp_path / "world"
    shutil.copytree(tiny_world.world_dir, world)
    state = tmp_path / "state"
    args = (tiny_world.model_params, world, tiny_world.tokenizer_dir)
    stages.train_base_llm(base_llm_stage(), *args, tmp_path / "a", state, {})
    corpus = (world / "corpus.txt").read_text()
    (world / "corpus.txt").write_text(corpus.replace("paris", "rome").replace("tea", "milk"))
    with caplog.at_level("INFO", logger="fac.train"):
        stages.train_base_llm(base_llm_stage(), *args, tmp_path / "b", state, {})
    assert "resuming" not in caplog.text
    assert len(list(state.iterdir())) == 2


def test_resume_state_is_removed_after_a_successful_finish(tiny_world, tmp_path, monkeypatch):
    had_resume_point = []
    finish = Trainer.finish

    def spy(self):
        had_resume_point.append((self.state_dir / "last" / "trainer_state.json").is_file())
        finish(self)

    monkeypatch.setattr(Trainer, "finish", spy)
    state = tmp_path / "state"
    stages.train_base_llm(base_llm_stage(), tiny_world.model_params, tiny_world.world_dir, tiny_world.tokenizer_dir,
                          tmp_path / "out", state, {})
    assert had_resume_point == [True]
    assert list(state.iterdir()) == []
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_save_state_survives_the_leftover_of_a_save_killed_while_deleting_the_old_point(tmp_path):
    # A kill between `tmp -> last` and the end of `rmtree(old)` leaves a (partly deleted) `old` folder.
    trainer = linear_trainer(StageConfig(steps=4, lr=0.01), tmp_path / "state")
    trainer.save_state()
    leftover = tmp_path / "state" / "old"
    leftover.mkdir()
    (leftover / "optim.pt").write_bytes(b"half deleted")
    trainer.step = 1
    trainer.save_state()
    assert json.loads((tmp_path / "state/last/trainer_state.json").read_text())["step"] == 1
    assert not leftover.exists()


# ------------------------------------------------------------------ epochs: passes without replacement

def test_epoch_order_takes_every_example_once_per_pass_and_replays_from_the_step():
    from fac.train.trainer import EpochOrder

    order = EpochOrder(10, seed=3)
    positions = [i for step in range(4) for i in order.take(step, 3)]  # 12 positions: a pass and two more
    assert sorted(positions[:10]) == list(range(10)) and len(set(positions[10:])) == 2
    assert positions[:10] != list(range(10))  # shuffled
    assert EpochOrder(10, seed=3).take(2, 3) == positions[6:9]  # a resumed run draws the same batch
    second = [i for step in range(10, 20) for i in order.take(step, 1)]
    assert sorted(second) == list(range(10)) and second != positions[:10]  # each pass its own order
    assert EpochOrder(10, seed=4).take(0, 10) != positions[:10]


def test_resolve_steps_counts_the_global_batches_of_the_passes():
    stage = {"epochs": 2, "batch_size": 3, "grad_accum": 2, "processes": 2}
    assert stages.resolve_steps(stage, 25)["steps"] == 5  # ceil(2 * 25 / (3 * 2 * 2))
    assert stages.resolve_steps({**stage, "steps": 7}, 25)["steps"] == 7  # steps given: they win


def test_spoken_data_in_passes_holds_each_record_by_its_weight(tiny_world):
    from fac.model.processing import SpecialIds
    from fac.train.data import FeatureCache, SpokenData

    tokenizer = tiny_world.tokenizer()
    data = SpokenData(tiny_world.manifest_dir, {"spoken_qa_train": 1.0, "asr_train": 0.5},
                      FeatureCache(tiny_world.data_root, 80), tokenizer,
                      SpecialIds.from_tokenizer(tokenizer, tiny_world.drsr_config()), 5)
    qa, asr_records = len(data.records["spoken_qa_train"]), len(data.records["asr_train"])
    data.passes(seed=5)
    assert len(data) == qa + round(0.5 * asr_records)
    one_pass = [data.flat[p] for step in range(len(data)) for p in data.order.take(step, 1)]
    assert sorted(i for name, i in one_pass if name == "spoken_qa_train") == list(range(qa))
    assert len([i for name, i in one_pass if name == "asr_train"]) == round(0.5 * asr_records)
    batch = data.batch(0, 2, seed=5)
    assert batch["input_ids"].shape[0] == 2


def test_conversations_longer_than_max_length_leave_the_data_counted(tiny_world):
    from fac.model.processing import SpecialIds
    from fac.train.data import FeatureCache, SpokenData

    tokenizer = tiny_world.tokenizer()
    special = SpecialIds.from_tokenizer(tokenizer, tiny_world.drsr_config())
    features = FeatureCache(tiny_world.data_root, 80)
    full = SpokenData(tiny_world.manifest_dir, {"spoken_qa_train": 1.0}, features, tokenizer, special, 5)
    lengths = sorted(len(full.example(r).input_ids) for r in full.records["spoken_qa_train"])
    limit = lengths[len(lengths) // 2]  # the median: the longer half goes
    cut = SpokenData(tiny_world.manifest_dir, {"spoken_qa_train": 1.0}, features, tokenizer, special, 5,
                     max_length=limit)
    assert cut.dropped == {"spoken_qa_train": sum(n > limit for n in lengths)} and cut.dropped["spoken_qa_train"] > 0
    assert all(len(cut.example(r).input_ids) <= limit for r in cut.records["spoken_qa_train"])
    assert len(cut) == len(full) - cut.dropped["spoken_qa_train"]
    with pytest.raises(ValueError, match="every conversation is longer than max_length 4"):
        SpokenData(tiny_world.manifest_dir, {"spoken_qa_train": 1.0}, features, tokenizer, special, 5, max_length=4)


def test_preference_pairs_longer_than_max_length_leave_dpo_counted(tiny_world):
    from fac.data.text_tokenizer import SYSTEM_PROMPTS
    from fac.model.processing import SpecialIds
    from fac.train.data import FeatureCache
    from fac.train.dpo import PairData

    tokenizer = tiny_world.tokenizer()
    special = SpecialIds.from_tokenizer(tokenizer, tiny_world.drsr_config())
    users = [json.loads(json.loads(line)["audio"][0])["path"]
             for line in (tiny_world.manifest_dir / "spoken_qa_train.jsonl").read_text().splitlines()[:2]]
    pairs = [{"dimension": "robustness", "system": SYSTEM_PROMPTS["s2t"], "user_path": user,
              "chosen": {"text": "paris", "codes": None}, "rejected": {"text": rejected, "codes": None}}
             for user, rejected in zip(users, ["rome", " ".join(["nobody knows"] * 40)])]
    features = FeatureCache(tiny_world.data_root, 80)
    full = PairData(pairs, features, tokenizer, special, 5, {})
    short = max(len(full.example(pairs[0], side).input_ids) for side in ("chosen", "rejected"))
    cut = PairData(pairs, features, tokenizer, special, 5, {}, max_length=short)
    assert cut.dropped == 1 and cut.pairs == [pairs[0]] and len(cut.weights) == 1
