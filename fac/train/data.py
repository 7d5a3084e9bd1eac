"""Training data: manifests (of any number of turns) and the world's text turned into model inputs, sampled as a
weighted mixture, one conversation per row or packed (fac.train.packing).

Batches are a pure function of the step (see trainer.step_rng), so a resumed run sees the same batches.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from fac.data.audio import read_wav
from fac.data.imported import Refused, record_turns
from fac.data.manifests import read_manifest
from fac.data.text_tokenizer import SYSTEM_PROMPTS
from fac.model.processing import (IGNORE_INDEX, SPEECH_DELAY, SPEECH_TOKENS_PER_SECOND, AssistantTurn, Example,
                                   SpecialIds, UserTurn, build_conversation, build_prompt, collate, log_mel)
from fac.train.packing import fill_rows, pack, pack_token_rows
from fac.train.trainer import EpochOrder, step_rng

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


def dialogue_ids(tokenizer, system: str, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """A text conversation of several turns (user, assistant) in the template; labels cover every reply."""
    ids, labels = chat_ids(tokenizer, system, *turns[0])
    for user, assistant in turns[1:]:
        prompt = encode_text(tokenizer, f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
        reply = encode_text(tokenizer, f"{assistant}<|im_end|>\n")
        ids, labels = ids + prompt + reply, labels + [IGNORE_INDEX] * len(prompt) + reply
    return ids, labels


class TextData:
    """The base LLM's text: every document (plain LM loss) and every text QA pair (loss on the answer).

    With `slot_questions` ({prob, noise}), a share `prob` of the examples are text QA pairs whose question
    comes the way a spoken question reaches the LLM: inside `<|audio_bos|>`...`<|audio_eos|>` of the user
    turn, one input per 25/k Hz slot, i.e. each word repeated 1-3 times at k = 5 (5/k times that at another
    k), `<|sil|>` before, between and after words (the encoder's CTC blank is tied to `<|sil|>`). The batch then carries `slot_mask` (those positions)
    and `noise_seed`: the loss adds Gaussian noise of up to `noise` x the embedding's norm there, as the
    encoder's features are near, not at, the word embeddings. Measured in the tiny world: with this LLM and
    the cosine-CTC encoder, the assembled model answers spoken questions about facts it only read at 0.45
    before any speech-text training, against 0.07 for an LLM trained on plain text only.

    With `spoken_reply` (a share of the slot examples), the question comes with the speech-to-speech
    system prompt and the answer in the text stream of a spoken reply, as the DRSR model's assistant turn
    lays it out: `<|audio_bos|>`, the answer's tokens one per slot, `<|sil|>` for the rest of its speech
    (the 10-token speech delay plus 0.3-1.5 s at 25 Hz, in slots of k), `<|audio_eos|>` (noise there too,
    where the speech codes' embeddings will be). Measured: an LLM that never saw this layout starts stage 1
    at a text loss of 10, and the updates that learn it cost the spoken answers to facts seen only in text
    (0.54 -> 0.15); learning the layout first on text QA of every fact, then stage 1, kept 0.39. With it
    in the base LLM (params/default.yaml): init 0.33, stage 1 0.27, merged 0.34, stage 2 0.35.

    With `dialogues` (a share of the examples), text QA comes as a dialogue of two or three turns whose last question
    names no one and refers back to the person the first named (`referring`: "that person" over one turn, "the
    first person" over a turn about someone else), every fact's pairs alike (plain text, as a pretrained LLM has read
    dialogues): the speech stages' multi-turn dialogues then ask the LLM for what it can do in text.

    With `packing`, a batch's examples share rows of `max_length` positions, or of its longest example's where
    that is longer (fac.train.packing.pack_token_rows: the same loss over the same label tokens, without the
    padding of one row each), and the batch carries segment_ids, so that the slot noise is, token for token, the
    noise of one row each (fac.train.stages.slot_noise).
    """

    def __init__(self, world_dir: str | Path, tokenizer, slot_questions: dict | None = None, group_size: int = 5,
                 packing: bool = False, max_length: int | None = None, dialogues: float = 0.0):
        if packing and not max_length:
            raise ValueError("base_llm packing: give max_length, the length of a packed row")
        self.packing, self.max_length = packing, max_length
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
        # Held out means held out: the speech-test facts reach the base LLM as plain text only (documents and text QA),
        # never in the layouts a spoken question or a spoken reply takes.
        self.slot_qa = [pair for pair in qa if pair.get("split") != "test"]
        self.dialogues = float(dialogues)
        self.by_entity: dict[str, list[dict]] = {}
        for pair in qa:
            self.by_entity.setdefault(pair.get("entity"), []).append(pair)
        if self.dialogues and (None in self.by_entity or len(self.by_entity) < 2
                               or any("referring" not in pair for pair in qa)):
            raise ValueError(f"{world_dir / 'text_qa.jsonl'}: dialogues need each pair's entity and referring "
                             "questions, and two entities at least (rebuild the world)")
        self.slot = dict(slot_questions) if slot_questions and slot_questions.get("prob", 0) > 0 else None
        if self.slot and not self.slot_qa:
            raise ValueError(f"{world_dir / 'text_qa.jsonl'}: every pair is of a speech-test fact; slot questions "
                             "take the speech-train facts' pairs (expected some with split 'train')")
        self.slots_per_step = 5 / group_size  # slots per 0.2 s (one slot at the paper's k = 5)
        if self.slot:
            vocab = tokenizer.get_vocab()
            self.sil, self.audio_bos, self.audio_eos = vocab["<|sil|>"], vocab["<|audio_bos|>"], vocab["<|audio_eos|>"]
            self._prefix = {mode: encode_text(tokenizer, f"<|im_start|>system\n{SYSTEM_PROMPTS[mode]}<|im_end|>\n"
                                                         "<|im_start|>user\n") for mode in ("s2t", "s2m")}
            self._suffix = encode_text(tokenizer, "<|im_end|>\n<|im_start|>assistant\n")
            self._turn_end = encode_text(tokenizer, "<|im_end|>\n")
            self.group_size = group_size

    def slot_example(self, rng, pair: dict) -> tuple[list[int], list[int]]:
        """A text QA pair with its question laid out as audio slots (see the class docstring)."""
        def span(n: int) -> int:
            return math.ceil(n * self.slots_per_step)

        slots = [self.sil] * span(rng.randint(0, 2))
        for word in encode_text(self.tokenizer, " " + pair["question"]):
            slots += [word] * span(rng.choice((1, 1, 2, 2, 3)))
            if rng.random() < 0.3:
                slots += [self.sil] * span(1)
        slots += [self.sil] * span(rng.randint(0, 2))
        spoken = rng.random() < self.slot.get("spoken_reply", 0.0)
        prompt = self._prefix["s2m" if spoken else "s2t"] + [self.audio_bos] + slots + [self.audio_eos] + self._suffix
        if spoken:
            reply = self.spoken_reply(rng, encode_text(self.tokenizer, pair["answer"]))
        else:
            reply = encode_text(self.tokenizer, f"{pair['answer']}<|im_end|>\n")
        return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply

    def dialogue_example(self, rng, pair: dict) -> tuple[list[int], list[int]] | None:
        """`pair` asked by reference after a question about another fact of its person (see the class docstring),
        and with distance 2 one about someone else between them; None when its person has no other fact."""
        named = [q for q in self.by_entity[pair["entity"]] if q["fact"] != pair["fact"]]
        if not named:
            return None
        distance = rng.choice((1, 2))
        earlier = [rng.choice(named)]
        if distance == 2:
            others = [e for e in self.by_entity if e != pair["entity"]]
            earlier.append(rng.choice(self.by_entity[rng.choice(others)]))
        turns = [(q["question"], q["answer"]) for q in earlier] + [(pair["referring"][str(distance)], pair["answer"])]
        return dialogue_ids(self.tokenizer, SYSTEM_PROMPTS["s2t"], turns)

    def spoken_reply(self, rng, text_ids: list[int]) -> list[int]:
        """The text stream of a spoken reply (see the class docstring): text one token per slot, then `<|sil|>`."""
        speech = SPEECH_DELAY + round(SPEECH_TOKENS_PER_SECOND * rng.uniform(0.3, 1.5))  # tokens after the delay
        n_slots = max(len(text_ids) + 1, math.ceil(speech / self.group_size))
        stream = text_ids + [self.sil] * (n_slots - len(text_ids))
        return [self.audio_bos, *stream, self.audio_eos, *self._turn_end]

    def batch(self, step: int, batch_size: int, seed: int) -> dict:
        rng = step_rng(seed, step)
        chosen = []
        for _ in range(batch_size):
            example = None
            if self.slot and rng.random() < self.slot["prob"]:
                example = self.slot_example(rng, self.slot_qa[rng.randrange(len(self.slot_qa))])
            elif self.dialogues and rng.random() < self.dialogues:
                example = self.dialogue_example(rng, self.qa[rng.randrange(len(self.qa))])
            chosen.append(example or self.examples[rng.randrange(len(self.examples))])
        pad = self.tokenizer.pad_token_id
        if self.packing:  # an example longer than max_length widens the rows of its batch (k = 1's questions)
            batch = pack_token_rows(chosen, max(self.max_length, max(len(ids) for ids, _ in chosen)), pad)
            input_ids = batch["input_ids"]
        else:  # one example per row
            input_ids, labels, _, segments = fill_rows([[example] for example in chosen], pad)
            batch = {"input_ids": input_ids, "attention_mask": (segments >= 0).long(), "labels": labels}
        if self.slot and self.slot.get("noise", 0) > 0:
            opened = (input_ids == self.audio_bos).long().cumsum(1) - (input_ids == self.audio_eos).long().cumsum(1)
            batch["slot_mask"] = (opened > 0) & (input_ids != self.audio_bos)
            batch["noise_seed"] = torch.tensor(rng.randrange(2**31))
        return batch


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
    """One manifest record unpacked (fac.data.imported.record_turns): every turn in order, and, for the single-turn
    tasks, the first user clip and the last assistant reply (its text and speech codes, or None for text)."""

    def __init__(self, record: dict, source: str):
        try:
            parsed = record_turns(record)
        except Refused as err:
            raise ValueError(f"{source}: record {(record.get('meta') or {}).get('id')}: {err}") from err
        self.system, self.turns, self.meta = parsed["system"], parsed["turns"], parsed["meta"]
        clips = [p["audio"] for t in self.turns if t["role"] == "user" for p in t["pieces"] if "audio" in p]
        if not clips:
            raise ValueError(f"{source}: record {self.meta.get('id')} has no user audio")
        self.user_path, self.clips = clips[0], clips
        last = self.turns[-1]
        self.text, self.codes = last["text"], last["codes"]
        # The recording of a spoken reply (its audio entry's ref_path, relative to the data folder), or "".
        entries = record.get("audio") or []
        reply = entries[-1] if self.codes is not None and entries else {}
        reply = json.loads(reply) if isinstance(reply, str) else reply
        self.reply_ref_path = (reply.get("ref_path") or "") if isinstance(reply, dict) else ""

    @property
    def single_turn(self) -> bool:
        """One user turn holding exactly one clip (the official single-turn layout)."""
        return len(self.turns) == 2 and len(self.turns[0]["pieces"]) == 1


class SpokenData:
    """Manifests for the DRSR model, sampled by weight; examples built as the official pipeline does."""

    def __init__(self, manifest_dir: str | Path, mixture: dict[str, float], features: FeatureCache, tokenizer,
                 special: SpecialIds, group_size: int, max_length: int | None = None, packing: bool = False):
        if packing and not max_length:
            raise ValueError("packing: give the stage's max_length, the length of a packed row")
        self.packing, self.max_length = packing, max_length
        if not mixture:
            raise ValueError("stage data mixture is empty: give at least one manifest name with a weight")
        self.names, self.mixture = list(mixture), {n: float(w) for n, w in mixture.items()}
        self.order, self.flat = None, []
        weights = torch.tensor([float(mixture[n]) for n in self.names])
        if weights.sum() <= 0:
            raise ValueError(f"stage data mixture {mixture} has no positive weight")
        self.cum = (weights / weights.sum()).cumsum(0).tolist()
        self.records = {n: [SpokenRecord(r, f"{manifest_dir}/{n}.jsonl") for r in load_records(manifest_dir, n)]
                        for n in self.names}
        self.features, self.tokenizer, self.special, self.group_size = features, tokenizer, special, group_size
        self._system_ids: dict[str, list[int]] = {}
        for name in self.names:  # compute features up front, with a progress bar, not in the first steps
            for rec in tqdm(self.records[name], desc=f"features {name}", unit="record"):
                for clip in rec.clips:
                    self.features(clip)
        self.dropped = self._drop_longer_than(max_length) if max_length else {}

    def _drop_longer_than(self, max_length: int) -> dict[str, int]:
        """`max_length`: conversations longer than that many LLM positions leave the stage's data, counted and logged.
        They are dropped, not cut: a cut inside an audio span would leave speech without the slots it is laid on."""
        dropped = {}
        for name in self.names:
            keep = [rec for rec in self.records[name] if len(self.example(rec).input_ids) <= max_length]
            if len(keep) < len(self.records[name]):
                dropped[name] = len(self.records[name]) - len(keep)
                log.warning("%s: %d of %d conversations are longer than max_length %d positions; left out",
                            name, dropped[name], len(self.records[name]), max_length)
            if not keep:
                raise ValueError(f"{name}: every conversation is longer than max_length {max_length}")
            self.records[name] = keep
        return dropped

    def _system(self, system: str) -> list[int]:
        if system not in self._system_ids:
            self._system_ids[system] = encode_text(self.tokenizer, system)
        return self._system_ids[system]

    def turns(self, turns: list[dict], spoken_history: bool = True) -> list:
        """Parsed turns as the model's turns (text encoded, clips as features). Without `spoken_history` an
        assistant turn's speech is left out (its transcript stays): a generation prompt's history carries the
        replies' text, as generation has no transcript input for a past spoken reply."""
        out = []
        for turn in turns:
            if turn["role"] == "user":
                out.append(UserTurn([self.features(p["audio"]) if "audio" in p else encode_text(self.tokenizer, p["text"])
                                     for p in turn["pieces"]]))
            else:
                out.append(AssistantTurn(encode_text(self.tokenizer, turn["text"]),
                                         turn["codes"] if spoken_history else None))
        return out

    def example(self, rec: SpokenRecord) -> Example:
        """The training conversation: every turn, labels on every assistant turn."""
        return build_conversation(self._system(rec.system), self.turns(rec.turns), self.special, self.group_size)

    def passes(self, seed: int) -> None:
        """Draw batches as passes without replacement (a stage with `epochs`): one pass holds every record of a
        manifest of weight 1, each twice at weight 2, and a fixed share of them at a fractional weight."""
        self.flat = []
        for name, weight in self.mixture.items():
            records = self.records[name]
            whole, part = int(weight), weight - int(weight)
            self.flat += [(name, i) for _ in range(whole) for i in range(len(records))]
            self.flat += [(name, i) for i in sorted(random.Random(seed).sample(range(len(records)),
                                                                               round(part * len(records))))]
        self.order = EpochOrder(len(self.flat), seed)

    def __len__(self) -> int:
        """Examples in one pass (with `passes`) or records in the mixture."""
        return len(self.flat) if self.order else sum(len(r) for r in self.records.values())

    def batch(self, step: int, batch_size: int, seed: int) -> dict:
        if self.order is not None:
            chosen = [self.records[name][i] for name, i in (self.flat[p] for p in self.order.take(step, batch_size))]
            return self.collate([self.example(r) for r in chosen])
        rng = step_rng(seed, step)
        chosen = []
        for _ in range(batch_size):
            u = rng.random()
            name = next(n for n, c in zip(self.names, self.cum) if u <= c) if u < self.cum[-1] else self.names[-1]
            records = self.records[name]
            chosen.append(records[rng.randrange(len(records))])
        return self.collate([self.example(r) for r in chosen])

    def collate(self, examples: list[Example]) -> dict:
        """One row per conversation, or with `packing` the batch's conversations packed into rows of at most
        max_length positions (fac.train.packing: same loss and gradients, less padding)."""
        if not self.packing:
            return collate(examples, self.special)
        return pack(examples, self.special, self.max_length)[0]

    def prompt(self, rec: SpokenRecord, system: str | None = None) -> dict:
        """Inference inputs for one record up to its last reply (the official processor's layout for a single
        spoken turn; a multi-turn record's earlier turns as history, see `turns`), system prompt overridable."""
        system_ids = self._system(system or rec.system)
        if rec.single_turn:
            return build_prompt(system_ids, self.features(rec.user_path), self.special, self.group_size)
        example = build_conversation(system_ids, self.turns(rec.turns[:-1], spoken_history=False), self.special,
                                     self.group_size, generation_prompt=True)
        batch = collate([example], self.special)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "speech_ids", "speech_attention_mask",
                                      "input_features", "feature_attention_mask", "feature_exist_mask")}
