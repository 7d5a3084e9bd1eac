"""fac.data.asr: a hand-written ARPA LM and a pruned dictionary make pocketsphinx transcribe the world's speech."""

import numpy as np
import pytest

from fac.data import asr, audio, tts

SENTENCES = ["the red cat sat on the mat", "a blue dog ran to the park", "the green bird sang in the tree"]
WORDS = sorted({w for s in SENTENCES for w in s.split()})
# Measured: both voices transcribed exactly at rate 150. en-gb and en-gb+f1 lose "ran" (WER 0.29 on
# that sentence); Scottish, Caribbean and NYC accents do worse.
VOICES = ["en-us", "en-gb-x-rp+m1"]


def read_arpa(path):
    """{n-gram tuple: (log10 p, log10 bow)} of an ARPA file, checking its header counts."""
    declared, grams, order = {}, {}, 0
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.startswith("ngram "):
            k, count = line[len("ngram "):].split("=")
            declared[int(k)] = int(count)
        elif line.endswith("-grams:"):
            order = int(line[1:].split("-")[0])
        elif line and order and not line.startswith("\\"):
            fields = line.split("\t")
            gram = tuple(fields[1].split())
            assert len(gram) == order
            grams[gram] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
    for k, count in declared.items():
        assert sum(len(g) == k for g in grams) == count, f"header says {count} {k}-grams"
    return grams


def backoff_probability(grams, history, word):
    if history + (word,) in grams:
        return 10 ** grams[history + (word,)][0]
    weight = 10 ** grams[history][1] if history in grams else 1.0
    return weight * backoff_probability(grams, history[1:], word)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """LM, dictionary and one clip per sentence and voice."""
    folder = tmp_path_factory.mktemp("world")
    asr.write_arpa(SENTENCES, folder / "lm.arpa")
    asr.write_dictionary(WORDS, folder / "words.dict")
    jobs = [dict(id=f"{voice}-{i}", text=text, voice=voice, rate=150, pitch=50, amplitude=100)
            for voice in VOICES for i, text in enumerate(SENTENCES)]
    utterances = tts.synthesize_all(jobs, folder / "wavs")
    return folder, utterances, asr.Recognizer(folder / "lm.arpa", folder / "words.dict")


def test_pronunciations_list_every_variant():
    assert asr.pronunciations(["read", "cat"]) == {"read": ["R EH D", "R IY D"], "cat": ["K AE T"]}


def test_out_of_vocabulary_finds_made_up_words():
    assert asr.out_of_vocabulary(["cat", "zorbleflax", "Qwimbly"]) == ["qwimbly", "zorbleflax"]


def test_pronunciation_dict_is_pocketsphinx_bundled_cmudict():
    path = asr.pronunciation_dict_path()
    assert path.name == "cmudict-en-us.dict" and path.is_file()


def test_write_dictionary_holds_only_the_words_with_all_variants(tmp_path):
    asr.write_dictionary(["read", "cat"], tmp_path / "d.dict")
    assert (tmp_path / "d.dict").read_text().splitlines() == ["cat K AE T", "read R EH D", "read(2) R IY D"]


def test_write_dictionary_rejects_oov_words_naming_them(tmp_path):
    with pytest.raises(ValueError, match=r"1 word\(s\) have no pronunciation .*\['zorbleflax'\]"):
        asr.write_dictionary(["cat", "zorbleflax"], tmp_path / "d.dict")
    assert not (tmp_path / "d.dict").exists()


def test_arpa_header_counts_match_the_sections(tmp_path):
    asr.write_arpa(SENTENCES, tmp_path / "lm.arpa")
    grams = read_arpa(tmp_path / "lm.arpa")  # asserts the counts
    assert sum(len(g) == 1 for g in grams) == len(WORDS) + 2  # and <s>, </s>
    assert ("<s>", "the", "red") in grams and ("mat", "</s>") in grams


def test_arpa_every_context_distribution_sums_to_one(tmp_path):
    asr.write_arpa(SENTENCES + ["the cat ran", "a dog sat on the mat"], tmp_path / "lm.arpa")
    grams = read_arpa(tmp_path / "lm.arpa")
    vocabulary = [g[0] for g in grams if len(g) == 1 and g[0] != "<s>"]
    seen_contexts = [g for g in grams if len(g) < 3 and g != ("</s>",)]
    unseen_contexts = [("mat", "cat"), ("park", "the"), ("tree",)]
    for history in [()] + seen_contexts + unseen_contexts:
        total = sum(backoff_probability(grams, history, word) for word in vocabulary)
        assert total == pytest.approx(1.0, abs=1e-4), history


def test_arpa_prefers_the_seen_continuation(tmp_path):
    asr.write_arpa(SENTENCES, tmp_path / "lm.arpa")
    grams = read_arpa(tmp_path / "lm.arpa")
    assert backoff_probability(grams, ("red",), "cat") > 10 * backoff_probability(grams, ("red",), "dog")


def test_arpa_normalises_case_and_punctuation(tmp_path):
    asr.write_arpa(["The Red cat!", "the red cat"], tmp_path / "lm.arpa")
    assert {g[0] for g in read_arpa(tmp_path / "lm.arpa") if len(g) == 1} == {"<s>", "</s>", "the", "red", "cat"}


def test_arpa_without_words_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no words"):
        asr.write_arpa(["", "?!"], tmp_path / "lm.arpa")


