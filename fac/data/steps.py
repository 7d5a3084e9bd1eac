"""The data half of the DAG, one function per Snakemake rule (called through `fac data <step>`).

Every step reads its inputs, writes its declared outputs atomically at the end, and logs what it did;
audio paths in every JSONL are relative to the experiment's data folder (`results/{exp}/data`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from fac import atomic, faults
from fac.data import world as world_mod
from fac.data.plan import plan_utterances

log = logging.getLogger("fac.data")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON: {err}") from err
    if not rows:
        raise ValueError(f"{path}: is empty (the step that writes it produced nothing)")
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_json(obj, path: str | Path) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def build_world(params: dict, source: str, out_dir: str) -> dict:
    src = world_mod.load_source(source)
    world = world_mod.build_world(src, params["n_entities"], params["test_fraction"], params["seed"])
    stats = world_mod.write_world(world, src, out_dir)
    log.info("world: %s", stats)
    return stats


def build_text_tokenizer(params: dict, world_dir: str | None, out_dir: str) -> dict:
    """The text tokenizer, trained on the world's sentences or adopted from a folder (no world: source manifests,
    where only `pretrained` applies; tokens per word are then not measured)."""
    from fac.data.text_tokenizer import released_id_mismatches, special_ids, text_tokenizer, tokens_per_word

    if world_dir:
        sentences = [s for s in (Path(world_dir) / "sentences.txt").read_text().split("\n") if s.strip()]
    elif params.get("kind", "train") == "train":
        raise ValueError("text_tokenizer kind 'train' learns from the world's sentences; without a world (data source "
                         "manifests) use kind 'pretrained' with a tokenizer folder")
    else:
        sentences = []
    tok = text_tokenizer(params).build(sentences, out_dir)
    words = (Path(world_dir) / "vocabulary.txt").read_text().split() if world_dir else []
    stats = {"kind": params.get("kind", "train"), "vocab_size": len(tok),
             "tokens_per_word": tokens_per_word(tok, words) if words else None,
             "special_ids": special_ids(tok), "released_ids": not released_id_mismatches(tok)}
    write_json(stats, Path(out_dir) / "stats.json")
    log.info("text tokenizer: %s", stats)
    return stats


def synthesize(params: dict, world_dir: str, source: str, data_root: str, out_jsonl: str) -> dict:
    from fac.data.tts import engine, synthesize_all

    tts, paraling = params["tts"], params["paraling"]
    synthesiser = engine(tts)
    synthesiser.check_voices(tts["train_voices"] + tts["test_voices"] + [tts["assistant_voice"]])
    overlap = set(tts["train_voices"]) & set(tts["test_voices"])
    if overlap:
        raise ValueError(f"tts.test_voices must be held out of training, but {sorted(overlap)} are also in "
                         "tts.train_voices")
    world = world_mod.World.load(Path(world_dir) / "world.json")
    jobs = plan_utterances(world, world_mod.load_source(source), tts, paraling, params["seed"],
                           params.get("instruction"), params.get("multiturn"))
    wav_dir = Path(data_root) / "tts" / synthesiser.folder
    done = synthesize_all(jobs, wav_dir, workers=tts["workers"], desc="tts", synthesiser=synthesiser)
    for job in done:
        job["path"] = f"tts/{synthesiser.folder}/{job['id']}.wav"
    write_jsonl(done, out_jsonl)
    stats = {"utterances": len(done), "hours": sum(j["duration"] for j in done) / 3600,
             "by_kind": dict(Counter(j["kind"] for j in done)), "by_split": dict(Counter(j["split"] for j in done))}
    log.info("tts: %s", stats)
    return stats


def build_asr_lm(params: dict, world_dir: str, out_dir: str) -> None:
    from fac.data.asr import write_arpa, write_dictionary

    sentences = [s for s in (Path(world_dir) / "sentences.txt").read_text().split("\n") if s.strip()]
    words = (Path(world_dir) / "vocabulary.txt").read_text().split()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_dictionary(words, out / "words.dict")
    write_arpa(sentences, out / "lm.arpa", order=params["lm_order"])
    log.info("asr lm: %d sentences, %d words, order %d", len(sentences), len(words), params["lm_order"])


def asr_filter(params: dict, utterances: str, lm_dir: str, data_root: str, out_jsonl: str, report: str) -> dict:
    from fac.data.asr import filter_utterances, recognizer, wer_statistics

    rows = read_jsonl(utterances)
    scorer = recognizer(params, lm_dir)
    scored, stats = filter_utterances(rows, data_root, scorer, params["max_wer"], desc="asr filter",
                                      workers=params["workers"])
    # The paper filters the synthesised training speech; test sets are scored but kept whole, so
    # that held-out voices the ASR finds hard are still measured.
    for u in scored:
        if u["split"] not in params["filter_splits"] and u["kind"] != "answer":
            u["kept"] = True
    stats.update({k: v for k, v in wer_statistics(scored, params["max_wer"]).items() if k in ("kept", "dropped")})
    stats["filter_splits"] = params["filter_splits"]
    by_kind = {}
    for kind in sorted({u["kind"] for u in scored}):
        group = [u for u in scored if u["kind"] == kind]
        by_kind[kind] = {"total": len(group), "kept": sum(u["kept"] for u in group),
                         "wer_mean": statistics.fmean(u["wer"] for u in group)}
    stats["by_kind"] = by_kind
    by_voice = {}
    for voice in sorted({u["voice"] for u in scored}):
        group = [u for u in scored if u["voice"] == voice]
        by_voice[voice] = {"total": len(group), "kept": sum(u["kept"] for u in group),
                           "wer_mean": statistics.fmean(u["wer"] for u in group)}
    stats["by_voice"] = by_voice
    kept = [u for u in scored if u["kept"]]
    # The assistant's answer clips are the speech targets: a dropped one would silently remove tasks.
    lost = [u["text"] for u in scored if u["kind"] == "answer" and not u["kept"]]
    if lost:
        log.warning("asr filter dropped assistant answer clips %s; they are kept (targets, not inputs)", lost)
        kept += [u for u in scored if u["kind"] == "answer" and not u["kept"]]
    stats["answer_clips_kept_anyway"] = len(lost)
    write_jsonl(kept, out_jsonl)
    write_json(stats, report)
    log.info("asr filter on splits %s: kept %d of %d (max_wer %.2f); WER mean %.3f median %.3f p90 %.3f max %.3f",
             params["filter_splits"], stats["kept"], stats["total"], params["max_wer"], stats["wer_mean"], stats["wer_median"],
             stats["wer_p90"], stats["wer_max"])
    for kind, s in by_kind.items():
        log.info("  %-10s kept %4d / %4d  mean WER %.3f", kind, s["kept"], s["total"], s["wer_mean"])
    for voice, s in by_voice.items():
        log.info("  %-22s kept %4d / %4d  mean WER %.3f", voice, s["kept"], s["total"], s["wer_mean"])
    return stats


def make_noisy(params: dict, filtered: str, data_root: str, out_jsonl: str) -> dict:
    """Noisy copies of the kept questions: one random SNR for train, every SNR for the test splits."""
    from fac.data.audio import read_wav, write_wav
    from fac.data.augment import add_noise
    from tqdm import tqdm

    rows = [u for u in read_jsonl(filtered) if u["kind"] == "question" and u["split"] in params["splits"]]
    rng = np.random.default_rng(params["seed"])
    pick = random.Random(params["seed"])
    babble_pool = [u for u in read_jsonl(filtered) if u["kind"] == "statement"] or rows
    babble = [read_wav(Path(data_root) / u["path"]) for u in pick.sample(babble_pool, min(20, len(babble_pool)))]
    out_dir = Path(data_root) / "noisy" / "wavs"
    noisy = []
    for u in tqdm(rows, desc="noisy copies", mininterval=2):
        snrs = [pick.choice(params["snr_db"])] if u["split"] == "train" else params["snr_db"]
        clean = read_wav(Path(data_root) / u["path"])
        for snr in snrs:
            kind = pick.choice(params["kinds"])
            copy = dict(u, id=f"{u['id']}-n{snr:g}{kind[0]}", noise={"snr_db": snr, "kind": kind, "source": u["id"]})
            copy["path"] = f"noisy/wavs/{copy['id']}.wav"
            write_wav(Path(data_root) / copy["path"], add_noise(clean, snr, rng, kind, babble_sources=babble))
            noisy.append(copy)
    write_jsonl(noisy, out_jsonl)
    stats = {"copies": len(noisy), "by_split": dict(Counter(u["split"] for u in noisy)),
             "by_snr": {str(k): v for k, v in Counter(u["noise"]["snr_db"] for u in noisy).items()}}
    log.info("noisy: %s", stats)
    return stats


def train_speech_tokenizer(params: dict, filtered: str, data_root: str, out_dir: str) -> dict:
    from fac.data.audio import read_wav
    from fac.data.speech_tokenizer import S3SpeechTokenizer, SpeechTokenizer, frame_features

    if params["kind"] == "s3":  # pretrained: nothing to learn, the file becomes the experiment's tokenizer folder
        tok = S3SpeechTokenizer.from_file(params["path"])
        if tok.codebook_size != params["codebook_size"]:
            raise ValueError(f"speech_tokenizer.path {params['path']}: {tok.codebook_size} codes, but "
                             f"speech_tokenizer.codebook_size is {params['codebook_size']}")
        tok.save(out_dir)
        stats = {"kind": "s3", "version": tok.version, "codebook_size": tok.codebook_size, "source": params["path"]}
        log.info("speech tokenizer: %s", stats)
        return stats
    rows = [u for u in read_jsonl(filtered) if u["split"] in ("train", "assistant")]
    feats = [frame_features(read_wav(Path(data_root) / u["path"]), n_mels=params["n_mels"]) for u in rows]
    tok = SpeechTokenizer.train(feats, params["codebook_size"], params["seed"], max_frames=params["max_frames"],
                                n_mels=params["n_mels"])
    tok.save(out_dir)
    stats = {"utterances": len(rows), "frames": int(sum(len(f) for f in feats)), "codebook_size": params["codebook_size"]}
    log.info("speech tokenizer: %s", stats)
    return stats


def speech_tokens(tokenizer_dir: str, inputs: list[str], data_root: str, out_jsonl: str, out_stats: str) -> dict:
    from fac.data.audio import read_wav
    from fac.data.speech_tokenizer import load_speech_tokenizer, usage_stats
    from tqdm import tqdm

    tok = load_speech_tokenizer(tokenizer_dir)
    rows = [u for path in inputs for u in read_jsonl(path)]
    out = []
    for u in tqdm(rows, desc="speech tokens", mininterval=2):
        out.append({"id": u["id"], "codes": tok.encode(read_wav(Path(data_root) / u["path"]))})
        faults.point("speech_tokens")
    write_jsonl(out, out_jsonl)
    stats = usage_stats([r["codes"] for r in out], codebook_size=tok.codebook_size)
    write_json(stats, out_stats)
    log.info("speech tokens: %d utterances, %s", len(out), stats)
    return stats


def make_manifests(params: dict, inputs: list[str], tokens: str, out_dir: str) -> dict:
    from fac.data.manifests import build_manifests, write_manifests

    rows = [u for path in inputs for u in read_jsonl(path)]
    codes = {r["id"]: r["codes"] for r in read_jsonl(tokens)}
    missing = [u["id"] for u in rows if u["id"] not in codes]
    if missing:
        raise ValueError(f"{tokens}: no speech tokens for {len(missing)} utterances, e.g. {missing[:3]}")
    manifests = build_manifests(rows, codes, params["tasks"])
    counts = write_manifests(manifests, out_dir, params["expected"])
    write_json(counts, Path(out_dir) / "counts.json")
    log.info("manifests: %s", counts)
    return counts


def data_report(tts_jsonl: str, filtered: str, asr_report: str, noisy: str, tokens_stats: str,
                manifest_counts: str, tokenizer_stats: str, out_md: str, out_json: str, out_png: str) -> dict:
    """A small report of the data half: utterances, hours, voices, WER filter, manifests."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows, kept = read_jsonl(tts_jsonl), read_jsonl(filtered)
    asr = json.loads(Path(asr_report).read_text())
    noisy_rows = read_jsonl(noisy)
    counts = json.loads(Path(manifest_counts).read_text())
    text_tok = json.loads(Path(tokenizer_stats).read_text())
    report = {
        "synthesised": {"utterances": len(all_rows), "hours": round(sum(u["duration"] for u in all_rows) / 3600, 4),
                        "voices": sorted({u["voice"] for u in all_rows})},
        "asr_filter": {k: asr.get(k, 0) for k in ("total", "kept", "dropped", "wer_mean", "wer_median", "wer_p90",
                                                 "wer_max", "answer_clips_kept_anyway")},
        "kept": {"utterances": len(kept), "hours": round(sum(u["duration"] for u in kept) / 3600, 4),
                 "by_split": dict(Counter(u["split"] for u in kept)), "by_kind": dict(Counter(u["kind"] for u in kept))},
        "noisy": {"utterances": len(noisy_rows), "hours": round(sum(u["duration"] for u in noisy_rows) / 3600, 4)},
        "manifests": counts,
        "text_tokenizer": {"vocab_size": text_tok["vocab_size"], "tokens_per_word": text_tok["tokens_per_word"]},
        "speech_tokens": json.loads(Path(tokens_stats).read_text()),
    }
    write_json(report, out_json)
    wers = [u["wer"] for u in kept]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(wers, bins=20)
    ax.set_xlabel("WER of kept utterances (pocketsphinx, world LM)")
    ax.set_ylabel("utterances")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    lines = ["# Data report", "",
             f"- synthesised: {report['synthesised']['utterances']} utterances, "
             f"{report['synthesised']['hours'] * 60:.1f} minutes, {len(report['synthesised']['voices'])} voices",
             f"- ASR filter: kept {asr['kept']} / {asr['total']} (dropped {asr['dropped']}); WER mean "
             f"{asr['wer_mean']:.3f}, median {asr['wer_median']:.3f}, p90 {asr['wer_p90']:.3f}, max {asr['wer_max']:.3f}"
             + (f"; {asr['answer_clips_kept_anyway']} assistant answer clips above the threshold kept as targets"
                if asr.get("answer_clips_kept_anyway") else ""),
             f"- noisy copies: {len(noisy_rows)}",
             f"- text tokenizer: {text_tok['vocab_size']} tokens, {text_tok['tokens_per_word']:.2f} tokens/word",
             "", "| manifest | records |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in sorted(counts.items())]
    lines += ["", "| voice | kept | total | mean WER |", "|---|---|---|---|"]
    lines += [f"| {v} | {s['kept']} | {s['total']} | {s['wer_mean']:.3f} |" for v, s in asr["by_voice"].items()]
    lines += ["", f"![WER histogram]({Path(out_png).name})", ""]
    Path(out_md).write_text("\n".join(lines))
    return report


def detokenizer_speech_jobs(rows: list[dict], held_out_words: set[str], voice: str, rates: list[int],
                            pitch: int) -> list[dict]:
    """More of the assistant's voice for the detokenizer to learn from: every distinct text of the training split
    (the training facts' questions and statements, the paralinguistic sentences: words the data already speaks,
    never a held-out fact) that has no held-out answer word, spoken in the assistant's voice and pitch at two of its
    answer rates (chosen by the text's hash, so that the set is the same on every run)."""
    texts = sorted({u["text"] for u in rows if u["split"] == "train"})
    jobs = []
    for text in texts:
        if set(text.split()) & held_out_words:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        first = int(digest, 16) % len(rates)
        for rate in dict.fromkeys([rates[first], rates[(first + 1) % len(rates)]]):
            jobs.append({"id": f"d-{digest}-{rate}", "text": text, "voice": voice, "rate": rate, "pitch": pitch,
                         "amplitude": 100})
    return jobs


def detokenizer_test_jobs(held_out: set[str], voice: str, rates: list[int], pitch: int) -> list[dict]:
    """More held-out answers to measure resynthesis on: each held-out value spoken in the assistant's voice at each
    of `rates` (words per minute), beside its recorded answer clips."""
    return [{"id": f"t-{hashlib.sha256(value.encode()).hexdigest()[:8]}-{rate}", "text": value, "voice": voice,
             "rate": rate, "pitch": pitch, "amplitude": 100} for value in sorted(held_out) for rate in rates]


def train_detokenizer(params: dict, tokenizer_dir: str, filtered: str, tokens: str, lm_dir: str | None,
                      data_root: str, out_dir: str, threads: int = 1) -> dict:
    """The tiny detokenizer (fac.data.detokenizer), trained to speak in the assistant's voice on the assistant's
    answer clips and on the training split's sentences spoken again in that voice (detokenizer_speech_jobs: clips
    under `data_root`/detokenizer_speech, kept across a killed run), with their units; then measured on the assistant's
    clips of held-out answer values (one value in `held_out_every`, none of its words in any training clip), and those
    values spoken again at `test_rates` (detokenizer_test_jobs), at most `test_clips` in all: the ASR
    scorer's WER of the original clips, of their own mel through the vocoder, and of their units spoken again
    (resynthesis), and the flow's mel L1 against the clips' own mel. The folder holds the detokenizer and
    `quality.json`. `params`: `detokenizer` (fac.data.detokenizer.build_config's keys, steps, batch_size,
    crop_units, lr, seed, held_out_every, test_rates, test_clips), `tts` (the engine that speaks, its workers) and
    `asr` (the scorer, with the LM in `lm_dir` for pocketsphinx)."""
    import time

    import torch
    from tqdm import tqdm

    from fac.data.asr import recognizer, word_error_rate
    from fac.data.audio import read_wav
    from fac.data.detokenizer import log_mel, train_flow_detokenizer
    from fac.data.speech_tokenizer import load_speech_tokenizer
    from fac.data.tts import engine, synthesize_all

    torch.set_num_threads(threads)
    detokenizer_params, asr = params["detokenizer"], params["asr"]
    rows = read_jsonl(filtered)
    codes = {r["id"]: r["codes"] for r in read_jsonl(tokens)}
    assistant = [u for u in rows if u["split"] == "assistant" and codes.get(u["id"])]
    # The assistant speaks the answers' values, each in every style: one value in `held_out_every` is held out
    # (all the assistant's clips of it, and every sentence with one of its words), so that resynthesis is measured
    # on words the flow never heard.
    values = sorted({u["text"] for u in assistant})
    held_out = set(values[::detokenizer_params["held_out_every"]])
    train = [u for u in assistant if u["text"] not in held_out]
    test = [u for u in assistant if u["text"] in held_out]
    if not train or not test:
        raise ValueError(f"{filtered}: {len(assistant)} clips of the assistant, {len(test)} of them held out; the "
                         "detokenizer needs the assistant's voice to learn and held-out clips to measure")
    voice, pitch = assistant[0]["voice"], int(assistant[0]["pitch"])
    speech_dir = Path(data_root) / "detokenizer_speech"  # not under tts/: the tts rule's folder
    jobs = detokenizer_speech_jobs(rows, {w for v in held_out for w in v.split()}, voice,
                                   sorted({int(u["rate"]) for u in assistant}), pitch)
    synthesiser = engine(params["tts"])
    spoken = synthesize_all(jobs, speech_dir, workers=params["tts"]["workers"], desc="detokenizer: speech",
                            synthesiser=synthesiser)
    tokenizer = load_speech_tokenizer(tokenizer_dir)
    # The recorded held-out answers, then the same values spoken at `test_rates`: enough clips that the WER of the
    # resynthesis is measured to a few hundredths (each clip of a one-word answer moves the mean by 1 / clips).
    extra_tests = synthesize_all(detokenizer_test_jobs(held_out, voice, detokenizer_params["test_rates"], pitch),
                                 speech_dir, workers=params["tts"]["workers"], desc="detokenizer: held-out answers",
                                 synthesiser=synthesiser)
    test = [dict(u, path=str(Path(data_root) / u["path"])) for u in test]
    for job in extra_tests:
        path = speech_dir / job["path"]
        units = tokenizer.encode(read_wav(path))
        if units:
            codes[job["id"]] = units
            test.append(dict(job, path=str(path)))
    test = test[: detokenizer_params["test_clips"]]
    examples = [(codes[u["id"]], log_mel(read_wav(Path(data_root) / u["path"]), len(codes[u["id"]])), u["voice"])
                for u in train]
    for job in tqdm(spoken, desc="detokenizer: units and mel", unit="clip", mininterval=2):
        samples = read_wav(speech_dir / job["path"])
        units = tokenizer.encode(samples)
        if units:
            examples.append((units, log_mel(samples, len(units)), voice))
    started = time.time()
    bar = tqdm(total=detokenizer_params["steps"], desc="detokenizer: flow", unit="step", mininterval=2)
    detokenizer, losses = train_flow_detokenizer(examples, tokenizer.codebook_size, voice, detokenizer_params,
                                                 progress=lambda loss: bar.update(1))
    bar.close()
    train_seconds = time.time() - started
    scorer = recognizer(asr, lm_dir)
    original, inverted, resynthesised, mel_l1 = [], [], [], []
    for u in tqdm(test, desc="detokenizer: resynthesis", unit="clip", mininterval=2):
        units = codes[u["id"]]
        samples = read_wav(u["path"])
        mel = log_mel(samples, len(units))
        sampled = detokenizer.mel(units)  # sampled once: for its L1 and for the resynthesis heard
        mel_l1.append(float((sampled - mel).abs().mean()))
        # The clip's own mel through the vocoder: what the vocoder alone costs (a flow that were exact would get it).
        heard = scorer.transcribe_batch([samples, detokenizer.vocoder(mel), detokenizer.vocoder(sampled)])
        for rates, transcript in zip((original, inverted, resynthesised), heard):
            rates.append(word_error_rate(u["text"], transcript))
    quality = {"train_clips": len(examples), "answer_clips": len(train), "sentence_clips": len(spoken),
               "voice": voice, "held_out_values": sorted(held_out), "test_clips": len(test),
               "steps": detokenizer_params["steps"],
               "final_loss": round(statistics.fmean(losses[-50:]), 4) if losses else None,
               "wer_original": round(statistics.fmean(original), 4),
               "wer_vocoder_of_original_mel": round(statistics.fmean(inverted), 4),
               "wer_resynthesised": round(statistics.fmean(resynthesised), 4),
               "mel_l1": round(statistics.fmean(mel_l1), 4)}
    detokenizer.save(out_dir, extra={"quality.json": json.dumps(quality, indent=2) + "\n"})
    # The wall time goes to the log (and the rule's benchmark), not into quality.json: outputs hold only what the
    # inputs decide, so that a rerun or a killed run's rerun writes the same bytes.
    log.info("detokenizer: %s; flow trained in %.1f s", quality, train_seconds)
    return quality
