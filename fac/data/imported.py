"""Data source `manifests`: the user's own conversations in the official SFT recipe's format, taken in.

A record (one JSONL line, LLaMA-Factory "sharegpt" formatting): `system`, `messages` (role/content; user and
assistant turns alternate, user first; an audio placeholder `<|audio_bos|><|AUDIO|><|audio_eos|>` in a content
stands for the next `audio` entry), `audio` (one entry per placeholder, in order, a JSON string or an object:
`path` for a user clip; for an assistant clip `text` (its transcript) and `token` (its speech tokens,
`<|audio_bos|>` x 10 then `[AU0000]`...), or a wav in `path`/`ref_path` to compute them from), and an optional
`meta` (kept; evaluation uses `meta.answer` where it exists). A preference record has, after `messages` (which end
with a user turn), `chosen` and `rejected` (each an assistant message); the audio entries of their placeholders
follow those of `messages`, chosen first. `meta.dimension` names its DPO dimension ("general" without one).

Every turn and every audio is kept (multi-turn conversations are never cut). A record the model cannot take is
refused, not guessed at: it is written to `refusals.jsonl` with its file, line and reason, logged, and left out.
Audio paths become relative to the experiment's data folder, so every later rule reads them like the tiny world's.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from tqdm import tqdm

from fac.data.manifests import AUDIO_PLACEHOLDER, FRAME_RATE, SPEECH_DELAY, parse_speech_tokens, speech_token_string

log = logging.getLogger("fac.data")
SPEECH_TOKENS = re.compile(r"(?:<\|audio_bos\|>)*((?:\[AU\d+\])*)")

PREFERENCE_FILE = "preferences.pairs.jsonl"


class Refused(ValueError):
    """A record the model cannot take; the message is the reason."""


def _audio_entries(record: dict) -> list[dict]:
    entries = record.get("audio", [])
    if not isinstance(entries, list):
        raise Refused("'audio' is not a list")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            try:
                entry = json.loads(entry)
            except json.JSONDecodeError as err:
                raise Refused(f"audio entry {i} is not valid JSON ({err})") from err
        if not isinstance(entry, dict):
            raise Refused(f"audio entry {i} is not an object")
        out.append(entry)
    return out


def _check_messages(messages, preference: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise Refused("'messages' is empty or not a list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise Refused(f"message {i} has no text 'content'")
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise Refused(f"message {i} has role {message.get('role')!r}; user and assistant turns must alternate, "
                          "user first")
    last = messages[-1]["role"]
    if preference and last != "user":
        raise Refused("a preference record's messages must end with a user turn (chosen and rejected answer it)")
    if not preference and last != "assistant":
        raise Refused("the conversation ends with a user turn: nothing to learn or score (its reply is missing)")


def _parse_turns(messages: list[dict], entries: list[dict], start: int, resolve) -> tuple[list[dict], int]:
    """Turns of `messages` (see `record_turns`), consuming audio entries from `start`; returns (turns, next)."""
    turns, at = [], start
    for i, message in enumerate(messages):
        content = message["content"]
        pieces = content.split(AUDIO_PLACEHOLDER)
        if message["role"] == "user":
            turn = {"role": "user", "pieces": []}
            for j, text in enumerate(pieces):
                if text:
                    turn["pieces"].append({"text": text})
                if j < len(pieces) - 1:
                    if at >= len(entries):
                        raise Refused(f"message {i} has more audio placeholders than the record has audio entries")
                    entry = entries[at]
                    if not entry.get("path"):
                        raise Refused(f"audio entry {at} (user, message {i}) has no 'path'")
                    turn["pieces"].append({"audio": resolve(entry["path"], at), "transcript": entry.get("text", "")})
                    at += 1
            if not turn["pieces"]:
                raise Refused(f"message {i} (user) is empty")
            turns.append(turn)
            continue
        if len(pieces) == 1:  # a text reply
            if not content.strip():
                raise Refused(f"message {i} (assistant) is empty")
            turns.append({"role": "assistant", "text": content, "codes": None})
            continue
        if content != AUDIO_PLACEHOLDER:
            raise Refused(f"message {i} (assistant) mixes text and audio; a spoken reply's content is the placeholder "
                          "alone, its text is the audio entry's 'text'")
        if at >= len(entries):
            raise Refused(f"message {i} has more audio placeholders than the record has audio entries")
        entry = entries[at]
        if not entry.get("text"):
            raise Refused(f"audio entry {at} (assistant, message {i}) has no 'text' (the spoken reply's transcript)")
        token = (entry.get("token") or "").strip()
        if not SPEECH_TOKENS.fullmatch(token):
            raise Refused(f"audio entry {at} (assistant, message {i}): 'token' is not <|audio_bos|> delay tokens "
                          f"then [AU0000]-style speech tokens: {token[:60]!r}")
        codes = parse_speech_tokens(token) if token else []
        wav = entry.get("path") or entry.get("ref_path") or ""
        turn = {"role": "assistant", "text": entry["text"], "codes": codes or None}
        if not codes:
            if not wav:
                raise Refused(f"audio entry {at} (assistant, message {i}) has no speech tokens and no wav "
                              "('path' or 'ref_path') to compute them from")
            turn["wav"] = resolve(wav, at)
        turns.append(turn)
        at += 1
    return turns, at


def record_turns(record: dict, resolve=lambda path, index: path, preference: bool = False) -> dict:
    """Validate one record and return {system, turns, meta} (and chosen/rejected turns for a preference record).

    A turn is {"role": "user", "pieces": [{"text"} | {"audio", "transcript"}]} or {"role": "assistant", "text",
    "codes" (speech codes or None for a text reply), "wav" (when codes must still be computed)}. `resolve(path,
    index)` maps an audio path (and may refuse it). Raises Refused with the reason."""
    if not isinstance(record, dict):
        raise Refused("the line is not a JSON object")
    system = record.get("system", "")
    if not isinstance(system, str):
        raise Refused("'system' is not a string")
    messages = record.get("messages")
    _check_messages(messages, preference)
    entries = _audio_entries(record)
    turns, at = _parse_turns(messages, entries, 0, resolve)
    out = {"system": system, "turns": turns, "meta": record.get("meta") or {}}
    if preference:
        for side in ("chosen", "rejected"):
            message = record.get(side)
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise Refused(f"a preference record needs '{side}': an assistant message with 'content'")
            (out[side],), at = _side(message, entries, at, resolve)
    if at != len(entries):
        raise Refused(f"the record has {len(entries)} audio entries but {at} audio placeholders")
    return out


def _side(message: dict, entries: list[dict], at: int, resolve) -> tuple[tuple[dict], int]:
    """One assistant message of a preference record (chosen or rejected), parsed like an assistant turn."""
    turns, at = _parse_turns([{"role": "assistant", "content": message["content"]}], entries, at, resolve)
    return (turns[0],), at


def to_record(parsed: dict, meta: dict) -> dict:
    """A parsed conversation back in the official format (every audio path relative to the data folder, every
    assistant clip's tokens filled in, the user's `<|audio_pad|>` placeholder tokens at 25 per second)."""
    messages, audio = [], []
    for turn in parsed["turns"]:
        if turn["role"] == "user":
            content = ""
            for piece in turn["pieces"]:
                if "text" in piece:
                    content += piece["text"]
                else:
                    content += AUDIO_PLACEHOLDER
                    audio.append(json.dumps({"path": piece["audio"], "text": piece.get("transcript", ""),
                                             "token": "<|audio_pad|>" * int(FRAME_RATE * piece["duration"]),
                                             "ref_path": "", "ref_text": ""}))
            messages.append({"role": "user", "content": content})
        elif turn["codes"] is None:
            messages.append({"role": "assistant", "content": turn["text"]})
        else:
            messages.append({"role": "assistant", "content": AUDIO_PLACEHOLDER})
            audio.append(json.dumps(_assistant_entry(turn)))
    return {"system": parsed["system"], "messages": messages, "audio": audio, "meta": meta}


def _assistant_entry(turn: dict) -> dict:
    return {"path": "", "text": turn["text"],
            "token": "<|audio_bos|>" * SPEECH_DELAY + speech_token_string(turn["codes"]),
            "ref_path": turn.get("wav", ""), "ref_text": turn["text"] if turn.get("wav") else ""}


def to_pair(parsed: dict, meta: dict, name: str) -> dict:
    """A preference record as a DPO pair (fac.train.dpo's format): one spoken user turn, chosen and rejected."""
    turns = parsed["turns"]
    audios = [p for p in turns[0]["pieces"] if "audio" in p] if len(turns) == 1 else []
    if len(audios) != 1 or len(turns[0]["pieces"]) != 1:
        raise Refused("a preference pair takes one user turn holding one clip (DPO scores single-turn spoken "
                      "prompts); this one has " + (f"{len(turns)} turns" if len(turns) != 1 else "other content"))

    def reply(turn):
        return {"text": turn["text"], "codes": turn["codes"]}

    chosen, rejected = reply(parsed["chosen"]), reply(parsed["rejected"])
    if (chosen["codes"] is None) != (rejected["codes"] is None):
        raise Refused("chosen and rejected must both be spoken or both be text")
    return {"dimension": meta.get("dimension") or "general", "system": parsed["system"],
            "user_path": audios[0]["audio"], "id": meta.get("id"), "chosen": chosen, "rejected": rejected,
            "model_said": "", "source": name}


def import_manifests(source_dir: str, media_dir: str | None, names: list[str], preferences: str | None,
                     speech_tokenizer_dir: str, data_root: str, out_dir: str, codebook_size: int | None = None) -> dict:
    """Take in `names` (manifests, `<name>.jsonl` in `source_dir`) and the preference file `preferences` (or None):
    validate each record, compute missing assistant speech tokens with the speech tokenizer, write the kept records
    to `out_dir/<name>.jsonl` (preference pairs to PREFERENCE_FILE), the refused ones to `refusals.jsonl` and the
    counts to `counts.json`. A manifest left with no record is an error naming it."""
    from fac.data.audio import AudioError, duration_seconds, read_wav
    from fac.data.speech_tokenizer import load_speech_tokenizer
    from fac.data.steps import write_json, write_jsonl

    source, out = Path(source_dir), Path(out_dir)
    media = Path(media_dir) if media_dir else source
    tokenizer = load_speech_tokenizer(speech_tokenizer_dir)
    codebook = codebook_size or tokenizer.codebook_size
    refusals, counts, refused = [], {}, {}
    durations: dict[str, float] = {}

    def resolve(path: str, index: int) -> str:
        """An audio path of a record (absolute, or relative to the media folder) -> relative to the data folder."""
        full = Path(path) if os.path.isabs(path) else media / path
        rel = os.path.relpath(full, data_root)
        if rel not in durations:
            try:
                durations[rel] = duration_seconds(full)
            except AudioError as err:
                raise Refused(f"audio entry {index}: {err}") from err
            if durations[rel] <= 0:
                raise Refused(f"audio entry {index}: {full} holds no samples")
        return rel

    def take(name: str, preference: bool) -> list[dict]:
        path = source / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: manifest not found (data.path {source_dir}, named by a stage's `data`, "
                                    "data.eval or data.preferences)")
        kept = []
        lines = path.read_text().splitlines()
        for n, line in enumerate(tqdm(lines, desc=f"import {name}", unit="record"), start=1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise Refused(f"not valid JSON ({err})") from err
                parsed = record_turns(record, resolve, preference)
                sides = [parsed["chosen"], parsed["rejected"]] if preference else []
                for turn in parsed["turns"] + sides:
                    for piece in turn.get("pieces", []):
                        if "audio" in piece:
                            piece["duration"] = durations[piece["audio"]]
                    if turn["role"] == "assistant" and turn["codes"] is None and turn.get("wav"):
                        try:
                            turn["codes"] = tokenizer.encode(read_wav(Path(data_root) / turn["wav"]))
                        except AudioError as err:
                            raise Refused(f"assistant clip: {err}") from err
                    if turn["role"] == "assistant" and turn["codes"] is not None:
                        bad = [c for c in turn["codes"] if not 0 <= c < codebook]
                        if bad:
                            raise Refused(f"speech token {bad[0]} is outside the speech tokenizer's codebook "
                                          f"(0..{codebook - 1})")
                        if not turn["codes"]:
                            raise Refused("an assistant clip has no speech tokens")
                meta = {**parsed["meta"], "id": parsed["meta"].get("id", f"{name}:{n}"), "source": str(path),
                        "line": n}
                kept.append(to_pair(parsed, meta, name) if preference else to_record(parsed, meta))
            except Refused as err:
                refusals.append({"file": str(path), "line": n, "reason": str(err)})
                refused[name] = refused.get(name, 0) + 1
                log.warning("%s:%d: refused: %s", path, n, err)
        counts[name] = len(kept)
        return kept

    out.mkdir(parents=True, exist_ok=True)
    outputs = {name: take(name, False) for name in dict.fromkeys(names)}
    pairs = take(preferences, True) if preferences else None
    write_jsonl(refusals, out / "refusals.jsonl")  # first, so that the reasons are there when a manifest is empty
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"{source}: no record of {', '.join(f'{n}.jsonl' for n in empty)} could be taken "
                         f"({', '.join(str(refused.get(n, 0)) for n in empty)} refused; reasons in "
                         f"{out / 'refusals.jsonl'} and the log)")
    for name, records in outputs.items():
        write_jsonl(records, out / f"{name}.jsonl")
    if pairs is not None:
        write_jsonl(pairs, out / PREFERENCE_FILE)
    write_json({**counts, "refused": refused}, out / "counts.json")
    return {"kept": counts, "refused": refused}
