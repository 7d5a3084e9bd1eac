"""`fac infer`: answer one spoken question from a wav file with a DRSR checkpoint (text, and speech tokens), and
speak the answer's speech tokens through a detokenizer.

The loaded checkpoint can be kept: `Answerer` holds it with its tokenizer and answers clip after clip, so that
`fac demo` (fac.eval.demo) loads it once (and its detokenizer) and answers every request with them; `answer` and
`speak` load them for one call, as `fac infer` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fac.data.audio import SAMPLE_RATE, read_wav
from fac.data.text_tokenizer import SYSTEM_PROMPTS
from fac.model import load_checkpoint
from fac.model.processing import SpecialIds, build_prompt, log_mel
from fac.train.stages import load_tokenizer


class Answerer:
    """A DRSR checkpoint, its tokenizer and special ids, loaded once: `answer(samples, ...)` per question."""

    def __init__(self, model_dir: str):
        self.model_dir = str(model_dir)
        if not (Path(model_dir) / "config.json").is_file():  # else transformers takes it for a hub id, and says so
            raise FileNotFoundError(f"{model_dir}: no checkpoint here (no config.json); expected a DRSR checkpoint "
                                    "folder, such as results/<experiment>/checkpoints/stage2")
        self.model = load_checkpoint(model_dir).eval()
        self.tokenizer = load_tokenizer(model_dir)
        self.special = SpecialIds.from_tokenizer(self.tokenizer, self.model.config)
        self.system = self.tokenizer.encode(SYSTEM_PROMPTS["s2m"], add_special_tokens=False)

    def answer(self, samples: np.ndarray, mode: str = "s2t", max_new_tokens: int = 32, sample: bool = False,
               seed: int = 0, min_new_tokens: int = 0) -> dict:
        """The answer to one question, `samples` at 16 kHz mono (fac.data.audio.read_wav's or decode_audio's): its text, text ids
        and (mode s2m) the speech tokens, the speech codes below the speech bos. `min_new_tokens`: no end (text or
        speech) before that many steps (generate_speech_text's)."""
        config = self.model.config
        features, mask = log_mel(samples, n_mels=config.audio_config.num_mel_bins)
        prompt = build_prompt(self.system, features[0, :, : int(mask[0].sum())], self.special,
                              config.audio_config.group_size)
        # The official inference settings: greedy text; speech sampled (temperature 0.8, top-p 0.9, penalty 1.2).
        sampling = dict(speech_do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2) if sample else {}
        out = self.model.generate_speech_text(**prompt, mode=mode, max_new_tokens=max_new_tokens,
                                              min_new_tokens=min_new_tokens,
                                              generator=torch.Generator().manual_seed(seed), **sampling)
        text_ids = out.text_ids[0].tolist()
        codes = [int(c) for c in out.speech_ids[0].tolist()] if out.speech_ids is not None else []
        n_codes = config.audio_config.bos_token_id  # speech specials come right after the codes
        return {"text": self.tokenizer.decode(text_ids, skip_special_tokens=True).strip(), "text_ids": text_ids,
                "speech_tokens": [c for c in codes if c < n_codes], "mode": mode}


def answer(model_dir: str, audio_path: str, mode: str = "s2t", max_new_tokens: int = 32, sample: bool = False,
           seed: int = 0, min_new_tokens: int = 0) -> dict:
    """One question from a wav file, the checkpoint loaded for it (`Answerer` keeps it for more)."""
    samples = read_wav(audio_path)  # a bad file fails before the model loads, naming itself
    return Answerer(model_dir).answer(samples, mode=mode, max_new_tokens=max_new_tokens, sample=sample, seed=seed,
                                      min_new_tokens=min_new_tokens)


def speak(units: list[int], out_path: str, detokenizer_dir: str) -> str:
    """The spoken answer: `units` through the detokenizer (fac.data.detokenizer), written to `out_path`."""
    from fac.data.audio import write_wav

    from fac.data.detokenizer import load_detokenizer

    detokenizer = load_detokenizer(detokenizer_dir)
    samples = detokenizer.synthesize(units)
    if not len(samples):
        raise ValueError(f"the answer has no speech units to speak (write {out_path}); expected --mode s2m output")
    write_wav(out_path, samples, detokenizer.sample_rate)
    return out_path
