"""The deepspeed backend of the one trainer: 2 gloo processes on CPU train a tiny Qwen3 as the torch backend
does on the union of their batches, each rank draws its own batches, rank 0 saves the full weights (ZeRO-2 and
ZeRO-3), a killed run resumes from DeepSpeed's checkpoint; and `fac train` decides how many processes to start.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("deepspeed")

import ds_worker  # noqa: E402
from fac.train.distributed import launch_command, process_count, threads_per_process  # noqa: E402
from fac.train.trainer import Trainer  # noqa: E402

WORKER = Path(__file__).parent / "ds_worker.py"
STEPS = 8
# Gradients summed in another order differ in the last float bits; Adam's near sign-like update turns that into
# weight differences up to ~1e-4 after 8 steps (lr 1e-2): a tenth of one step's size is still "the same run".
WEIGHT_ATOL = 1e-3


def run_worker(out: Path, zero_stage: int, *extra: str) -> subprocess.CompletedProcess:
    """torchrun: 2 CPU processes, one thread each; the first run on a machine compiles DeepSpeed's shm op."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DS_BUILD_OPS": "0",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               "--out", str(out), "--zero-stage", str(zero_stage), "--steps", str(STEPS), *extra]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    (out / "torchrun.log").write_text(proc.stdout + proc.stderr)
    return proc


