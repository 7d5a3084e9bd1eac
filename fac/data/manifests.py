"""Conversation manifests in the official SFT recipe's format (LLaMA-Factory "sharegpt" style).

A record: `system` (mode prompt), `messages` (role/content, audio as a placeholder), `audio` (one
JSON-encoded entry per placeholder: path, text, token, ref_path, ref_text) and `meta` (fac's own
bookkeeping: task, split, fact, voice...). Audio paths are relative to the experiment's data folder.
"""
from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

from fac import atomic
from fac.data.text_tokenizer import AUDIO_QUESTION_PROMPT, SYSTEM_PROMPTS, instruction_prompt

AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
SPEECH_DELAY = 10  # assistant speech starts after 10 speech-bos tokens (2 LLM steps at 5 Hz)
FRAME_RATE = 25


def speech_token_string(codes: list[int]) -> str:
    return "".join(f"[AU{c:04d}]" for c in codes)


def parse_speech_tokens(token: str) -> list[int]:
    """Inverse of the assistant token string: drops the delay tokens, returns the codes."""
    body = token.replace("<|audio_bos|>", "")
    return [int(chunk[2:]) for chunk in body.replace("]", "").split("[") if chunk]


def user_audio(path: str, duration: float) -> dict:
    return {"path": path, "text": "", "token": "<|audio_pad|>" * int(FRAME_RATE * duration),
            "ref_path": "", "ref_text": ""}


def assistant_audio(text: str, codes: list[int], ref_path: str = "") -> dict:
    return {"path": "", "text": text, "token": "<|audio_bos|>" * SPEECH_DELAY + speech_token_string(codes),
            "ref_path": ref_path, "ref_text": text if ref_path else ""}


def conversation(mode: str, user: dict, assistant: dict | str, meta: dict, user_text: str = "",
                 system: str | None = None) -> dict:
    """One spoken turn and its answer: spoken (text + speech tokens) or text-only (a plain string).
    `system` replaces the mode's system prompt (an instruction such as the speaking style)."""
    messages = [{"role": "user", "content": AUDIO_PLACEHOLDER + user_text}]
    audio = [json.dumps(user)]
    if isinstance(assistant, dict):
        messages.append({"role": "assistant", "content": AUDIO_PLACEHOLDER})
        audio.append(json.dumps(assistant))
    else:
        messages.append({"role": "assistant", "content": assistant})
    return {"system": system or SYSTEM_PROMPTS[mode], "messages": messages, "audio": audio, "meta": meta}


def dialogue(mode: str, turns: list[tuple[dict, str]], meta: dict) -> dict:
    """A conversation of several spoken turns, each (user clip, the assistant's text reply), in order."""
    messages, audio = [], []
    for user, reply in turns:
        messages += [{"role": "user", "content": AUDIO_PLACEHOLDER}, {"role": "assistant", "content": reply}]
        audio.append(json.dumps(user))
    return {"system": SYSTEM_PROMPTS[mode], "messages": messages, "audio": audio, "meta": meta}


def _earlier_turns(u: dict, questions: list[dict]) -> list[dict] | None:
    """The turns a referring question `u` comes after: a training question about another fact of its person, and
    with distance 2 then one about someone else; drawn by a hash of its id among the kept clips of the training
    facts (a test fact's value never enters a training dialogue). None when its person has no other such fact (or,
    at distance 2, there is no one else)."""
    rng = random.Random(zlib.crc32(u["id"].encode()))
    named = [q for q in questions if q["entity"] == u["entity"] and q["fact"] != u["fact"]]
    others = [q for q in questions if q["entity"] != u["entity"]]
    if not named or (u["distance"] == 2 and not others):
        return None
    return [rng.choice(named)] + ([rng.choice(others)] if u["distance"] == 2 else [])


