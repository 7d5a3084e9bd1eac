"""Device and precision follow the params (fac.devices.resolve), never the machine: gpus 0 is the CPU in fp32, gpus N
needs N CUDA devices, bf16/fp16 need a GPU; a job that cannot have what it asks for fails at once with one line
naming it and what it saw. `fac train <stage>`, `fac eval` and `fac train preferences` check before loading
anything; preferences build in one process; DPO's reference log-probs are computed once, shared among the ranks
under torchrun, and written by rank 0 alone. The last test runs only where CUDA is (cuda and bf16 for real)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fac.cli import main
from fac.devices import CPU, resolve
from fac.model import FunAudioChatForConditionalGeneration
from train_fixtures import FAC, ROOT, one_thread, save_random_drsr, subprocess_env, tiny_world  # noqa: F401 (fixtures)

WORKER = Path(__file__).parent / "dpo_reference_worker.py"


# ------------------------------------------------------------------------------------------- resolve


def test_gpus_0_in_fp32_is_the_cpu_in_float32():
    placement = resolve("stage prealign", 0, "fp32")
    assert placement == CPU
    assert placement.device == torch.device("cpu") and placement.dtype == torch.float32 and not placement.on_gpu
    with placement.autocast():  # fp32: no autocast
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")


def test_gpus_without_cuda_is_an_error_naming_the_job_and_what_it_saw(cuda_devices, monkeypatch):
    cuda_devices(0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ValueError) as error:
        resolve("stage prealign", 1, "fp32")
    text = str(error.value)
    assert text.startswith("stage prealign: gpus: 1 asks for CUDA")
    assert "torch.cuda.is_available() is False" in text and "0 CUDA device(s) visible" in text
    assert "CUDA_VISIBLE_DEVICES=" in text and text.endswith("set gpus: 0 to run on CPU")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_the_cpu_is_an_error_never_a_silent_fp32(precision):
    with pytest.raises(ValueError, match=f"^evaluation of stage2: precision {precision} needs a GPU.*"
                                         "set precision: fp32 to run on CPU"):
        resolve("evaluation of stage2", 0, precision)


def test_gpus_with_cuda_give_this_rank_its_device_in_the_stage_precision(cuda_devices):
    cuda_devices(2)
    placement = resolve("stage stage2", 1, "bf16")
    assert placement.device == torch.device("cuda", 0) and placement.dtype == torch.bfloat16 and placement.on_gpu
    assert resolve("stage stage2", 2, "fp16", local_rank=1).device == torch.device("cuda", 1)
    assert resolve("stage stage2", 1, "fp32").dtype == torch.float32
    assert resolve("stage stage2", 0, "fp32") == CPU  # gpus 0 is the CPU even where CUDA is


def test_more_gpus_than_visible_is_an_error(cuda_devices):
    cuda_devices(2)
    with pytest.raises(ValueError, match=r"^stage x: gpus: 3 asks for more CUDA devices than this process sees "
                                         r"\(torch.cuda.is_available\(\) is True, 2 CUDA device\(s\) visible"):
        resolve("stage x", 3, "bf16")


def test_unknown_precision_and_negative_gpus_are_errors():
    with pytest.raises(ValueError, match="^preferences: precision must be one of"):
        resolve("preferences", 0, "fp8")
    with pytest.raises(ValueError, match="^preferences: gpus must be 0"):
        resolve("preferences", -1, "fp32")


# ------------------------------------------------------------------------------------------- fac train


def test_fac_train_stage_asking_for_a_gpu_here_exits_2_before_loading_anything(tmp_path):
    """A job without the GPU its stage asks for fails in seconds with one line; it never looks at its inputs."""
    params = {"stage": {"steps": 1, "lr": 1e-3, "gpus": 1, "data": {"spoken_qa_train": 1.0}}}
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([FAC, "train", "prealign", "--params", json.dumps(params), "--model",
                           str(tmp_path / "no-such-model"), "--manifests", str(tmp_path / "no-such-manifests"),
                           "--data-root", str(tmp_path), "--out", str(tmp_path / "out"),
                           "--state-root", str(tmp_path / "state")], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("fac train: error: stage prealign: gpus: 1 asks for CUDA")
    assert "set gpus: 0 to run on CPU" in errors[0] and "CUDA_VISIBLE_DEVICES=" in errors[0]
    assert "no-such-model" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_fac_train_checks_in_process_and_never_starts_torchrun_for_a_stage_it_cannot_place(cuda_devices, monkeypatch,
                                                                                           tmp_path, capsys):
    cuda_devices(0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("relaunched under torchrun"))
    from fac.train import stages

    monkeypatch.setattr(stages, "train_drsr", lambda *a, **k: pytest.fail("loaded the stage"))
    stage = {"steps": 1, "lr": 1e-3, "backend": "deepspeed", "gpus": 8, "processes": 2, "precision": "bf16"}
    assert main(["train", "stage2", "--params", json.dumps({"stage": stage}), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "fac train: error: stage stage2: gpus: 8 asks for CUDA" in capsys.readouterr().err
    stage.update(gpus=0)  # the CPU, but in bf16
    assert main(["train", "stage2", "--params", json.dumps({"stage": stage}), "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "fac train: error: stage stage2: precision bf16 needs a GPU" in capsys.readouterr().err
    # The torch backend runs one process on at most one GPU.
    torch_stage = {"steps": 1, "lr": 1e-3, "gpus": 2}
    assert main(["train", "stage1", "--params", json.dumps({"stage": torch_stage}), "--out", str(tmp_path / "o")]) == 2
    assert "stage stage1: the torch backend trains in one process on at most one GPU" in capsys.readouterr().err


def test_gpus_and_precision_options_are_for_preferences_only(tmp_path, capsys):
    assert main(["train", "prealign", "--params", json.dumps({"stage": {"steps": 1, "lr": 1e-3}}), "--gpus", "0",
                 "--out", str(tmp_path / "out")]) == 2
    assert "--gpus, --precision and --batch-size are for `fac train preferences`" in capsys.readouterr().err


def test_fac_train_init_never_starts_torchrun(monkeypatch, tmp_path):
    from fac.train import stages

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("relaunched under torchrun"))
    called = []
    monkeypatch.setattr(stages, "init_model", lambda *a, **k: called.append(a) or {})
    params = {"stage": {"backend": "deepspeed", "processes": 2}, "model": {}, "seed": 0}
    assert main(["train", "init", "--params", json.dumps(params), "--out", str(tmp_path / "init")]) == 0
    assert len(called) == 1


# ------------------------------------------------------------------------------------------- evaluation, preferences


@pytest.fixture
def model_spy(monkeypatch):
    """Where the DRSR model computes: (weights' device, weights' dtype, inputs' device, autocast dtype or None) of
    every generate_speech_text and forward call."""
    seen = []
    cls = FunAudioChatForConditionalGeneration
    generate, forward = cls.generate_speech_text, cls.forward

    def record(model, input_ids):
        weights = next(model.parameters())
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        seen.append((weights.device.type, weights.dtype, input_ids.device.type, autocast))

    def spied_generate(self, input_ids, *args, **kwargs):
        record(self, input_ids)
        return generate(self, input_ids, *args, **kwargs)

    def spied_forward(self, input_ids=None, *args, **kwargs):
        record(self, input_ids)
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(cls, "generate_speech_text", spied_generate)
    monkeypatch.setattr(cls, "forward", spied_forward)
    return seen


@pytest.fixture(scope="module")
def drsr_dir(tiny_world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drsr") / "model"
    save_random_drsr(tiny_world, folder, seed=7)
    return folder


def fac_eval(world, model_dir, out, *options) -> int:
    return main(["eval", "--stage", "stage2", "--model", str(model_dir), "--world", str(world.world_dir),
                 "--manifests", str(world.manifest_dir), "--data-root", str(world.data_root), "--out", str(out),
                 *options])


def test_fac_eval_with_gpus_0_fp32_runs_the_model_on_the_cpu_in_float32(tiny_world, drsr_dir, tmp_path, model_spy):
    assert fac_eval(tiny_world, drsr_dir, tmp_path / "default.json") == 0  # the defaults: --gpus 0 --precision fp32
    default = json.loads((tmp_path / "default.json").read_text())
    model_spy.clear()
    assert fac_eval(tiny_world, drsr_dir, tmp_path / "cpu.json", "--gpus", "0", "--precision", "fp32") == 0
    assert model_spy and set(model_spy) == {("cpu", torch.float32, "cpu", None)}
    assert json.loads((tmp_path / "cpu.json").read_text()) == default


def test_fac_eval_asking_for_what_the_machine_lacks_exits_2_naming_the_evaluation(tiny_world, drsr_dir, tmp_path,
                                                                                   cuda_devices, monkeypatch, capsys):
    from fac.eval import metrics

    cuda_devices(0)
    monkeypatch.setattr(metrics, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    assert fac_eval(tiny_world, drsr_dir, tmp_path / "m.json", "--gpus", "1") == 2
    err = capsys.readouterr().err
    assert "fac eval: error: evaluation of stage2: gpus: 1 asks for CUDA" in err and "set gpus: 0 to run on CPU" in err
    assert fac_eval(tiny_world, drsr_dir, tmp_path / "m.json", "--gpus", "0", "--precision", "bf16") == 2
    assert "fac eval: error: evaluation of stage2: precision bf16 needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def preference_inputs(world, root: Path) -> dict:
    """The tiny world as preference building reads it: text QA with attributes, noisy questions, emotion clips."""
    import shutil

    from fac.data import manifests as M

    world_dir, manifest_dir = root / "world", root / "manifests"
    shutil.copytree(world.world_dir, world_dir)
    shutil.copytree(world.manifest_dir, manifest_dir)
    qa = [json.loads(line) for line in (world_dir / "text_qa.jsonl").read_text().splitlines()]
    for pair in qa:
        pair["attribute"] = "lives_in" if "live" in pair["question"] else "likes"
    (world_dir / "text_qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in qa))
    ids = {p["answer"]: p["id"] for p in qa}
    records = [json.loads(line) for line in (manifest_dir / "spoken_qa_train.jsonl").read_text().splitlines()]
    noisy = [dict(r, meta={**r["meta"], "qa": ids[r["meta"]["answer"]]}) for r in records]
    (manifest_dir / "spoken_qa_train_noisy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in noisy))
    paraling = [M.conversation("s2m", json.loads(records[i]["audio"][0]), M.assistant_audio(reply, list(range(8))),
                               {"id": f"par{i}", "emotion": emotion, "reply": reply})
                for i, (emotion, reply) in enumerate([("happy", "anna likes tea"), ("sad", "ben likes milk")])]
    (manifest_dir / "paraling_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in paraling))
    return {"world": world_dir, "manifests": manifest_dir}


def fac_preferences(world, model_dir, inputs, out, *options) -> int:
    # The rule passes the DPO stage's params: a deepspeed stage of 2 processes, which preferences never become.
    params = {"stage": {"backend": "deepspeed", "processes": 2, "zero_stage": 2}, "seed": 0}
    return main(["train", "preferences", "--params", json.dumps(params), "--model", str(model_dir),
                 "--world", str(inputs["world"]), "--manifests", str(inputs["manifests"]),
                 "--data-root", str(world.data_root), "--out", str(out), *options])


def test_preferences_built_in_batches_equal_those_built_one_at_a_time(tiny_world, drsr_dir, tmp_path, monkeypatch):
    """Batched greedy answers (left-padded, evaluation.batch_size) change nothing in the pairs: the same file."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    inputs = preference_inputs(tiny_world, tmp_path)
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "one.jsonl", "--batch-size", "1") == 0
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "five.jsonl", "--batch-size", "5") == 0
    pairs = (tmp_path / "one.jsonl").read_text()
    assert pairs == (tmp_path / "five.jsonl").read_text() and len(pairs.splitlines()) > 5


