"""Speech recognition for the tiny world: pocketsphinx with an n-gram LM built from the world's text.
It filters synthesised clips by word error rate and scores spoken answers."""

from __future__ import annotations

import functools
import math
import os
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import jiwer
import numpy as np
import pocketsphinx
from tqdm import tqdm

from fac import atomic, faults
from fac.data import audio

# Upper edges of the WER histogram's bins, right-closed so that they agree with `wer <= max_wer`.
HISTOGRAM_EDGES = tuple(round(0.1 * step, 1) for step in range(1, 11))


def normalize_text(text: str) -> str:
    """Lower-case words of letters, digits and apostrophes: the form of the LM, the dict and WER."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def pronunciation_dict_path() -> Path:
    """pocketsphinx's bundled CMU pronouncing dictionary."""
    return Path(pocketsphinx.get_model_path("en-us/cmudict-en-us.dict"))


@functools.lru_cache(maxsize=1)
def _cmudict() -> dict[str, list[str]]:
    entries: dict[str, list[str]] = defaultdict(list)
    with open(pronunciation_dict_path(), encoding="utf-8") as handle:
        for line in handle:
            head, _, phones = line.strip().partition(" ")
            # Variants are spelled word(2), word(3), ...; file order is variant order.
            entries[head.split("(", 1)[0]].append(phones.strip())
    return dict(entries)


def pronunciations(words) -> dict[str, list[str]]:
    """Every pronunciation (a string of phones) of each known word; unknown words are left out."""
    table = _cmudict()
    return {word: list(table[word]) for word in (w.lower() for w in words) if word in table}


def out_of_vocabulary(words) -> list[str]:
    """The words, sorted and unique, that the bundled dictionary cannot pronounce."""
    table = _cmudict()
    return sorted({w.lower() for w in words if w.lower() not in table})


def write_dictionary(words, path) -> None:
    """Write a pocketsphinx dictionary holding exactly these words, with all their variants."""
    words = sorted({w.lower() for w in words})
    unknown = out_of_vocabulary(words)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} word(s) have no pronunciation in {pronunciation_dict_path()}: "
                         f"{unknown}; expected words of that dictionary (or add pronunciations for them)")
    table = pronunciations(words)
    lines = []
    for word in words:
        for index, phones in enumerate(table[word]):
            lines.append(f"{word if index == 0 else f'{word}({index + 1})'} {phones}")
    atomic.write_text(path, "\n".join(lines) + "\n")


def write_arpa(sentences: list[str], path, order: int = 3) -> None:
    """Write an ARPA back-off n-gram LM of the sentences, smoothed with interpolated Witten-Bell.

    P(w|h) = (c(h w) + T(h) P(w|h')) / (c(h) + T(h)), T(h) = distinct words seen after h, down to a
    uniform distribution under the unigrams. In back-off form a seen n-gram keeps that probability and
    an unseen one gets bow(h) P(w|h') with bow(h) = T(h) / (c(h) + T(h)); every distribution sums to 1.
    """
    if order < 1:
        raise ValueError(f"{path}: LM order {order}; expected 1 or more")
    token_lists = [["<s>", *words, "</s>"] for words in (normalize_text(s).split() for s in sentences) if words]
    if not token_lists:
        raise ValueError(f"{path}: no words in the {len(sentences)} sentence(s) given; expected text to build the LM from")
    # A section with no n-grams does not load, so the order stops at the longest padded sentence.
    order = min(order, max(len(tokens) for tokens in token_lists))

    # counts[k][(w1..wk)]: n-grams of order k; <s> is a context only, never predicted.
    counts: list[Counter] = [Counter() for _ in range(order + 1)]
    for tokens in token_lists:
        for k in range(1, order + 1):
            for end in range(max(k - 1, 1), len(tokens)):
                counts[k][tuple(tokens[end - k + 1:end + 1])] += 1
    vocabulary = sorted({gram[0] for gram in counts[1]})  # predicted words and </s>
    context_total: list[Counter] = [Counter() for _ in range(order + 1)]
    context_types: list[Counter] = [Counter() for _ in range(order + 1)]
    for k in range(1, order + 1):
        for gram, count in counts[k].items():
            context_total[k][gram[:-1]] += count
            context_types[k][gram[:-1]] += 1

    @functools.lru_cache(maxsize=None)
    def probability(history: tuple, word: str) -> float:
        k = len(history) + 1
        if k == 1:
            lower = 1.0 / len(vocabulary)
        else:
            lower = probability(history[1:], word)
        total, types = context_total[k][history], context_types[k][history]
        if total == 0:
            return lower
        return (counts[k][history + (word,)] + types * lower) / (total + types)

    def backoff(history: tuple) -> float | None:
        k = len(history) + 1
        if k > order or context_total[k][history] == 0:
            return None
        return context_types[k][history] / (context_total[k][history] + context_types[k][history])

    sections = []
    unigrams = [(("<s>",), None)] + [((word,), probability((), word)) for word in vocabulary]
    sections.append(unigrams)
    for k in range(2, order + 1):
        sections.append([(gram, probability(gram[:-1], gram[-1])) for gram in sorted(counts[k])])

    lines = ["\\data\\"] + [f"ngram {k}={len(grams)}" for k, grams in enumerate(sections, start=1)] + [""]
    for k, grams in enumerate(sections, start=1):
        lines.append(f"\\{k}-grams:")
        for gram, prob in grams:
            # <s> is never predicted: ARPA marks that with log10 probability -99.
            logprob = -99.0 if prob is None else math.log10(prob)
            weight = backoff(gram) if k < order else None
            entry = f"{logprob:.6f}\t{' '.join(gram)}"
            lines.append(entry if weight is None else f"{entry}\t{math.log10(weight):.6f}")
        lines.append("")
    lines.append("\\end\\")
    atomic.write_text(path, "\n".join(lines) + "\n")