def test_recognizer_names_a_missing_language_model(tmp_path):
    asr.write_dictionary(WORDS, tmp_path / "words.dict")
    with pytest.raises(FileNotFoundError, match=r"nothere\.arpa: no such language model"):
        asr.Recognizer(tmp_path / "nothere.arpa", tmp_path / "words.dict")


def test_recognizer_rejects_a_dictionary_missing_lm_words(tmp_path):
    asr.write_arpa(SENTENCES, tmp_path / "lm.arpa")
    asr.write_dictionary(["the", "red", "cat"], tmp_path / "words.dict")
    with pytest.raises(ValueError, match=r"words\.dict: lacks 14 word\(s\) of .*lm\.arpa: \['a', 'bird'"):
        asr.Recognizer(tmp_path / "lm.arpa", tmp_path / "words.dict")


def test_word_error_rate_ignores_case_and_punctuation():
    assert asr.word_error_rate("The red cat.", "the red cat") == 0.0
    assert asr.word_error_rate("the red cat sat", "the cat sat") == pytest.approx(0.25)


def test_word_error_rate_of_empty_hypothesis_is_one():
    assert asr.word_error_rate("the red cat", "") == 1.0


def test_espeak_speech_round_trips_through_pocketsphinx_exactly(world):
    folder, utterances, recognizer = world
    for u in utterances:
        hypothesis = recognizer.transcribe(audio.read_wav(folder / "wavs" / u["path"]))
        assert asr.word_error_rate(u["text"], hypothesis) == 0.0, (u["voice"], u["text"], hypothesis)


def test_transcript_does_not_depend_on_the_clips_decoded_before(world):
    """Not only the words: the best path's score of a clip is the same after other clips as on a fresh recogniser
    (pocketsphinx's feature state carried over between utterances moved it, and with it some transcripts)."""
    folder, utterances, _ = world
    clips = [audio.read_wav(folder / "wavs" / u["path"]) for u in utterances]
    fresh = asr.Recognizer(folder / "lm.arpa", folder / "words.dict")
    alone = (fresh.transcribe(clips[0]), fresh.decoder.hyp().score)
    used = asr.Recognizer(folder / "lm.arpa", folder / "words.dict")
    for clip in clips[1:] + clips[1:]:
        used.transcribe(clip)
    assert (used.transcribe(clips[0]), used.decoder.hyp().score) == alone


def test_transcribe_of_silence_is_empty(world):
    assert world[2].transcribe(np.zeros(16000, dtype=np.float32)) == ""


def test_filter_utterances_keeps_matching_clips_and_drops_wrong_transcripts(world):
    folder, utterances, recognizer = world
    mislabelled = dict(utterances[0], text="a blue dog ran to the park")  # the clip says the red cat
    judged, stats = asr.filter_utterances(utterances + [mislabelled], folder / "wavs", recognizer, max_wer=0.2)
    assert [u["kept"] for u in judged] == [True] * len(utterances) + [False]
    assert all(u["asr_text"] == u_in["text"] for u, u_in in zip(judged, utterances))
    assert judged[-1]["wer"] > 0.5
    assert stats["total"] == len(utterances) + 1 and stats["kept"] == len(utterances) and stats["dropped"] == 1
    assert stats["wer_median"] == 0.0 and stats["wer_max"] == judged[-1]["wer"]
    assert stats["wer_histogram"]["0"] == len(utterances) and sum(stats["wer_histogram"].values()) == stats["total"]


def test_filter_utterances_raises_on_an_unreadable_wav_naming_it(world, tmp_path):
    folder, utterances, recognizer = world
    (tmp_path / "broken.wav").write_bytes(b"not audio at all")
    with pytest.raises(audio.AudioError, match=r"broken\.wav: not a readable audio file"):
        asr.filter_utterances([{"path": "broken.wav", "text": "the red cat"}], tmp_path, recognizer, max_wer=0.2)


# ------------------------------------------------------------------ engine whisper (transformers, batched)

def test_whisper_scorer_transcribes_a_batch_as_it_transcribes_each_clip(tmp_path):
    from standins import whisper_asr

    scorer = asr.recognizer({"engine": "whisper", "model": str(whisper_asr(tmp_path / "whisper")), "batch_size": 3})
    rng = np.random.default_rng(0)
    clips = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (8000, 16000, 24000, 4000)]
    batched = scorer.transcribe_batch(clips)
    assert len(batched) == 4 and all(isinstance(t, str) and t == t.lower() for t in batched)
    assert batched == [scorer.transcribe(clip) for clip in clips]


def test_whisper_filter_scores_every_clip_in_batches(tmp_path, world):
    from standins import whisper_asr

    folder, utterances, _ = world
    scorer = asr.WhisperRecognizer(whisper_asr(tmp_path / "whisper"), batch_size=4)
    judged, stats = asr.filter_utterances(utterances, folder / "wavs", scorer, max_wer=0.5, workers=2)
    assert [u["id"] for u in judged] == [u["id"] for u in utterances]
    assert stats["total"] == len(utterances) and stats["kept"] == sum(u["wer"] <= 0.5 for u in judged)


def test_whisper_model_folder_must_be_complete(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half/config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"asr.model .*half: lacks \['preprocessor_config.json'\]"):
        asr.WhisperRecognizer(tmp_path / "half")
