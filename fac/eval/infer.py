"""`fac infer`: answer one spoken question from a wav file with a DRSR checkpoint (text, and speech tokens)."""
from __future__ import annotations

import torch

from fac.data.audio import read_wav
from fac.data.text_tokenizer import SYSTEM_PROMPTS
from fac.model import load_checkpoint
from fac.model.processing import SpecialIds, build_prompt, log_mel
from fac.train.stages import load_tokenizer


def answer(model_dir: str, audio_path: str, mode: str = "s2t", max_new_tokens: int = 32, sample: bool = False,
           seed: int = 0) -> dict:
    model = load_checkpoint(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    special = SpecialIds.from_tokenizer(tokenizer, model.config)
    features, mask = log_mel(read_wav(audio_path), n_mels=model.config.audio_config.num_mel_bins)
    system = tokenizer.encode(SYSTEM_PROMPTS["s2m"], add_special_tokens=False)
    prompt = build_prompt(system, features[0, :, : int(mask[0].sum())], special, model.config.audio_config.group_size)
    # The official inference settings: greedy text; speech sampled (temperature 0.8, top-p 0.9, penalty 1.2).
    sampling = dict(speech_do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.2) if sample else {}
    out = model.generate_speech_text(**prompt, mode=mode, max_new_tokens=max_new_tokens,
                                     generator=torch.Generator().manual_seed(seed), **sampling)
    text_ids = out.text_ids[0].tolist()
    codes = [int(c) for c in out.speech_ids[0].tolist()] if out.speech_ids is not None else []
    n_codes = model.config.audio_config.bos_token_id  # speech specials come right after the codes
    return {"text": tokenizer.decode(text_ids, skip_special_tokens=True).strip(), "text_ids": text_ids,
            "speech_tokens": [c for c in codes if c < n_codes], "mode": mode}


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