def _arpa_unigrams(path: Path) -> set[str]:
    """The words of an ARPA file's 1-grams section (empty for a binary LM)."""
    words, inside = set(), False
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                inside = True
            elif line.startswith("\\") and inside:
                break
            elif inside and line:
                fields = line.split()
                if len(fields) >= 2:
                    words.add(fields[1])
    return words


class Recognizer:
    """pocketsphinx with its bundled US English acoustic model, the given LM and dictionary."""

    def __init__(self, lm_path, dict_path):
        for name, file in (("language model", lm_path), ("dictionary", dict_path)):
            if not Path(file).is_file():
                raise FileNotFoundError(f"{file}: no such {name} file; expected one written by "
                                        f"{'write_arpa' if name == 'language model' else 'write_dictionary'}")
        self.lm_path, self.dict_path = Path(lm_path), Path(dict_path)
        # pocketsphinx skips LM words missing from the dictionary with only a log line (sent to
        # /dev/null here), so such a word could never be recognised; say so instead.
        spelled = {line.split(maxsplit=1)[0].split("(", 1)[0]
                   for line in self.dict_path.read_text(encoding="utf-8").splitlines() if line.strip()}
        missing = sorted(_arpa_unigrams(self.lm_path) - spelled - {"<s>", "</s>"})
        if missing:
            raise ValueError(f"{dict_path}: lacks {len(missing)} word(s) of {lm_path}: {missing[:20]}; "
                             f"expected write_dictionary of the LM's words")
        self.decoder = pocketsphinx.Decoder(hmm=pocketsphinx.get_model_path("en-us/en-us"), lm=str(lm_path),
                                            dict=str(dict_path), samprate=audio.SAMPLE_RATE, logfn=os.devnull)

    def transcribe(self, samples: np.ndarray) -> str:
        """Lower-case transcript of one 16 kHz float clip ("" when nothing is recognised)."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"samples have shape {samples.shape}; expected a 1-D 16 kHz mono array")
        # espeak-ng pads clips with exact digital silence, whose log energy breaks pocketsphinx's
        # features (measured: mean WER 0.43 without dither, 0.16 with, over 12 voices). A fixed seed
        # keeps the transcript of a clip the same on every run.
        dither = np.random.default_rng(0).standard_normal(len(samples)).astype(np.float32) / 32768.0
        pcm = np.round(np.clip(samples + dither, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        # A transcript must not depend on the clips decoded before it: full_utt takes the cepstral mean from this
        # clip alone, but the feature computation keeps state across utterances all the same (measured: the same
        # clip's best-path score moved after 11 other clips, and a held-out answer heard as "dog" by a fresh decoder
        # was "dublin" after 59 clips), so it is reset first (reinit_feat: the fresh decoder's scores, bit for bit).
        self.decoder.reinit_feat()
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, full_utt=True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        return hypothesis.hypstr.lower().strip() if hypothesis is not None else ""


    def transcribe_batch(self, clips: list[np.ndarray]) -> list[str]:
        return [self.transcribe(clip) for clip in clips]

    def in_worker(self):
        """A picklable recipe for the same recogniser in another process (the filter's worker processes)."""
        return Recognizer, (self.lm_path, self.dict_path)


class WhisperRecognizer:
    """engine `whisper`: a transformers Whisper folder (e.g. whisper-large-v3) through transformers' ASR pipeline,
    `batch_size` clips at a time, on the GPU when there is one. Transcripts are lower-cased as the filter compares."""

    def __init__(self, model_dir, batch_size: int = 16):
        folder = Path(model_dir)
        missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"asr.model {folder}: lacks {missing}; expected a transformers Whisper folder "
                                    "(model, tokenizer and feature extractor, as `save_pretrained` writes them)")
        import torch
        from transformers import pipeline

        self.model_dir, self.batch_size = folder, max(1, int(batch_size))
        self.pipe = pipeline("automatic-speech-recognition", model=str(folder),
                             device=0 if torch.cuda.is_available() else -1)

    def transcribe(self, samples: np.ndarray) -> str:
        return self.transcribe_batch([samples])[0]

    def transcribe_batch(self, clips: list[np.ndarray]) -> list[str]:
        inputs = [{"raw": np.asarray(clip, dtype=np.float32), "sampling_rate": audio.SAMPLE_RATE} for clip in clips]
        outputs = self.pipe(inputs, batch_size=self.batch_size, generate_kwargs={"task": "transcribe"})
        return [out["text"].lower().strip() for out in outputs]

    def in_worker(self):
        return None  # one batched process: the pipeline, not worker processes, makes it fast


