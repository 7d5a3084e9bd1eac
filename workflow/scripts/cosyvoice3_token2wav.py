"""CosyVoice 3's token2wav as fac's `detokenizer.command` (fac.data.detokenizer.CommandDetokenizer): S3 codes and a
speaker embedding -> 24 kHz speech, for a batch of answers per run.

Run it with the Python of a CosyVoice 3 install (its repository and third_party/Matcha-TTS on PYTHONPATH), e.g.

    detokenizer:
      command: >-
        PYTHONPATH=/opt/CosyVoice:/opt/CosyVoice/third_party/Matcha-TTS /opt/CosyVoice/.venv/bin/python
        workflow/scripts/cosyvoice3_token2wav.py --model-dir models/Fun-CosyVoice3-0.5B-2512
        --units {units} --speaker {speaker} --out {out} --sample-rate {sample_rate}

It loads the model once (`cosyvoice.cli.cosyvoice.CosyVoice3`), then for each line `{"id": ..., "units": [...]}` of
`--units` runs what CosyVoice's own non-streaming inference runs after its LLM: `model.token2wav` (the flow from
the codes to mel, conditioned on the speaker embedding, with an empty prompt, then the HiFT vocoder, finalize=True),
and writes `<id>.wav` (mono 16-bit PCM at the model's rate) into `--out`. The speaker file is a tensor or array of
CosyVoice's 192-dim campplus embedding (`.pt`: torch.save, e.g. an entry of spk2info.pt's "embedding"; `.npy`).
Written against CosyVoice's repository at commit ace7c47 (cosyvoice/cli/model.py, CosyVoice3Model.token2wav); only
the standard library, torch and numpy are imported besides CosyVoice itself."""
from __future__ import annotations

import argparse
import json
import sys
import uuid
import wave
from pathlib import Path

import numpy as np
import torch


def load_speaker(path: Path) -> torch.Tensor:
    """The embedding as a [1, D] float tensor (what CosyVoice's frontend hands the flow)."""
    if path.suffix == ".npy":
        value = torch.from_numpy(np.load(path))
    else:
        value = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(value, dict) and "embedding" in value:  # an entry of spk2info.pt
            value = value["embedding"]
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        raise ValueError(f"{path}: not a speaker embedding tensor; expected CosyVoice's 192-dim campplus embedding")
    return value.float().reshape(1, -1)


def speak(model, units: list[int], embedding: torch.Tensor) -> np.ndarray:
    """One answer's codes -> float32 samples, as CosyVoice3Model.tts runs token2wav once its LLM is done."""
    key = str(uuid.uuid1())
    model.hift_cache_dict[key] = None
    try:
        speech = model.token2wav(token=torch.tensor([units], dtype=torch.int32),
                                 prompt_token=torch.zeros(1, 0, dtype=torch.int32), prompt_feat=torch.zeros(1, 0, 80),
                                 embedding=embedding, token_offset=0, uuid=key, finalize=True)
    finally:
        model.hift_cache_dict.pop(key, None)
    return speech[0].detach().float().cpu().numpy()


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a CosyVoice 3 model folder (cosyvoice3.yaml, flow.pt, hift.pt)")
    parser.add_argument("--units", required=True, type=Path, help="JSON Lines: {\"id\": ..., \"units\": [...]} per answer")
    parser.add_argument("--speaker", required=True, type=Path, help="the speaker embedding (.pt or .npy)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write <id>.wav into")
    parser.add_argument("--sample-rate", type=int, help="the rate fac expects; refused when the model's differs")
    args = parser.parse_args(argv)
    from cosyvoice.cli.cosyvoice import CosyVoice3

    cosyvoice = CosyVoice3(args.model_dir)
    if args.sample_rate and args.sample_rate != cosyvoice.sample_rate:
        print(f"{args.model_dir} speaks at {cosyvoice.sample_rate} Hz, but detokenizer.sample_rate is "
              f"{args.sample_rate}", file=sys.stderr)
        return 2
    embedding = load_speaker(args.speaker)
    args.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for number, line in enumerate(args.units.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            write_wav(args.out / f"{record['id']}.wav", speak(cosyvoice.model, record["units"], embedding),
                      cosyvoice.sample_rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