def test_preferences_with_gpus_0_fp32_generate_on_the_cpu_in_float32_in_one_process(tiny_world, drsr_dir, tmp_path,
                                                                                   model_spy, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("relaunched under torchrun"))
    inputs = preference_inputs(tiny_world, tmp_path)
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "default.jsonl") == 0
    model_spy.clear()
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "cpu.jsonl", "--gpus", "0",
                           "--precision", "fp32") == 0
    assert model_spy and set(model_spy) == {("cpu", torch.float32, "cpu", None)}
    assert (tmp_path / "cpu.jsonl").read_text() == (tmp_path / "default.jsonl").read_text()
    assert not (tmp_path / "cpu.tmp").exists()


def test_preferences_asking_for_what_the_machine_lacks_exit_2_naming_them(tiny_world, drsr_dir, tmp_path,
                                                                         cuda_devices, monkeypatch, capsys):
    from fac.train import dpo

    cuda_devices(0)
    monkeypatch.setattr(dpo, "build_preferences", lambda *a, **k: pytest.fail("built preferences"))
    inputs = {"world": tmp_path, "manifests": tmp_path}
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "p.jsonl", "--gpus", "1") == 2
    err = capsys.readouterr().err
    assert "fac train: error: preferences: gpus: 1 asks for CUDA" in err and "set gpus: 0 to run on CPU" in err
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "p.jsonl", "--precision", "bf16") == 2
    assert "fac train: error: preferences: precision bf16 needs a GPU" in capsys.readouterr().err
    assert fac_preferences(tiny_world, drsr_dir, inputs, tmp_path / "p.jsonl", "--gpus", "2") == 2
    assert "preferences: runs in one process on at most one GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- DPO's reference pass