def build_manifests(utterances: list[dict], tokens: dict[str, list[int]], tasks: list[str]) -> dict[str, list[dict]]:
    """Manifests by name from the kept utterances (clean and noisy) and their speech tokens.

    - spoken_qa_{split}: spoken question -> answer text + the assistant's spoken answer;
    - asr_{split}: speech -> its transcript, text and speech (pre-alignment's speech-text pairs);
    - paraling_{split}: an emotional clip -> the fitting reply (empathy), meta holds the emotion;
    - emotion_{split}: the same clip asked how the speaker sounds (`AUDIO_QUESTION_PROMPT`) -> the emotion, in
      text (audio understanding);
    - instruct_{split}: a spoken question whose system prompt asks for a speaking style (`instruction_prompt`)
      -> the answer text + the assistant's answer said in that style (instruction following); one style
      per question, drawn by a hash of its id; meta holds the style and the answer's normal length in units;
    - multiturn_{split}: a dialogue of two or three spoken turns whose last question refers back to the person
      named `distance` turns earlier (`_earlier_turns`), every reply in text; meta holds the distance and the answer.
    Noisy copies form spoken_qa_{split}_noisy (train) and spoken_qa_{split}_snr{N} (test splits).
    """
    answers = {u["text"]: u for u in utterances if u["kind"] == "answer" and not u.get("style")}
    styled = {(u["text"], u["style"]): u for u in utterances if u["kind"] == "answer" and u.get("style")}
    styles = sorted({style for _, style in styled})
    if "instruct" in tasks and not styles:
        raise ValueError("manifests: task 'instruct' needs the assistant's answers in speaking styles "
                         "(params `instruction.styles`, synthesised by the tts rule)")
    out: dict[str, list[dict]] = {}
    # What a dialogue's earlier turns are drawn from: the training facts' clean questions (an entity of each question:
    # the world's plan gives it).
    history = sorted((u for u in utterances if u["kind"] == "question" and u["split"] == "train"
                      and not u.get("noise")), key=lambda u: u["id"])

    def add(name: str, record: dict) -> None:
        out.setdefault(name, []).append(record)

    def answer_audio(text: str) -> dict:
        clip = answers[text]
        return assistant_audio(text, tokens[clip["id"]], clip["path"])

    for u in utterances:
        meta = {"id": u["id"], "split": u["split"], "voice": u["voice"], "kind": u["kind"]}
        user = user_audio(u["path"], u["duration"])
        noisy = u.get("noise")
        suffix = "" if not noisy else ("_noisy" if u["split"] == "train" else f"_snr{noisy['snr_db']:g}")
        if noisy:
            meta["noise"] = noisy
        if u["kind"] == "question" and "spoken_qa" in tasks:
            meta.update(task="spoken_qa", fact=u["fact"], qa=u["qa"], answer=u["answer"])
            add(f"spoken_qa_{u['split']}{suffix}", conversation("s2m", user, answer_audio(u["answer"]), meta))
        if u["kind"] in ("question", "statement") and not noisy and "asr" in tasks:
            asr_meta = dict(meta, task="asr", transcript=u["text"])
            add(f"asr_{u['split']}", conversation("asr", user, assistant_audio(u["text"], tokens[u["id"]]), asr_meta))
        if u["kind"] == "question" and not noisy and "instruct" in tasks:
            style = styles[zlib.crc32(u["id"].encode()) % len(styles)]
            clip = styled[(u["answer"], style)]
            normal = tokens[answers[u["answer"]]["id"]]
            instruct_meta = dict(meta, task="instruct", fact=u["fact"], qa=u["qa"], answer=u["answer"], style=style,
                                 normal_units=len(normal))
            add(f"instruct_{u['split']}", conversation("s2m", user, assistant_audio(u["answer"], tokens[clip["id"]],
                                                                                     clip["path"]),
                                                       instruct_meta, system=instruction_prompt(style)))
        if u["kind"] == "paraling" and not noisy and "paraling" in tasks:
            meta.update(task="empathy", emotion=u["emotion"], reply=u["reply"])
            add(f"paraling_{u['split']}", conversation("s2m", user, answer_audio(u["reply"]), meta))
            add(f"emotion_{u['split']}", conversation("s2t", user, u["emotion"], dict(meta, task="emotion"),
                                                      system=AUDIO_QUESTION_PROMPT))
        if u["kind"] == "reference" and "multiturn" in tasks:
            earlier = _earlier_turns(u, history)
            if earlier is None:
                continue
            turns = [(user_audio(q["path"], q["duration"]), q["answer"]) for q in earlier]
            meta.update(task="multiturn", fact=u["fact"], answer=u["answer"], distance=u["distance"],
                        history=[q["id"] for q in earlier])
            add(f"multiturn_{u['split']}", dialogue("s2t", turns + [(user, u["answer"])], meta))
    return out


def write_manifests(manifests: dict[str, list[dict]], out_dir: str | Path, expected: list[str]) -> dict[str, int]:
    """Write each manifest as JSONL; every expected name must be non-empty (an empty one is an error)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    empty = [name for name in expected if not manifests.get(name)]
    if empty:
        raise ValueError(f"{out}: these manifests would be empty: {', '.join(empty)} "
                         "(too few utterances kept by the ASR filter, or a task/split missing in params)")
    counts = {}
    for name, records in sorted(manifests.items()):
        atomic.write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        counts[name] = len(records)
    return counts


def read_manifest(path: str | Path) -> list[dict]:
    """Read a manifest; a missing, empty or malformed file is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON: {err}") from err
        for key in ("system", "messages", "audio"):
            if key not in record:
                raise ValueError(f"{path}:{n}: record has no '{key}' field")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: manifest is empty")
    return records


# The spoken reply's layout, read back: shared by evaluation and preference building (training never imports
# evaluation), so both judge a generated reply the same way.
def spoken_units(speech_ids: list[int], audio_config) -> list[int]:
    """The speech codes of a generated spoken reply: everything before its eos, the delay's bos tokens dropped."""
    units = []
    for code in speech_ids:
        if code == audio_config.eos_token_id:
            break
        if code < audio_config.bos_token_id:
            units.append(code)
    return units


def follows_style(units: float, styled_units: float, normal_units: float) -> bool:
    """A spoken reply follows a speaking-style instruction when its length (in units, or in seconds) is nearer, in
    log ratio, to the answer said in that style than to the answer said normally (an empty reply never does)."""
    if units <= 0 or styled_units <= 0 or normal_units <= 0:
        return False
    return abs(math.log(units / styled_units)) < abs(math.log(units / normal_units))


def spoken_reply_budget(styled_units: int, group_size: int) -> int:
    """LLM steps enough for a spoken reply twice the styled answer's length, its delay and the closing tokens."""
    return -(-SPEECH_DELAY // group_size) + 2 * -(-styled_units // group_size) + 4