def recognizer(params: dict, lm_dir=None):
    """The ASR scorer that `params` (the `asr` section) names: pocketsphinx with the world's LM (from `lm_dir`),
    or Whisper from a local folder."""
    if params["engine"] == "pocketsphinx":
        return Recognizer(Path(lm_dir) / "lm.arpa", Path(lm_dir) / "words.dict")
    if params["engine"] == "whisper":
        return WhisperRecognizer(params["model"], params.get("batch_size", 16))
    raise ValueError(f"asr.engine {params['engine']!r}: unknown; expected pocketsphinx or whisper")


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of the hypothesis against the reference, both normalised as the LM is."""
    reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
    if not reference:
        raise ValueError("reference text has no words; expected the transcript of the clip")
    if not hypothesis:
        return 1.0  # every reference word deleted
    return float(jiwer.wer(reference, hypothesis))


def _histogram(rates: list[float]) -> dict[str, int]:
    bins = {"0": 0}
    lower = 0.0
    for upper in HISTOGRAM_EDGES:
        bins[f"({lower:.1f},{upper:.1f}]"] = 0
        lower = upper
    bins[f">{HISTOGRAM_EDGES[-1]:.1f}"] = 0  # insertions push WER above 1
    keys = list(bins)
    for rate in rates:
        if rate == 0:
            bins["0"] += 1
            continue
        for key, upper in zip(keys[1:], HISTOGRAM_EDGES):
            if rate <= upper:
                bins[key] += 1
                break
        else:
            bins[keys[-1]] += 1
    return bins


def _judge(utterances: list[dict], wav_dir: Path, recognizer: Recognizer, max_wer: float, desc: str,
           position: int = 0) -> list[dict]:
    judged = []
    batch = getattr(recognizer, "batch_size", 1)
    # Stacked bars (one per worker) only on a terminal: in a rule's log they would print cursor codes.
    with tqdm(total=len(utterances), desc=desc, unit="clip", position=position if sys.stderr.isatty() else None) as bar:
        for start in range(0, len(utterances), batch):
            chunk = utterances[start:start + batch]
            for utterance in chunk:
                for key in ("path", "text"):
                    if key not in utterance:
                        raise ValueError(f"utterance {utterance.get('id', utterance)!r} lacks {key!r}; "
                                         "expected keys path and text")
            # read_wav raises AudioError naming the file: a broken clip is a bug upstream, not a drop.
            transcripts = recognizer.transcribe_batch([audio.read_wav(wav_dir / u["path"]) for u in chunk])
            for utterance, transcript in zip(chunk, transcripts):
                rate = word_error_rate(utterance["text"], transcript)
                judged.append(dict(utterance, asr_text=transcript, wer=rate, kept=rate <= max_wer))
            bar.update(len(chunk))
            faults.point("asr")
    return judged


def _judge_in_worker(args) -> list[dict]:
    utterances, wav_dir, (factory, factory_args), max_wer, desc, position = args
    return _judge(utterances, wav_dir, factory(*factory_args), max_wer, desc, position)


def wer_statistics(judged: list[dict], max_wer: float) -> dict:
    """Counts and the WER distribution of judged utterances (each with `wer` and `kept`)."""
    rates = [u["wer"] for u in judged]
    kept = sum(u["kept"] for u in judged)
    return {
        "total": len(judged),
        "kept": kept,
        "dropped": len(judged) - kept,
        "max_wer": max_wer,
        "wer_mean": statistics.fmean(rates) if rates else None,
        "wer_median": statistics.median(rates) if rates else None,
        "wer_p90": float(np.percentile(rates, 90)) if rates else None,
        "wer_max": max(rates) if rates else None,
        "wer_histogram": _histogram(rates),
    }


def filter_utterances(utterances: list[dict], wav_dir, recognizer: Recognizer, max_wer: float,
                      desc: str = "asr", workers: int = 1) -> tuple[list[dict], dict]:
    """Transcribe wav_dir/{path} of every utterance and judge it against its `text`.

    Returns the utterances with `asr_text`, `wer` and `kept` (wer <= max_wer) added, and statistics.
    With workers > 1 the clips are split over that many processes, each with its own decoder (pocketsphinx);
    Whisper transcribes `batch_size` clips at a time in this process instead.
    """
    wav_dir = Path(wav_dir)
    recipe = recognizer.in_worker()
    if workers <= 1 or len(utterances) < 2 * workers or recipe is None:
        judged = _judge(utterances, wav_dir, recognizer, max_wer, desc)
    else:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [utterances[i::workers] for i in range(workers)]
        jobs = [(chunk, wav_dir, recipe, max_wer, f"{desc} [{i}]", i) for i, chunk in enumerate(chunks)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_judge_in_worker, jobs))
        # Undo the round-robin split so the output keeps the input order.
        judged = [None] * len(utterances)
        for i, part in enumerate(parts):
            judged[i::workers] = part
    return judged, wer_statistics(judged, max_wer)