def drawn(out: Path, rank: int) -> list[int]:
    return [int(i) for i in (out / f"batches_rank{rank}.txt").read_text().split()]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory) -> dict:
    """The torch backend in one process, each micro-batch the two ranks' micro-batches side by side."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ds_worker.stage_config(zero_stage=0, steps=STEPS)
    cfg.backend, cfg.batch_size = "torch", 2 * cfg.batch_size
    model = ds_worker.tiny_qwen3(cfg.seed)

    def both_ranks(index: int) -> dict:
        parts = [ds_worker.synthetic_batch(2 * index + rank, cfg.batch_size // 2) for rank in (0, 1)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    trainer = Trainer(model, cfg, ds_worker.lm_loss, both_ranks, tmp_path_factory.mktemp("reference"), "reference")
    trainer.train()
    torch.set_num_threads(threads)
    return {"losses": [h["loss"] for h in trainer.history], "grad_norms": [h["grad_norm"] for h in trainer.history],
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def assert_same_run(out: Path, reference: dict) -> None:
    losses = [h["loss"] for h in history(out)]
    torch.testing.assert_close(losses, reference["losses"], atol=1e-5, rtol=0)
    grad_norms = [h["grad_norm"] for h in history(out)]  # before clipping, over both ranks' gradients
    torch.testing.assert_close(grad_norms, reference["grad_norms"], atol=1e-4, rtol=0)
    saved = Qwen3ForCausalLM.from_pretrained(out / "model").state_dict()
    for name, tensor in reference["weights"].items():
        assert saved[name].shape == tensor.shape, name
        torch.testing.assert_close(saved[name], tensor, atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    proc = run_worker(out, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_zero2_loss_decreases(zero2):
    losses = [h["loss"] for h in history(zero2)]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.5, losses


def test_zero2_ranks_draw_different_batches(zero2):
    rank0, rank1 = drawn(zero2, 0), drawn(zero2, 1)
    assert rank0 == list(range(0, 2 * 2 * STEPS, 2))  # (step * grad_accum + micro) * world_size + rank
    assert rank1 == list(range(1, 2 * 2 * STEPS, 2))


def test_zero2_checkpoint_equals_engine_weights(zero2):
    saved = Qwen3ForCausalLM.from_pretrained(zero2 / "model").state_dict()
    engine = load_file(str(zero2 / "engine_rank1.safetensors"))  # rank 1's engine, after the last step
    assert set(engine) <= set(saved)
    for name, tensor in engine.items():
        assert torch.equal(saved[name], tensor), name


def test_zero2_trains_like_torch_backend_on_the_union_of_batches(zero2, torch_reference):
    assert_same_run(zero2, torch_reference)


def test_zero3_killed_run_resumes_and_saves_the_full_weights(tmp_path, torch_reference):
    """ZeRO-3 partitions the weights: the run dies after step 4's resume point, resumes, and saves them whole."""
    killed = run_worker(tmp_path, 3, "--save-every", "4", "--crash-after-step", "4")
    assert killed.returncode != 0
    assert json.loads((tmp_path / "state" / "last" / "trainer_state.json").read_text())["step"] == 4
    resumed = run_worker(tmp_path, 3, "--save-every", "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert drawn(tmp_path, 0)[0] == 4 * 2 * 2  # the resumed run replays from step 4's first micro-batch
    assert [h["step"] for h in history(tmp_path)] == list(range(1, STEPS + 1))
    assert_same_run(tmp_path, torch_reference)


# -- the launcher ---------------------------------------------------------------------------------------------


def test_fac_train_starts_its_processes_and_rank_0_saves(tmp_path):
    """`fac train base-llm` with processes: 2 re-runs itself under torchrun; one checkpoint, trained by both."""
    from fac.data.text_tokenizer import train_tokenizer

    docs = ["anna lives in paris", "ben lives in rome", "anna likes tea", "ben likes milk"]
    world = tmp_path / "world"
    world.mkdir()
    (world / "corpus.txt").write_text("\n".join(docs) + "\n")
    (world / "text_qa.jsonl").write_text(json.dumps({"id": "q0", "question": "where does anna live",
                                                      "answer": "paris"}) + "\n")
    train_tokenizer(docs, vocab_size=300, out_dir=tmp_path / "tokenizer")
    params = {"stage": {"steps": 4, "lr": 1e-2, "batch_size": 2, "save_every": 2, "backend": "deepspeed",
                        "zero_stage": 2, "processes": 2},
              "model": {"llm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                "rope_theta": 10000}}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "DS_BUILD_OPS": "0",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "fac", "train", "base-llm", "--params", json.dumps(params),
                           "--world", str(world), "--tokenizer", str(tmp_path / "tokenizer"),
                           "--out", str(tmp_path / "base_llm"), "--state-root", str(tmp_path / "state"),
                           "--threads", "2"], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed.run" in proc.stderr and "--nproc_per_node=2" in proc.stderr
    summary = json.loads((tmp_path / "base_llm" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert Qwen3ForCausalLM.from_pretrained(tmp_path / "base_llm").config.hidden_size == 32
    assert not list((tmp_path / "state").iterdir())  # the stage forgot its resume points once saved


# -- the launcher's decision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, visible, expected", [
    ({"backend": "torch", "gpus": 1, "processes": 4}, 8, 1),  # the torch backend is one process
    ({"backend": "torch", "processes": 4}, 0, 1),
    ({"backend": "deepspeed", "gpus": 2}, 4, 2),  # one process per GPU asked for
    ({"backend": "deepspeed", "gpus": 2, "precision": "bf16"}, 2, 2),
    ({"backend": "deepspeed", "gpus": 0, "processes": 3}, 4, 3),  # no GPUs asked for: CPU processes, CUDA or not
    ({"backend": "deepspeed"}, 0, 1),  # processes defaults to 1
])
def test_process_count(stage, visible, expected, cuda_devices):
    cuda_devices(visible)
    assert process_count(stage) == expected


def test_process_count_names_the_wrong_value(cuda_devices):
    cuda_devices(2)
    with pytest.raises(ValueError, match=r"stage x: gpus: 4 asks for more CUDA devices .*2 CUDA device\(s\) visible"):
        process_count({"backend": "deepspeed", "gpus": 4}, "stage x")
    with pytest.raises(ValueError, match="stage x: the torch backend trains in one process on at most one GPU"):
        process_count({"backend": "torch", "gpus": 2}, "stage x")
    with pytest.raises(ValueError, match="'processes' must be at least 1.*got 0"):
        process_count({"backend": "deepspeed", "processes": 0}, "stage x")


def test_process_count_without_cuda_is_an_error_not_a_cpu_run(cuda_devices):
    """A stage that asks for GPUs on a machine without CUDA fails naming what it saw; it never trains on the CPU."""
    cuda_devices(0)
    with pytest.raises(ValueError, match=r"stage x: gpus: 8 asks for CUDA.*is_available\(\) is False.*"
                                         r"CUDA_VISIBLE_DEVICES=.*set gpus: 0 to run on CPU"):
        process_count({"backend": "deepspeed", "gpus": 8, "processes": 2}, "stage x")
    with pytest.raises(ValueError, match="stage x: precision bf16 needs a GPU.*set precision: fp32 to run on CPU"):
        process_count({"backend": "deepspeed", "gpus": 0, "processes": 2, "precision": "bf16"}, "stage x")


def test_launch_command_reruns_fac_under_torchrun():
    argv = ["train", "base-llm", "--params", "{}", "--out", "x"]
    assert launch_command(argv, 2) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc_per_node=2", "-m", "fac", *argv]


def test_threads_are_shared_among_local_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads_per_process(8) == 4
    assert threads_per_process(1) == 1
    assert threads_per_process(None) is None
