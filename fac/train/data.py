"""Training data: manifests and the world's text turned into model inputs, sampled as a weighted mixture.

Batches are a pure function of the step (see trainer.step_rng), so a resumed run sees the same batches.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from fac.data.audio import read_wav
from fac.data.manifests import parse_speech_tokens, read_manifest
from fac.data.text_tokenizer import SYSTEM_PROMPTS
from fac.model.processing import IGNORE_INDEX, Example, SpecialIds, build_example, build_prompt, collate, log_mel
from fac.train.trainer import step_rng

log = logging.getLogger("fac.train")


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def chat_ids(tokenizer, system: str, user: str, assistant: str | None) -> tuple[list[int], list[int]]:
    """A text conversation in the template; labels cover the assistant reply and its `<|im_end|>\\n`."""
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = encode_text(tokenizer, prompt)
    if assistant is None:
        return prompt_ids, [IGNORE_INDEX] * len(prompt_ids)
    reply_ids = encode_text(tokenizer, f"{assistant}<|im_end|>\n")
    return prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids


class TextData:
    """The base LLM's text: every document (plain LM loss) and every text QA pair (loss on the answer)."""

    def __init__(self, world_dir: str | Path, tokenizer):
        world_dir = Path(world_dir)
        self.tokenizer = tokenizer
        docs = [d for d in (world_dir / "corpus.txt").read_text().splitlines() if d.strip()]
        qa = [json.loads(line) for line in (world_dir / "text_qa.jsonl").read_text().splitlines() if line]
        if not docs or not qa:
            raise ValueError(f"{world_dir}: corpus.txt or text_qa.jsonl is empty")
        self.examples: list[tuple[list[int], list[int]]] = []
        for doc in docs:
            ids = encode_text(tokenizer, doc) + [tokenizer.eos_token_id]
            self.examples.append((ids, list(ids)))
        for pair in qa:
            self.examples.append(chat_ids(tokenizer, SYSTEM_PROMPTS["s2t"], pair["question"], pair["answer"]))
        self.qa = qa

    def batch(self, step: int, batch_size: int, seed: int) -> dict:
        rng = step_rng(seed, step)
        chosen = [self.examples[rng.randrange(len(self.examples))] for _ in range(batch_size)]
        length = max(len(ids) for ids, _ in chosen)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, (ids, lab) in enumerate(chosen):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


class FeatureCache:
    """Log-mel features of every clip, computed once per process (clips are short and few)."""

    def __init__(self, data_root: str | Path, n_mels: int):
        self.data_root = Path(data_root)
        self.n_mels = n_mels
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, rel_path: str) -> torch.Tensor:
        if rel_path not in self._cache:
            features, mask = log_mel(read_wav(self.data_root / rel_path), n_mels=self.n_mels)
            self._cache[rel_path] = features[0, :, : int(mask[0].sum())]  # [M, T]
        return self._cache[rel_path]


def load_records(manifest_dir: str | Path, name: str) -> list[dict]:
    return read_manifest(Path(manifest_dir) / f"{name}.jsonl")


class SpokenRecord:
    """One manifest record unpacked: user clip path, assistant text, assistant speech codes, meta."""

    def __init__(self, record: dict, source: str):
        audios = [json.loads(a) for a in record["audio"]]
        if not audios or not audios[0].get("path"):
            raise ValueError(f"{source}: record {record.get('meta', {}).get('id')} has no user audio path")
        self.system = record["system"]
        self.user_path = audios[0]["path"]
        self.meta = record.get("meta", {})
        assistant = record["messages"][-1]["content"]
        if len(audios) > 1:
            self.text = audios[1]["text"]
            self.codes = parse_speech_tokens(audios[1]["token"])
        else:
            self.text, self.codes = assistant, None


class SpokenData:
    """Manifests for the DRSR model, sampled by weight; examples built as the official pipeline does."""

    def __init__(self, manifest_dir: str | Path, mixture: dict[str, float], features: FeatureCache, tokenizer,
                 special: SpecialIds, group_size: int):
        if not mixture:
            raise ValueError("stage data mixture is empty: give at least one manifest name with a weight")
        self.names = list(mixture)
        weights = torch.tensor([float(mixture[n]) for n in self.names])
        if weights.sum() <= 0:
            raise ValueError(f"stage data mixture {mixture} has no positive weight")
        self.cum = (weights / weights.sum()).cumsum(0).tolist()
        self.records = {n: [SpokenRecord(r, f"{manifest_dir}/{n}.jsonl") for r in load_records(manifest_dir, n)]
                        for n in self.names}
        self.features, self.tokenizer, self.special, self.group_size = features, tokenizer, special, group_size
        self._system_ids: dict[str, list[int]] = {}
        for name in self.names:  # compute features up front, with a progress bar, not in the first steps
            for rec in tqdm(self.records[name], desc=f"features {name}", unit="clip"):
                self.features(rec.user_path)

    def example(self, rec: SpokenRecord) -> Example:
        if rec.system not in self._system_ids:
            self._system_ids[rec.system] = encode_text(self.tokenizer, rec.system)
        return build_example(self._system_ids[rec.system], self.features(rec.user_path),
                             encode_text(self.tokenizer, rec.text), rec.codes, self.special, self.group_size)

    def batch(self, step: int, batch_size: int, seed: int) -> dict:
        rng = step_rng(seed, step)
        chosen = []
        for _ in range(batch_size):
            u = rng.random()
            name = next(n for n, c in zip(self.names, self.cum) if u <= c) if u < self.cum[-1] else self.names[-1]
            records = self.records[name]
            chosen.append(records[rng.randrange(len(records))])
        return collate([self.example(r) for r in chosen], self.special)

    def prompt(self, rec: SpokenRecord, system: str | None = None) -> dict:
        """Inference inputs for one record (the official processor's layout), system prompt overridable."""
        system = system or rec.system
        if system not in self._system_ids:
            self._system_ids[system] = encode_text(self.tokenizer, system)
        return build_prompt(self._system_ids[system], self.features(rec.user_path), self.special, self.group_size)
