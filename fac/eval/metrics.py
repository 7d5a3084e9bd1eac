"""Evaluation of every stage's checkpoint on the tiny world: spoken QA, text QA, speech-token accuracy and
one metric per DPO dimension.

spoken_qa_acc asks the test facts (known only from text) aloud; text_qa_acc asks every fact in text (the
base LLM's knowledge, retained or forgotten); speech_token_acc is the SRH's teacher-forced code accuracy;
spoken_qa_acc_noisy (robustness) asks them at 10 dB SNR; emotion_acc (audio understanding) and empathy_acc
(voice empathy) use the emotion clips of the test split; instruction_acc (instruction following) asks the
test questions with a speaking style in the system prompt and judges the spoken answer's duration by ear (with a
detokenizer; the generated units' count without one, also kept as instruction_units_acc).
Speech to speech (with a detokenizer and an ASR scorer: `SpeechOut`): the spoken questions answered in text and
speech, the speech spoken by the detokenizer and transcribed by the scorer; s2s_acc (UltraEval-Audio's answer match
on the transcript: the value is in what the answer says aloud) and answer_wer (the transcript's WER against the
model's own text answer: does the speech say what the text says, the paper's ASR-WER).

Without a world (data source manifests: the user's own data), `evaluate_sets` scores the named evaluation
manifests with what they allow: answer match on the reference reply's text, speech-token accuracy on spoken
references, with a detokenizer and an ASR scorer speech to speech on the spoken references (CosyVoice 3's token2wav
speaks at 24 kHz: resampled to the scorer's 16 kHz), and for a plain LLM answer match on the clips' transcripts; it
lists the world's metrics it skipped.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from fac import faults
from fac.data.manifests import follows_style, spoken_reply_budget, spoken_units
from fac.data.text_tokenizer import AUDIO_QUESTION_PROMPT, SYSTEM_PROMPTS
from fac.devices import CPU, Placement, device_of, to_device
from fac.model import load_checkpoint
from fac.model.generation import generate_each
from fac.model.processing import IGNORE_INDEX, SpecialIds, collate
from fac.train.data import FeatureCache, SpokenData, SpokenRecord, chat_ids, encode_text, load_records
from fac.train.stages import load_tokenizer

log = logging.getLogger("fac.eval")


def first_word(tokenizer, ids: list[int]) -> str:
    """The first word of generated text, special tokens dropped (the answer of a world question)."""
    words = tokenizer.decode(ids, skip_special_tokens=True).split()
    return words[0] if words else ""


@torch.no_grad()
def text_answers(llm, tokenizer, questions: list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy replies (token ids) of a causal LM to text questions in the chat template, one batch (left-padded)."""
    prompts = [chat_ids(tokenizer, SYSTEM_PROMPTS["s2t"], q, None)[0] for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding for batched generation
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = device_of(llm)
    out = llm.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[:, width:].tolist()


@torch.no_grad()
def text_qa_accuracy(llm, tokenizer, world_dir: str | Path, batch_size: int = 64) -> float:
    """Greedy answers of a causal LM to every fact's text question; correct when the first word is the value."""
    qa = [json.loads(line) for line in (Path(world_dir) / "text_qa.jsonl").read_text().splitlines() if line]
    llm.eval()
    correct = 0
    for start in range(0, len(qa), batch_size):
        chunk = qa[start:start + batch_size]
        for pair, row in zip(chunk, text_answers(llm, tokenizer, [p["question"] for p in chunk], 3)):
            correct += first_word(tokenizer, row) == pair["answer"]
    return correct / len(qa)


def answers(model, data: SpokenData, records: list, desc: str, mode: str, budgets: list[int], batch_size: int,
            system: str | None = None) -> list[tuple[list[int], list[int]]]:
    """Greedy (text ids, speech ids) of the model's answer to each record, `batch_size` records per left-padded batch
    (fac.model.generation.generate_each: each exactly its batch-of-one answer), with a progress bar. Prompts are
    built a window of 8 batches at a time, batched by length within it."""
    out, window = [], 8 * batch_size
    bar = tqdm(total=len(records), desc=desc, unit="q")
    for start in range(0, len(records), window):
        chunk = records[start:start + window]
        out += generate_each(model, [data.prompt(rec, system) for rec in chunk], data.special, mode=mode,
                             budgets=budgets[start:start + window], batch_size=batch_size)
        bar.update(len(chunk))
        faults.point("answers")
    bar.close()
    return out


@torch.no_grad()
def spoken_qa_accuracy(model, data: SpokenData, name: str, tokenizer, batch_size: int = 16) -> float:
    """Greedy text answer to each spoken question of manifest `name`; correct when its first word is the value."""
    model.eval()
    records = data.records[name]
    said = answers(model, data, records, f"spoken QA {name}", "s2t", [3] * len(records), batch_size)
    correct = sum(first_word(tokenizer, text) == rec.meta["answer"] for rec, (text, _) in zip(records, said))
    return correct / len(records)


MULTITURN_TEST = "multiturn_test"  # dialogues whose last question refers back to an earlier turn's person


@torch.no_grad()
def multiturn_accuracy(model, data: SpokenData, name: str, tokenizer, batch_size: int = 16) -> dict:
    """The last question of each dialogue answered in text after its earlier turns (their replies as text, as
    `SpokenData.prompt` lays out history): correct when the first word is the value of the fact of the person it
    refers back to. `multiturn_acc` over every dialogue, `multiturn_acc_d<n>` per turn distance."""
    model.eval()
    records = data.records[name]
    said = answers(model, data, records, f"multi-turn {name}", "s2t", [3] * len(records), batch_size)
    by_distance: dict[int, list[bool]] = {}
    for rec, (text, _) in zip(records, said):
        by_distance.setdefault(int(rec.meta["distance"]), []).append(first_word(tokenizer, text) == rec.meta["answer"])
    every = [hit for hits in by_distance.values() for hit in hits]
    metrics = {"multiturn_acc": sum(every) / len(every)}
    metrics.update({f"multiturn_acc_d{d}": sum(hits) / len(hits) for d, hits in sorted(by_distance.items())})
    return metrics


NOISY_TEST = "spoken_qa_test_snr10"  # the test facts' questions with noise at 10 dB SNR (robustness)


@torch.no_grad()
def paralinguistic_accuracy(model, data: SpokenData, name: str, tokenizer, batch_size: int = 16) -> dict:
    """Emotion clips (neutral words; emotion carried by rate, pitch and loudness only):
    `emotion_acc`: asked how the speaker sounds, the first word is the emotion (audio understanding);
    `empathy_acc`: the spoken reply's text (generated with its speech, as trained) fits the emotion (voice empathy)."""
    model.eval()
    records = data.records[name]
    asked = answers(model, data, records, f"emotion {name}", "s2t", [3] * len(records), batch_size,
                    AUDIO_QUESTION_PROMPT)
    replies = answers(model, data, records, f"empathy {name}", "s2m", [8] * len(records), batch_size)
    emotion = sum(first_word(tokenizer, text) == rec.meta["emotion"] for rec, (text, _) in zip(records, asked))
    empathy = sum(tokenizer.decode(text, skip_special_tokens=True).strip() == rec.meta["reply"]
                  for rec, (text, _) in zip(records, replies))
    return {"emotion_acc": emotion / len(records), "empathy_acc": empathy / len(records)}


INSTRUCT_TEST = "instruct_test"  # test questions asked with a speaking style (instruction following)


@torch.no_grad()
def instruction_accuracy(model, data: SpokenData, name: str, batch_size: int = 16,
                         speech_out: SpeechOut | None = None) -> dict:
    """Styled questions answered in speech (s2m, greedy). `instruction_units_acc`: share whose generated units are
    nearer in count, in log ratio, to the styled answer's than to the normal one's (fac.data.manifests.follows_style);
    `instruct_length_ratio_<style>`: mean generated over normal unit count. `instruction_acc` is judged by ear when
    `speech_out` gives a detokenizer (`instruction_by_ear`: the spoken answer's duration), else it is the unit count's.
    The world's styles are rates only: its speech units are computed on loudness-normalised features, so a loudness
    style would ask for what no unit can say (params `instruction.styles`)."""
    model.eval()
    audio_cfg = model.config.audio_config
    follows, ratios = 0, {}
    records = data.records[name]
    budgets = [spoken_reply_budget(len(rec.codes), audio_cfg.group_size) for rec in records]
    said = answers(model, data, records, f"instruction following {name}", "s2m", budgets, batch_size)
    generated = [spoken_units(speech, audio_cfg) for _, speech in said]
    for rec, units in zip(records, generated):
        follows += follows_style(len(units), len(rec.codes), rec.meta["normal_units"])
        ratios.setdefault(rec.meta["style"], []).append(len(units) / rec.meta["normal_units"])
    metrics = {"instruction_units_acc": follows / len(records), "instruction_acc": follows / len(records)}
    metrics.update({f"instruct_length_ratio_{style}": sum(r) / len(r) for style, r in sorted(ratios.items())})
    if speech_out is not None:
        metrics.update(instruction_by_ear(records, generated, data, speech_out))
    return metrics


def instruction_by_ear(records: list[SpokenRecord], generated: list[list[int]], data: SpokenData,
                       speech_out: SpeechOut) -> dict:
    """Instruction following judged on the generated audio: each styled answer's units spoken by the detokenizer,
    its voiced duration (fac.data.audio.speech_seconds: leading and trailing silence cut) nearer, in log ratio, to the
    styled recording's (the record's reply) than to the normal recording's (the same answer's reply in the spoken QA
    test sets). `instruction_acc` is that share; `instruct_duration_ratio_<style>` the mean generated over normal
    duration. A record whose normal recording no test set holds is named in the error."""
    from fac.data.audio import SAMPLE_RATE, read_wav, speech_seconds

    normal_paths = {}
    for name in ("spoken_qa_test", "spoken_qa_test_unseen_voices"):
        for rec in data.records.get(name, []):
            if rec.reply_ref_path:
                normal_paths.setdefault(rec.meta.get("answer"), rec.reply_ref_path)
    recorded: dict[str, float] = {}

    def seconds(rel_path: str) -> float:
        if rel_path not in recorded:
            recorded[rel_path] = speech_seconds(read_wav(data.features.data_root / rel_path), SAMPLE_RATE)
        return recorded[rel_path]

    follows, ratios = 0, {}
    rate = speech_out.detokenizer.sample_rate
    for rec, clip in zip(records, speech_out.speak(generated)):
        normal = normal_paths.get(rec.meta.get("answer"))
        if not rec.reply_ref_path or not normal:
            raise ValueError(f"instruction following by ear: record {rec.meta.get('id')} (answer "
                             f"{rec.meta.get('answer')!r}) has no {'styled' if not rec.reply_ref_path else 'normal'} "
                             "recording to compare its spoken answer with; expected the reply's ref_path, and the "
                             "same answer in spoken_qa_test")
        spoken, styled, plain = speech_seconds(clip, rate), seconds(rec.reply_ref_path), seconds(normal)
        follows += follows_style(spoken, styled, plain)  # the unit count's log-ratio rule, on seconds
        ratios.setdefault(rec.meta["style"], []).append(spoken / plain if plain > 0 else 0.0)
    metrics = {"instruction_acc": follows / len(records)}
    metrics.update({f"instruct_duration_ratio_{style}": sum(r) / len(r) for style, r in sorted(ratios.items())})
    return metrics


@torch.no_grad()
def speech_token_accuracy(model, data: SpokenData, name: str, batch_size: int = 16) -> float:
    """Teacher-forced SRH accuracy on the speech codes of the answers (delay and eos tokens excluded)."""
    model.eval()
    g = model.config.audio_config.group_size
    first_special = model.config.audio_config.bos_token_id
    hits = total = 0
    records = data.records[name]
    for start in range(0, len(records), batch_size):
        batch = collate([data.example(r) for r in records[start:start + batch_size]], data.special)
        out = model(**to_device(batch, device_of(model)))
        predicted = out.speech_logits[:, :-g].argmax(-1)  # sub-frame q predicts label q + G
        target = out.speech_labels[:, g:]
        valid = (target != IGNORE_INDEX) & (target < first_special)
        hits += int((predicted[valid] == target[valid]).sum())
        total += int(valid.sum())
    return hits / max(1, total)


class SpeechOut:
    """What speech-to-speech evaluation hears the answers with: a detokenizer folder (fac.data.detokenizer: units ->
    wav at its own rate, the tiny world's 16 kHz or CosyVoice 3's 24 kHz) and an ASR scorer (the `asr` params
    section, the LM folder for pocketsphinx), which hears 16 kHz (fac.data.audio.SAMPLE_RATE); `questions` per test
    set (the first ones, 0: all). `examples` collects the first `EXAMPLES` answers of each set heard
    (speech_to_speech), for the report to play."""

    EXAMPLES = 3

    def __init__(self, detokenizer_dir: str, asr_params: dict, lm_dir: str | None, questions: int):
        from fac.data.asr import recognizer
        from fac.data.detokenizer import load_detokenizer

        self.detokenizer = load_detokenizer(detokenizer_dir)
        self.scorer = recognizer(asr_params, lm_dir)
        self.questions = questions
        self.examples: list[dict] = []

    def speak(self, units_per_answer: list[list[int]]) -> list:
        """Each answer's units spoken by the detokenizer, in one batch (float32 at the detokenizer's sample rate; no
        samples for no unit)."""
        return self.detokenizer.synthesize_batch(units_per_answer)

    def hear(self, units_per_answer: list[list[int]]) -> list[str]:
        """The scorer's transcript of each answer spoken by the detokenizer, resampled to the scorer's 16 kHz when
        the detokenizer speaks at another rate ("" for an answer with no unit)."""
        from fac.data.audio import SAMPLE_RATE, resample

        clips = self.speak(units_per_answer)
        spoken = [i for i, clip in enumerate(clips) if len(clip)]
        rate = self.detokenizer.sample_rate
        heard_clips = [resample(clips[i], rate, SAMPLE_RATE) for i in spoken]
        heard = dict(zip(spoken, self.scorer.transcribe_batch(heard_clips) if spoken else []))
        return [heard.get(i, "") for i in range(len(clips))]


def reference_answer(rec) -> str:
    """What answer match looks for: the record's `meta.answer` (the world's value; your data's where it gives one),
    else the reference reply's text."""
    return str(rec.meta.get("answer") or rec.text or "")


@torch.no_grad()
def speech_to_speech(model, data: SpokenData, name: str, tokenizer, speech_out: SpeechOut,
                     batch_size: int = 16) -> dict:
    """Spoken questions of manifest `name` with a spoken reference reply answered in text and speech (s2m, greedy),
    the first `speech_out.questions` of them, the speech spoken and heard (`speech_out`): `s2s_acc`, the share of
    those with a reference answer (`reference_answer`) whose transcript holds it (answer match; None when none has
    one); `answer_wer`, the mean WER of the transcript against the model's own text answer (1.0 where the text
    answer is empty); and `s2s_questions`, how many were asked (0, and nothing else, when the set has no spoken
    reference)."""
    from fac.data.asr import word_error_rate

    model.eval()
    audio_cfg = model.config.audio_config
    records = [rec for rec in data.records[name] if rec.codes is not None][: speech_out.questions or None]
    if not records:
        return {"s2s_questions": 0}
    budgets = [spoken_reply_budget(len(rec.codes), audio_cfg.group_size) for rec in records]
    said = answers(model, data, records, f"speech to speech {name}", "s2m", budgets, batch_size)
    units = [spoken_units(speech, audio_cfg) for _, speech in said]
    heard = speech_out.hear(units)
    texts = [tokenizer.decode(text, skip_special_tokens=True).strip() for text, _ in said]
    references = [reference_answer(rec) for rec in records]
    for rec, text, spoken, transcript, reference in list(zip(records, texts, units, heard, references))[
            : speech_out.EXAMPLES]:
        speech_out.examples.append({"set": name, "id": rec.meta.get("id"), "question_audio": rec.user_path,
                                    "question": text_form(rec), "answer": reference, "text": text,
                                    "units": [int(u) for u in spoken], "heard": transcript,
                                    "reference_audio": rec.reply_ref_path})
    answered = [(reference, transcript) for reference, transcript in zip(references, heard) if normalise(reference)]
    matched = sum(answer_matches(reference, transcript) for reference, transcript in answered)
    rates = [word_error_rate(text, transcript) if normalise(text) else 1.0 for text, transcript in zip(texts, heard)]
    return {"s2s_acc": matched / len(answered) if answered else None, "answer_wer": sum(rates) / len(rates),
            "s2s_questions": len(records)}


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed (the answer-match comparison)."""
    return " ".join("".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split())


def answer_matches(reference: str, response: str) -> bool:
    """UltraEval-Audio's answer match: the reference answer, normalised, occurs in the normalised response."""
    ref = normalise(reference)
    return bool(ref) and f" {ref} " in f" {normalise(response)} "


@torch.no_grad()
def answer_match_accuracy(model, data: SpokenData, name: str, tokenizer, batch_size: int = 16) -> float:
    """Greedy answer to each record's last user turn (its earlier turns as history), in the record's own mode
    (speech and text when the reference reply is spoken); correct when the reference reply's text occurs in it."""
    model.eval()
    records = data.records[name]
    correct = 0
    for spoken in (False, True):  # a spoken reference is answered in speech and text (s2m), a text one in text
        chosen = [rec for rec in records if (rec.codes is not None) == spoken]
        budgets = []
        for rec in chosen:
            budget = len(encode_text(tokenizer, rec.text)) + 8
            if spoken:  # the text stream of a spoken reply runs one token per slot, then <|sil|>
                budget = max(budget, spoken_reply_budget(len(rec.codes), model.config.audio_config.group_size))
            budgets.append(budget)
        said = answers(model, data, chosen, f"answer match {name}", "s2m" if spoken else "s2t", budgets, batch_size)
        correct += sum(answer_matches(rec.text, tokenizer.decode(text, skip_special_tokens=True))
                       for rec, (text, _) in zip(chosen, said))
    return correct / len(records)


def text_form(rec) -> str | None:
    """A record's conversation before its last reply as text (each clip by its transcript), for a plain LLM;
    None when a clip has no transcript or the record has history (a text LLM is asked single questions)."""
    if len(rec.turns) != 2:
        return None
    parts = []
    for piece in rec.turns[0]["pieces"]:
        text = piece.get("text", piece.get("transcript"))
        if not text:
            return None
        parts.append(text)
    return "".join(parts)


@torch.no_grad()
def text_answer_match(llm, tokenizer, data: SpokenData, name: str, batch_size: int = 16) -> float | None:
    """A plain causal LM asked each record's question in text (the clip's transcript): answer match; None when no
    record of the set has transcripts."""
    asked = [(text_form(rec), rec) for rec in data.records[name]]
    asked = [(q, rec) for q, rec in asked if q]
    if not asked:
        return None
    llm.eval()
    correct = 0
    for start in range(0, len(asked), batch_size):
        chunk = asked[start:start + batch_size]
        budget = max(len(encode_text(tokenizer, rec.text)) for _, rec in chunk) + 8
        for (_, rec), row in zip(chunk, text_answers(llm, tokenizer, [q for q, _ in chunk], budget)):
            correct += answer_matches(rec.text, tokenizer.decode(row, skip_special_tokens=True))
    return correct / len(asked)


# What the world's evaluation measures that a user's manifests (no world, no `meta` of fac's tasks) cannot give.
WORLD_ONLY_METRICS = ["spoken_qa_acc", "spoken_qa_acc_unseen_voices", "text_qa_acc", "spoken_qa_acc_noisy",
                      "emotion_acc", "empathy_acc", "instruction_acc"]


def evaluate_sets(stage: str, model_dir: str, manifest_dir: str, data_root: str, sets: list[str],
                  placement: Placement = CPU, batch_size: int = 16, speech_out: SpeechOut | None = None) -> dict:
    """Source manifests: what can be scored without the world, per evaluation set: `answer_match_<set>` (the
    reference reply's text in the model's answer), `speech_token_acc_<set>` (teacher-forced SRH accuracy on the
    spoken references), with `speech_out` (a detokenizer and an ASR scorer) speech to speech on the records with a
    spoken reference (`s2s_acc_<set>`, `answer_wer_<set>`, `s2s_questions_<set>`: `speech_to_speech`), and for a
    plain LLM `text_answer_match_<set>` (asked the clips' transcripts). `skipped` lists what the world's evaluation
    has and these sets cannot give. The model runs on `placement` (see `evaluate`)."""
    tokenizer = load_tokenizer(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    skipped = list(WORLD_ONLY_METRICS)
    metrics: dict = {}
    if config.get("model_type") != "funaudiochat":
        llm = AutoModelForCausalLM.from_pretrained(model_dir).to(placement.device)
        holder = _TextSets(manifest_dir, sets)
        for name in sets:
            with placement.autocast():
                score = text_answer_match(llm, tokenizer, holder, name)
            if score is None:
                skipped.append(f"text_answer_match_{name} (no transcripts)")
            else:
                metrics[f"text_answer_match_{name}"] = score
    else:
        model = load_checkpoint(model_dir).to(placement.device)
        special = SpecialIds.from_tokenizer(tokenizer, model.config)
        features = FeatureCache(data_root, model.config.audio_config.num_mel_bins)
        data = SpokenData(manifest_dir, {n: 1.0 for n in sets}, features, tokenizer, special,
                          model.config.audio_config.group_size)
        for name in sets:
            with placement.autocast():
                metrics[f"answer_match_{name}"] = answer_match_accuracy(model, data, name, tokenizer, batch_size)
            spoken = [rec for rec in data.records[name] if rec.codes is not None]
            if spoken:
                with placement.autocast():
                    metrics[f"speech_token_acc_{name}"] = speech_token_accuracy(model, data, name)
            else:
                skipped.append(f"speech_token_acc_{name} (no spoken references)")
            if speech_out is None:
                continue
            if not spoken:
                skipped.append(f"s2s_acc_{name}, answer_wer_{name} (no spoken references)")
                continue
            with placement.autocast():
                scored = speech_to_speech(model, data, name, tokenizer, speech_out, batch_size)
            if scored["s2s_acc"] is None:
                skipped.append(f"s2s_acc_{name} (no reference answer: meta.answer or the reply's text)")
            metrics.update({f"{key}_{name}": value for key, value in scored.items() if value is not None})
    metrics.update(efficiency(model_dir))
    metrics["skipped"] = skipped
    log.info("%s: %s (skipped: %s)", stage, {k: v for k, v in metrics.items() if k != "skipped"}, ", ".join(skipped))
    return metrics


class _TextSets:
    """The records of evaluation manifests without features (a plain LLM reads their transcripts only)."""

    def __init__(self, manifest_dir: str, sets: list[str]):
        self.records = {n: [SpokenRecord(r, f"{manifest_dir}/{n}.jsonl") for r in load_records(manifest_dir, n)]
                        for n in sets}


def evaluate(stage: str, model_dir: str, world_dir: str | None, manifest_dir: str, data_root: str,
             sets: list[str] | None = None, placement: Placement = CPU, batch_size: int = 16,
             speech_out: SpeechOut | None = None) -> dict:
    """All metrics that apply to a checkpoint: a plain LLM gets text QA only, a DRSR model everything (with
    `speech_out`, the speech-to-speech metrics too). Without a world (data source manifests), `evaluate_sets` on the
    named evaluation manifests.

    The model runs on `placement` (fac.devices.resolve; `fac eval --gpus --precision`): moved to its device, its
    inputs too, generation and forward passes under autocast in its dtype on GPU; CPU fp32 by default."""
    if not world_dir:
        return evaluate_sets(stage, model_dir, manifest_dir, data_root, sets or [], placement, batch_size, speech_out)
    tokenizer = load_tokenizer(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("model_type") != "funaudiochat":
        llm = AutoModelForCausalLM.from_pretrained(model_dir).to(placement.device)
        with placement.autocast():
            text_qa = text_qa_accuracy(llm, tokenizer, world_dir)
        return {"text_qa_acc": text_qa, **efficiency(model_dir)}
    model = load_checkpoint(model_dir).to(placement.device)
    special = SpecialIds.from_tokenizer(tokenizer, model.config)
    features = FeatureCache(data_root, model.config.audio_config.num_mel_bins)
    names = ["spoken_qa_test", "spoken_qa_test_unseen_voices"]
    optional = [n for n in (NOISY_TEST, "paraling_test", INSTRUCT_TEST, MULTITURN_TEST)
                if (Path(manifest_dir) / f"{n}.jsonl").is_file()]
    data = SpokenData(manifest_dir, {n: 1.0 for n in names + optional}, features, tokenizer, special,
                      model.config.audio_config.group_size)
    with placement.autocast():
        metrics = _world_metrics(model, data, tokenizer, world_dir, optional, batch_size, speech_out)
    metrics.update(efficiency(model_dir))
    log.info("%s: %s", stage, metrics)
    return metrics


def _world_metrics(model, data: SpokenData, tokenizer, world_dir: str, optional: list[str], batch_size: int,
                   speech_out: SpeechOut | None = None) -> dict:
    """The world's metrics of a DRSR model (see `evaluate`)."""
    metrics = {
        "spoken_qa_acc": spoken_qa_accuracy(model, data, "spoken_qa_test", tokenizer, batch_size),
        "spoken_qa_acc_unseen_voices": spoken_qa_accuracy(model, data, "spoken_qa_test_unseen_voices", tokenizer,
                                                          batch_size),
        "text_qa_acc": text_qa_accuracy(model.language_model, tokenizer, world_dir),
        "speech_token_acc": speech_token_accuracy(model, data, "spoken_qa_test"),
    }
    # One metric per DPO dimension: robustness, instruction following, audio understanding, empathy.
    if NOISY_TEST in optional:
        metrics["spoken_qa_acc_noisy"] = spoken_qa_accuracy(model, data, NOISY_TEST, tokenizer, batch_size)
    if "paraling_test" in optional:
        metrics.update(paralinguistic_accuracy(model, data, "paraling_test", tokenizer, batch_size))
    if INSTRUCT_TEST in optional:
        metrics.update(instruction_accuracy(model, data, INSTRUCT_TEST, batch_size, speech_out))
    if MULTITURN_TEST in optional:
        metrics.update(multiturn_accuracy(model, data, MULTITURN_TEST, tokenizer, batch_size))
    if speech_out is not None:  # heard, as the anchors are scored: s2s_acc, answer_wer (+ _unseen_voices)
        for name, suffix in (("spoken_qa_test", ""), ("spoken_qa_test_unseen_voices", "_unseen_voices")):
            scored = speech_to_speech(model, data, name, tokenizer, speech_out, batch_size)
            metrics.update({f"{key}{suffix}": value for key, value in scored.items()})
    return metrics


def efficiency(model_dir: str | Path) -> dict:
    """Training cost of the stage that wrote the checkpoint (its train_summary.json): mean optimizer-step
    time and LLM input tokens per second. Checkpoints no training wrote (init, merge) have none."""
    path = Path(model_dir) / "train_summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    out = {}
    if summary.get("step_seconds_mean") is not None:
        out["train_step_seconds"] = float(summary["step_seconds_mean"])
    if summary.get("tokens_per_second") is not None:
        out["train_tokens_per_second"] = float(summary["tokens_per_second"])
    return out


def collect(stage_files: dict[str, str], extra: dict[str, str] | None = None) -> dict:
    """{stage: {metric: value}} from per-stage metric files (and e.g. the encoder's own metrics)."""
    table = {stage: json.loads(Path(path).read_text()) for stage, path in stage_files.items()}
    for stage, path in (extra or {}).items():
        table.setdefault(stage, {}).update(json.loads(Path(path).read_text()))
    return table


def markdown_table(table: dict[str, dict]) -> str:
    metrics = sorted({m for row in table.values() for m, v in row.items() if not isinstance(v, list)})
    lines = ["| stage | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for stage, row in table.items():
        cells = [f"{row[m]:.3f}" if isinstance(row.get(m), float) else str(row.get(m, "")) for m in metrics]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
