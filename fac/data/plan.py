"""What to synthesise: every utterance of the tiny world with its voice, rate, pitch and loudness.

Questions, statements, the questions that refer back to an earlier turn's person (multi-turn dialogues), the
assistant's spoken answers (also in each instructed speaking style) and the paralinguistic (emotion) clips; held-out
voices speak only test material. Ids carry a hash of the synthesis settings, so a changed setting
never reuses a stale wav.
"""
from __future__ import annotations

import hashlib
import random

from fac.data.world import REFERENCES, World, fill, qa_pairs


def _settings_hash(job: dict) -> str:
    key = f"{job['text']}|{job['voice']}|{job['rate']}|{job['pitch']}|{job['amplitude']}"
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def _job(base_id: str, text: str, voice: str, rate: int, pitch: int, amplitude: int, **meta) -> dict:
    job = {"text": text, "voice": voice, "rate": int(rate), "pitch": int(pitch), "amplitude": int(amplitude)}
    job["id"] = f"{base_id}-{_settings_hash(job)}"
    job.update(meta)
    return job


def _prosody(rng: random.Random, cfg: dict) -> tuple[int, int]:
    return rng.randint(*cfg["rate"]), rng.randint(*cfg["pitch"])


def _amplitude(cfg: dict, gain_db: float = 0.0) -> int:
    # espeak-ng's amplitude is linear (default 100); a gain in dB scales it.
    return int(max(5, min(200, round(cfg["amplitude"] * 10 ** (gain_db / 20)))))


def _referring_jobs(world: World, by_fact: dict[str, list[dict]], tts: dict, multiturn: dict,
                    rng: random.Random) -> list[dict]:
    """The referring questions of the multi-turn dialogues (see `plan_utterances`), drawn from their own random
    stream so that the other clips stay those of a world without dialogues."""
    jobs = []
    for fact in world.facts:
        pairs = by_fact[fact["id"]]  # its questions, each with its referring forms (fac.data.world.qa_pairs)
        split = "train" if fact["split"] == "train" else "test"
        count = multiturn["train_per_fact" if split == "train" else "test_per_fact"]
        for distance in REFERENCES:
            for k in range(count):
                rate, pitch = _prosody(rng, tts)
                jobs.append(_job(f"m-{split}-{fact['id']}-d{distance}-{k}",
                                 pairs[k % len(pairs)]["referring"][str(distance)],
                                 rng.choice(tts["train_voices"]), rate, pitch, _amplitude(tts), kind="reference",
                                 split=split, fact=fact["id"], entity=fact["entity"], answer=fact["value"],
                                 distance=distance))
    return jobs


def plan_utterances(world: World, source: dict, tts: dict, paraling: dict, seed: int,
                    instruction: dict | None = None, multiturn: dict | None = None) -> list[dict]:
    """All synthesis jobs: dicts with id, text, voice, rate, pitch, amplitude, kind, split and meta.

    `instruction` ({"styles": {style: rate_scale}}) adds the assistant's answers said in each speaking
    style (instruction following: "say the answer slowly"). `multiturn` ({"train_per_fact": n, "test_per_fact": m})
    adds, per fact and turn distance (`fac.data.world.REFERENCES`), n (train facts, training voices) or m (test
    facts, training voices: split test) questions that refer back instead of naming (kind "reference"); the
    manifests put them after the turns they refer to. Every question job carries its fact's entity."""
    rng = random.Random(seed)
    jobs: list[dict] = []
    pairs = qa_pairs(world, source)
    by_fact: dict[str, list[dict]] = {}
    for pair in pairs:
        by_fact.setdefault(pair["fact"], []).append(pair)

    for fact in world.facts:
        questions = by_fact[fact["id"]]
        if fact["split"] == "train":
            plans = [("train", tts["train_voices"], tts["questions_per_train_fact"])]
        else:
            plans = [("test", tts["train_voices"], tts["questions_per_test_fact"]),
                     ("test_unseen_voices", tts["test_voices"], tts["questions_per_test_fact"])]
        for split, voices, count in plans:
            for k in range(count):
                pair = questions[k % len(questions)]
                rate, pitch = _prosody(rng, tts)
                jobs.append(_job(f"q-{split}-{pair['id']}-{k}", pair["question"], rng.choice(voices), rate, pitch,
                                 _amplitude(tts), kind="question", split=split, fact=fact["id"],
                                 entity=fact["entity"], qa=pair["id"], answer=pair["answer"]))
        if fact["split"] == "train":
            statements = source["attributes"][fact["attribute"]]["statements"]
            for k in range(tts["statements_per_train_fact"]):
                text = fill(statements[k % len(statements)], fact["name"], fact["value"])
                rate, pitch = _prosody(rng, tts)
                jobs.append(_job(f"s-{fact['id']}-{k}", text, rng.choice(tts["train_voices"]), rate, pitch,
                                 _amplitude(tts), kind="statement", split="train", fact=fact["id"]))

    if multiturn:
        jobs += _referring_jobs(world, by_fact, tts, multiturn, random.Random(f"{seed}-multiturn"))

    # The assistant's voice speaking every answer value (the spoken side of the parallel stream).
    mid_rate = sum(tts["rate"]) // 2
    mid_pitch = sum(tts["pitch"]) // 2
    for value in sorted({f["value"] for f in world.facts}):
        jobs.append(_job(f"a-{value}", value, tts["assistant_voice"], mid_rate, mid_pitch, _amplitude(tts),
                         kind="answer", split="assistant"))
        for style, rate_scale in sorted(((instruction or {}).get("styles") or {}).items()):
            jobs.append(_job(f"a-{value}-{style}", value, tts["assistant_voice"], round(mid_rate * rate_scale),
                             mid_pitch, _amplitude(tts), kind="answer", split="assistant", style=style))
    para = source["paralinguistic"]
    for emotion, reply in para["replies"].items():
        jobs.append(_job(f"r-{emotion}", reply, tts["assistant_voice"], mid_rate, mid_pitch, _amplitude(tts),
                         kind="answer", split="assistant"))

    # Paralinguistic clips: neutral words, emotion carried only by rate, pitch and loudness.
    names = [e["name"] for e in world.entities]
    for split, voices, count in (("train", tts["train_voices"], paraling["train_per_emotion"]),
                                 ("test", tts["train_voices"], paraling["test_per_emotion"]),
                                 ("test_unseen_voices", tts["test_voices"], paraling["test_per_emotion"])):
        for emotion, prosody in paraling["emotions"].items():
            for k in range(count):
                text = fill(rng.choice(para["sentences"]), rng.choice(names))
                rate, pitch = _prosody(rng, tts)
                rate = round(rate * prosody["rate_scale"])
                pitch = max(0, min(99, pitch + prosody["pitch_shift"]))
                jobs.append(_job(f"p-{split}-{emotion}-{k}", text, rng.choice(voices), rate, pitch,
                                 _amplitude(tts, prosody["gain_db"]), kind="paraling", split=split,
                                 emotion=emotion, reply=para["replies"][emotion]))
    ids = [j["id"] for j in jobs]
    assert len(ids) == len(set(ids)), "utterance ids must be unique"
    return jobs
