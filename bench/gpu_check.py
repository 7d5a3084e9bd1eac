"""GPU check (run by hand on a CUDA machine; CI has none): the model and the torch training backend on CUDA.

1. Conformance on the GPU: the fixture in tests/data/conformance/ (the official model's outputs, computed on
   CPU in fp32) must be reproduced on CUDA in fp32 within the fixture's tolerance, and greedy generation must
   give the same tokens.
2. Training on the GPU: the Trainer's torch backend, for a stage with gpus: 1, moves the model and every batch to
   CUDA; 40 steps on the fixture's training batch in bf16 autocast must lower the loss; a killed-and-resumed run
   (resume point at step 20, optimizer state loaded onto the GPU) must end with the same loss as an
   uninterrupted one.

    python bench/gpu_check.py        # prints one line per check and exits non-zero on a failure
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT / "tests" / "data" / "conformance"

from fac.model import FunAudioChatForConditionalGeneration  # noqa: E402
from fac.train.trainer import StageConfig, Trainer  # noqa: E402


def section(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def cuda(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def conformance() -> list[str]:
    failures = []
    model = FunAudioChatForConditionalGeneration.from_pretrained(FIXTURE).eval().cuda()
    inputs, expected = load_file(FIXTURE / "inputs.safetensors"), load_file(FIXTURE / "outputs.safetensors")
    with torch.no_grad():
        out = model(**cuda(section(inputs, "train.")))
    for name in ("loss", "text_loss", "speech_loss"):
        err = abs(getattr(out, name).item() - expected[f"train.{name}"].item())
        print(f"conformance {name}: |cuda - official| = {err:.2e}")
        if err > 1e-4:
            failures.append(name)
    for name, key in (("text_logits", "train.text_logits"), ("speech_logits", "train.speech_logits")):
        err = (getattr(out, name).float().cpu() - expected[key]).abs().max().item()
        print(f"conformance {name}: max |cuda - official| = {err:.2e}")
        if err > 1e-3:
            failures.append(name)
    gen = model.generate_speech_text(**cuda(section(inputs, "gen.")), mode="s2m", max_new_tokens=8,
                                     force_text_abos=True, text_do_sample=False, speech_do_sample=False,
                                     eos_token_id=258, pad_token_id=256, output_logits=True)
    same = (torch.equal(gen.text_ids.cpu(), expected["gen.generated_text_ids"])
            and torch.equal(gen.speech_ids.cpu(), expected["gen.generated_speech_ids"]))
    print(f"conformance greedy text and speech ids on cuda equal the official: {same}")
    if not same:
        failures.append("generation")
    return failures


def training() -> list[str]:
    failures = []
    batch = section(load_file(FIXTURE / "inputs.safetensors"), "train.")

    def run(state_dir: Path, steps: int, stop_at: int | None = None) -> tuple[float, float, str]:
        torch.manual_seed(0)
        model = FunAudioChatForConditionalGeneration.from_pretrained(FIXTURE)
        cfg = StageConfig(steps=steps, lr=1e-3, min_lr=1e-4, warmup_ratio=0.1, batch_size=1, save_every=10,
                          precision="bf16", gpus=1, seed=1)
        trainer = Trainer(model, cfg, lambda m, b: (m(**b).loss, {}), lambda step: batch, state_dir, "gpu_check")
        if stop_at is not None:  # a "kill" after the resume point at stop_at: train that far, then stop
            trainer.cfg = StageConfig(**{**cfg.__dict__, "steps": stop_at})
            trainer.train()
            return float("nan"), float("nan"), str(next(model.parameters()).device)
        trainer.train()
        return trainer.history[0]["loss"], trainer.history[-1]["loss"], str(next(model.parameters()).device)

    with tempfile.TemporaryDirectory() as tmp:
        first, last, device = run(Path(tmp) / "a", 40)
        print(f"training bf16 on {device}: loss {first:.4f} -> {last:.4f}")
        if not device.startswith("cuda") or not last < first:
            failures.append("training")
        run(Path(tmp) / "b", 40, stop_at=20)
        _, resumed_last, _ = run(Path(tmp) / "b", 40)
        print(f"resumed at step 20 on the GPU: final loss {resumed_last:.6f} vs uninterrupted {last:.6f}")
        if abs(resumed_last - last) > 1e-3:
            failures.append("resume")
    return failures


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 2
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    failures = conformance() + training()
    print("FAILED: " + ", ".join(failures) if failures else "all GPU checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
