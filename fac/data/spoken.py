"""Data source `text`: text conversations spoken by the TTS engine, filtered by the ASR scorer, written in the
official format for rule `manifests` to take in (fac.data.imported), split into shards that run as parallel jobs.

A conversation is a sharegpt record without audio: `system`, `messages` (user and assistant turns alternating,
user first), optional `meta`; a preference record adds `chosen` and `rejected`. Every user turn is spoken by a voice
drawn by a hash of its id (held-out `tts.test_voices` for the evaluation sets, `tts.train_voices` otherwise) at a
rate and pitch drawn from the tts ranges; with the speech-to-speech system prompt every assistant reply is spoken
too, by `tts.assistant_voice` (the speech tokenizer gives its tokens when the manifests are taken in). A
conversation any of whose user clips the ASR scorer hears with a WER above `asr.max_wer` is left out, counted.
Clips are written under data/spoken/<engine folder>/ and kept across reruns (a killed shard resumes).
"""
from __future__ import annotations

import json
import logging
import random
import re
import zlib
from pathlib import Path

from fac.data.imported import Refused, _check_messages
from fac.data.manifests import AUDIO_PLACEHOLDER
from fac.data.text_tokenizer import SYSTEM_PROMPTS

log = logging.getLogger("fac.data")


def read_conversations(path: str | Path) -> list[tuple[int, dict | None, str]]:
    """(line, record or None, reason) for every non-empty line of a conversation file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: conversation file not found (data.path, named by a stage's `data`, "
                                "data.eval or data.preferences)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line), ""))
        except json.JSONDecodeError as err:
            out.append((n, None, f"not valid JSON ({err})"))
    return out


def text_corpus(source_dir: str, names: list[str], out_dir: str) -> dict:
    """Every sentence and word of the conversations (the pocketsphinx scorer's LM and dictionary are built from
    them, as the tiny world's are from its own text): sentences.txt and vocabulary.txt in `out_dir`."""
    sentences, words = [], set()
    for name in names:
        for _, record, _ in read_conversations(Path(source_dir) / f"{name}.jsonl"):
            if not isinstance(record, dict):
                continue
            messages = list(record.get("messages") or []) + [record[k] for k in ("chosen", "rejected") if k in record]
            for message in messages:
                text = message.get("content", "") if isinstance(message, dict) else ""
                for sentence in re.split(r"(?<=[.!?])\s+", text):
                    clean = " ".join(re.sub(r"[^a-z' ]", " ", sentence.lower()).split())
                    if clean:
                        sentences.append(clean)
                        words.update(clean.split())
    if not sentences:
        raise ValueError(f"{source_dir}: the conversations {names} hold no text")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sentences.txt").write_text("\n".join(sentences) + "\n")
    (out / "vocabulary.txt").write_text("\n".join(sorted(words)) + "\n")
    return {"sentences": len(sentences), "words": len(words)}


def _draw(tts: dict, clip_id: str, voices: list[str], seed: int) -> dict:
    rng = random.Random(f"{seed}:{clip_id}")
    return {"voice": voices[zlib.crc32(clip_id.encode()) % len(voices)],
            "rate": rng.randint(*tts["rate"]), "pitch": rng.randint(*tts["pitch"]), "amplitude": tts["amplitude"]}


def speak_shard(params: dict, source: str, shard: int, shards: int, lm_dir: str | None, data_root: str,
                out_jsonl: str, report: str) -> dict:
    """Speak shard `shard` of `shards` of one conversation file (every shards-th record from line order), judge
    the user clips with the ASR scorer, and write the kept conversations in the official format (clip paths
    relative to `data_root`, assistant clips as `ref_path` for the speech tokenizer). Records that are not text
    conversations are written to the report with their line and reason."""
    from fac.data.asr import filter_utterances, recognizer
    from fac.data.steps import write_json, write_jsonl
    from fac.data.tts import engine, synthesize_all

    tts, asr, seed = params["tts"], params["asr"], int(params["seed"])
    name = Path(source).stem
    voices = tts["test_voices"] if params.get("held_out") else tts["train_voices"]
    synthesiser = engine(tts)
    mine = [entry for i, entry in enumerate(read_conversations(source)) if i % shards == shard]
    refused, conversations, jobs = [], [], []
    for n, record, reason in mine:
        try:
            if record is None:
                raise Refused(reason)
            preference = "chosen" in record or "rejected" in record
            _check_messages(record.get("messages"), preference)
            turns = list(record["messages"]) + [dict(record[k], role="assistant") for k in ("chosen", "rejected")
                                                if preference]
            if preference and not all(isinstance(record.get(k), dict) and isinstance(record[k].get("content"), str)
                                      for k in ("chosen", "rejected")):
                raise Refused("a preference record needs 'chosen' and 'rejected' assistant messages")
            if any(AUDIO_PLACEHOLDER in t["content"] or "<|AUDIO|>" in t["content"] for t in turns):
                raise Refused("the conversation already holds audio placeholders (data.source manifests takes those)")
            if any(not t["content"].strip() for t in turns):
                raise Refused("a turn is empty")
        except Refused as err:
            refused.append({"file": source, "line": n, "reason": str(err)})
            log.warning("%s:%d: refused: %s", source, n, err)
            continue
        spoken_reply = record.get("system", "") == SYSTEM_PROMPTS["s2m"]
        clips = []
        for j, turn in enumerate(turns):
            if turn["role"] == "user" or spoken_reply:
                clip_id = f"{name}-{n}-{j}"
                who = voices if turn["role"] == "user" else [tts["assistant_voice"]]
                job = {"id": clip_id, "text": turn["content"], **_draw(tts, clip_id, who, seed), "turn": j,
                       "user": turn["role"] == "user"}
                if turn["role"] == "assistant":  # the assistant speaks at the middle of the ranges, always
                    job.update(rate=sum(tts["rate"]) // 2, pitch=sum(tts["pitch"]) // 2)
                jobs.append(job)
                clips.append(job)
        conversations.append((n, record, preference, clips))
    folder = f"spoken/{synthesiser.folder}"
    done = {job["id"]: job for job in synthesize_all(jobs, Path(data_root) / folder, workers=tts["workers"],
                                                     desc=f"speak {name} [{shard}/{shards}]", synthesiser=synthesiser)}
    users = [dict(job, path=f"{folder}/{job['path']}") for job in done.values() if job["user"]]
    judged, stats = filter_utterances(users, data_root, recognizer(asr, lm_dir), asr["max_wer"],
                                      desc=f"asr {name} [{shard}/{shards}]", workers=asr["workers"])
    wer = {u["id"]: u for u in judged}
    kept, dropped = [], 0
    for n, record, preference, clips in conversations:
        if any(not wer[c["id"]]["kept"] for c in clips if c["user"]):
            dropped += 1
            continue
        kept.append(_official(record, preference, {c["turn"]: dict(done[c["id"]], path=f"{folder}/{done[c['id']]['path']}",
                                                                  asr_text=wer.get(c["id"], {}).get("asr_text"))
                                                   for c in clips}, source, n))
    write_jsonl(kept, out_jsonl)
    summary = {"file": source, "shard": shard, "shards": shards, "conversations": len(conversations),
               "kept": len(kept), "dropped_by_wer": dropped, "refused": refused, "clips": len(done),
               "wer_mean": stats["wer_mean"], "max_wer": asr["max_wer"]}
    write_json(summary, report)
    log.info("%s shard %d/%d: %d conversations, %d kept, %d dropped by WER > %.2f, %d refused", name, shard, shards,
             len(conversations), len(kept), dropped, asr["max_wer"], len(refused))
    return summary


def _official(record: dict, preference: bool, clips: dict[int, dict], source: str, line: int) -> dict:
    """A spoken conversation in the official format: every spoken turn's content becomes the audio placeholder."""
    turns = list(record["messages"]) + ([record["chosen"], record["rejected"]] if preference else [])
    out_turns, audio = [], []
    for j, turn in enumerate(turns):
        role = "user" if j < len(record["messages"]) and turn["role"] == "user" else "assistant"
        if j not in clips:
            out_turns.append({"role": role, "content": turn["content"]})
            continue
        clip = clips[j]
        out_turns.append({"role": role, "content": AUDIO_PLACEHOLDER})
        if role == "user":  # the clip's text is its transcript (what was said), as the official user entry holds
            audio.append(json.dumps({"path": clip["path"], "text": turn["content"], "token": "", "ref_path": "",
                                     "ref_text": ""}))
        else:
            audio.append(json.dumps({"path": "", "text": turn["content"], "token": "", "ref_path": clip["path"],
                                     "ref_text": turn["content"]}))
    meta = {**(record.get("meta") or {}), "spoken_from": f"{source}:{line}"}
    out = {"system": record.get("system", ""), "messages": out_turns[:len(record["messages"])], "audio": audio,
           "meta": meta}
    if preference:
        out["chosen"], out["rejected"] = out_turns[-2], out_turns[-1]
    return out


def merge_shards(shards: list[str], reports: list[str], out_jsonl: str, out_report: str) -> dict:
    """The shards of one conversation file back in one file (in line order) and their reports summed."""
    from fac.data.steps import read_jsonl, write_json, write_jsonl

    rows = [row for path in shards for row in (read_jsonl(path) if Path(path).stat().st_size else [])]
    rows.sort(key=lambda r: int(r["meta"]["spoken_from"].rsplit(":", 1)[1]))
    parts = [json.loads(Path(p).read_text()) for p in reports]
    summary = {"shards": len(parts), **{k: sum(p[k] for p in parts) for k in ("conversations", "kept",
                                                                              "dropped_by_wer", "clips")},
               "refused": [r for p in parts for r in p["refused"]]}
    if not rows:
        raise ValueError(f"{out_jsonl}: no conversation was kept ({summary['dropped_by_wer']} dropped by the ASR "
                         f"filter, {len(summary['refused'])} refused)")
    write_jsonl(rows, out_jsonl)
    write_json(summary, out_report)
    return summary