def write_pairs(world, path: Path, count: int = 20) -> None:
    """`count` preference pairs over the world's training clips, text and spoken, of varied lengths (more pairs than
    one reference batch of 8, so that two ranks share the batches)."""
    from fac.data.text_tokenizer import SYSTEM_PROMPTS
    from fac.train.data import SpokenRecord, load_records

    records = [SpokenRecord(r, "spoken_qa_train") for r in load_records(world.manifest_dir, "spoken_qa_train")]
    records += [SpokenRecord(r, "asr_train") for r in load_records(world.manifest_dir, "asr_train")]
    pairs = []
    for n in range(count):
        rec, other = records[n % len(records)], records[(n + 1) % len(records)]
        spoken = n % 2 == 1
        pairs.append({"dimension": "robustness", "system": SYSTEM_PROMPTS["s2m" if spoken else "s2t"],
                      "user_path": rec.user_path, "id": f"p{n}",
                      "chosen": {"text": rec.text, "codes": list(rec.codes) if spoken else None},
                      "rejected": {"text": other.text, "codes": list(other.codes) if spoken else None}})
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))


def run_reference(out: Path, model_dir: Path, pairs: Path, data_root: Path, processes: int):
    """dpo_reference_worker.py by itself (processes 1) or under torchrun, on the CPU (gloo)."""
    stage = {"trainable": [""], "beta": 0.1, "steps": 1, "lr": 1e-3, "batch_size": 2, "backend": "deepspeed",
             "zero_stage": 2, "processes": processes}
    env = {**subprocess_env(), "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(WORKER), "--out", str(out), "--model", str(model_dir), "--pairs", str(pairs),
                           "--data-root", str(data_root), "--state-root", str(out / "state"),
                           "--stage", json.dumps(stage)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def reference_runs(tiny_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("dpo_reference")
    save_random_drsr(tiny_world, base / "model", seed=3)
    write_pairs(tiny_world, base / "pairs.jsonl")
    return {n: run_reference(base / f"processes{n}", base / "model", base / "pairs.jsonl", tiny_world.data_root, n)
            for n in (1, 2)}


def reference_of(out: Path, rank: int = 0) -> list:
    return json.loads((out / f"ref_rank{rank}.json").read_text())


def test_two_processes_write_the_reference_log_probs_once_from_rank_0(reference_runs):
    two = reference_runs[2]
    assert (two / "writes_rank0.txt").read_text() == "1" and (two / "writes_rank1.txt").read_text() == "0"
    files = list((two / "state").glob("*/reference_logps.json"))
    assert len(files) == 1 and not list((two / "state").glob("*/reference_logps.tmp"))
    assert json.loads(files[0].read_text()) == reference_of(two)
    assert reference_of(two, 0) == reference_of(two, 1)  # every rank ends with the full list
    assert len(reference_of(two)) == 20


def test_two_processes_reference_log_probs_equal_one_process_run(reference_runs):
    one, two = reference_of(reference_runs[1]), reference_of(reference_runs[2])
    assert len(one) == len(two) == 20
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-6, atol=1e-5)
    assert json.loads(next((reference_runs[1] / "state").glob("*/reference_logps.json")).read_text()) == one


def test_the_reference_pass_of_a_cpu_stage_runs_on_the_cpu_in_float32(reference_runs):
    for out, ranks in ((reference_runs[1], [0]), (reference_runs[2], [0, 1])):
        for rank in ranks:
            seen = json.loads((out / f"placement_rank{rank}.json").read_text())
            assert seen == {"device": "cpu", "autocast": None, "weights": "torch.float32"}, (out, rank)


# ------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the same checks on cuda in bf16")
def test_on_a_gpu_evaluation_and_the_reference_pass_run_on_cuda_in_bf16(tiny_world, drsr_dir, model_spy, tmp_path):
    from fac.devices import device_of
    from fac.eval.metrics import evaluate
    from fac.model import load_checkpoint
    from fac.model.processing import SpecialIds
    from fac.train.data import FeatureCache
    from fac.train.dpo import PairData, read_pairs, reference_logps
    from fac.train.stages import load_tokenizer

    metrics = evaluate("stage2", str(drsr_dir), str(tiny_world.world_dir), str(tiny_world.manifest_dir),
                       str(tiny_world.data_root), placement=resolve("evaluation of stage2", 1, "bf16"))
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert model_spy and set(model_spy) == {("cuda", torch.float32, "cuda", torch.bfloat16)}

    write_pairs(tiny_world, tmp_path / "pairs.jsonl")
    model = load_checkpoint(str(drsr_dir))
    tokenizer = load_tokenizer(str(drsr_dir))
    data = PairData(read_pairs(tmp_path / "pairs.jsonl"), FeatureCache(tiny_world.data_root, 80), tokenizer,
                    SpecialIds.from_tokenizer(tokenizer, model.config), model.config.audio_config.group_size, {})
    on_cpu = reference_logps(model, data)
    model_spy.clear()
    on_gpu = reference_logps(model, data, placement=resolve("stage dpo", 1, "bf16"))
    assert model_spy and set(model_spy) == {("cuda", torch.float32, "cuda", torch.bfloat16)}
    assert device_of(model).type == "cpu" and model.training  # back where the Trainer expects it
    torch.testing.assert_close(torch.tensor(on_gpu), torch.tensor(on_cpu), rtol=0.05, atol=1.0)  # bf16 vs fp32
