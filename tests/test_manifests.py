"""Conversation manifests: the official SFT recipe's record layout, built from utterances and tokens."""
import json

import pytest

from fac.data.manifests import (AUDIO_PLACEHOLDER, build_manifests, parse_speech_tokens, read_manifest,
                                write_manifests)


def _utterances():
    return [
        {"id": "q1", "kind": "question", "split": "train", "voice": "en-us+m1", "text": "where does golden river live",
         "path": "tts/wavs/q1.wav", "duration": 1.5, "fact": "e000-city", "qa": "e000-city-q0", "answer": "paris"},
        {"id": "s1", "kind": "statement", "split": "train", "voice": "en-us+m1", "text": "golden river lives in paris",
         "path": "tts/wavs/s1.wav", "duration": 1.3, "fact": "e000-city"},
        {"id": "a-paris", "kind": "answer", "split": "assistant", "voice": "en-us+f2", "text": "paris",
         "path": "tts/wavs/a.wav", "duration": 0.5},
        {"id": "q1-n10w", "kind": "question", "split": "test", "voice": "en-us+m1", "text": "where does golden river live",
         "path": "noisy/wavs/q1-n10w.wav", "duration": 1.5, "fact": "e000-city", "qa": "e000-city-q0",
         "answer": "paris", "noise": {"snr_db": 10, "kind": "white", "source": "q1"}},
    ]


TOKENS = {"q1": [1, 2, 3], "s1": [4, 5], "a-paris": [7, 8, 9, 10], "q1-n10w": [1, 2, 2]}


def test_spoken_qa_record_has_the_official_layout():
    manifests = build_manifests(_utterances(), TOKENS, ["spoken_qa", "asr"])
    record = manifests["spoken_qa_train"][0]
    assert record["system"] == "You are asked to generate both text and speech tokens at the same time."
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][0]["content"] == AUDIO_PLACEHOLDER
    user, assistant = (json.loads(a) for a in record["audio"])
    assert user["path"] == "tts/wavs/q1.wav" and user["text"] == ""
    assert user["token"] == "<|audio_pad|>" * 37  # int(25 * 1.5)
    assert assistant["text"] == "paris" and assistant["path"] == ""
    assert assistant["token"].startswith("<|audio_bos|>" * 10 + "[AU0007]")
    assert parse_speech_tokens(assistant["token"]) == [7, 8, 9, 10]
    assert record["meta"]["answer"] == "paris" and record["meta"]["fact"] == "e000-city"


def test_noisy_test_copies_form_per_snr_manifests_and_asr_pairs_use_clean_audio():
    manifests = build_manifests(_utterances(), TOKENS, ["spoken_qa", "asr"])
    assert set(manifests) == {"spoken_qa_train", "spoken_qa_test_snr10", "asr_train"}
    assert [r["meta"]["id"] for r in manifests["asr_train"]] == ["q1", "s1"]
    asr = json.loads(manifests["asr_train"][1]["audio"][1])
    assert asr["text"] == "golden river lives in paris" and parse_speech_tokens(asr["token"]) == [4, 5]


def test_an_expected_manifest_that_would_be_empty_is_an_error(tmp_path):
    manifests = build_manifests(_utterances(), TOKENS, ["spoken_qa"])
    with pytest.raises(ValueError, match="spoken_qa_test_unseen_voices"):
        write_manifests(manifests, tmp_path, ["spoken_qa_train", "spoken_qa_test_unseen_voices"])
    assert not list(tmp_path.glob("*.jsonl"))  # nothing half-written


def test_read_manifest_names_file_and_line_of_bad_json(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"system": "", "messages": [], "audio": []}\n{oops\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_manifest(path)
    path.write_text("")
    with pytest.raises(ValueError, match="manifest is empty"):
        read_manifest(path)


def _styled_utterances():
    styled = [{"id": f"a-paris-{style}", "kind": "answer", "split": "assistant", "voice": "en-us+f2", "text": "paris",
               "path": f"tts/wavs/a-{style}.wav", "duration": d, "style": style}
              for style, d in (("slowly", 0.8), ("quickly", 0.3))]
    return _utterances() + styled


STYLED_TOKENS = {**TOKENS, "a-paris-slowly": [7, 7, 8, 8, 9, 9, 10], "a-paris-quickly": [7, 9]}


def test_instruct_record_asks_a_style_and_answers_with_the_styled_clip():
    from fac.data.text_tokenizer import instruction_prompt

    manifests = build_manifests(_styled_utterances(), STYLED_TOKENS, ["spoken_qa", "instruct"])
    # clean questions only (the noisy test copy gets none); the normal answer is not a styled one
    assert set(manifests) == {"spoken_qa_train", "spoken_qa_test_snr10", "instruct_train"}
    assert parse_speech_tokens(json.loads(manifests["spoken_qa_train"][0]["audio"][1])["token"]) == [7, 8, 9, 10]
    record = manifests["instruct_train"][0]
    style = record["meta"]["style"]
    assert style in ("slowly", "quickly") and record["system"] == instruction_prompt(style)
    assert record["system"].endswith(f"Say the answer {style}.")
    assistant = json.loads(record["audio"][1])
    assert assistant["text"] == "paris" and parse_speech_tokens(assistant["token"]) == STYLED_TOKENS[f"a-paris-{style}"]
    assert record["meta"]["normal_units"] == 4 and record["meta"]["task"] == "instruct"


def test_instruct_task_without_styled_answers_is_an_error():
    with pytest.raises(ValueError, match="instruction.styles"):
        build_manifests(_utterances(), TOKENS, ["spoken_qa", "instruct"])


def _dialogue_utterances():
    """Two people: golden river (its city a training fact, its pet a test fact) and quiet maple (its city)."""
    def question(uid, split, fact, entity, answer, text):
        return {"id": uid, "kind": "question", "split": split, "voice": "en-us+m1", "text": text,
                "path": f"tts/wavs/{uid}.wav", "duration": 1.0, "fact": fact, "entity": entity, "qa": f"{fact}-q0",
                "answer": answer}

    def reference(uid, split, fact, answer, distance):
        return {"id": uid, "kind": "reference", "split": split, "voice": "en-us+m1", "text": "what pet does that person have",
                "path": f"tts/wavs/{uid}.wav", "duration": 1.2, "fact": fact, "entity": "e000", "answer": answer,
                "distance": distance}

    return [question("q-city", "train", "e000-city", "e000", "paris", "where does golden river live"),
            question("q-pet", "test", "e000-pet", "e000", "dog", "what pet does golden river have"),
            question("q-other", "train", "e001-city", "e001", "tokyo", "where does quiet maple live"),
            reference("m-pet-1", "test", "e000-pet", "dog", 1), reference("m-pet-2", "test", "e000-pet", "dog", 2),
            reference("m-city-1", "train", "e000-city", "paris", 1)]


def test_a_dialogue_refers_back_over_its_distance_to_a_training_fact_of_the_same_person():
    manifests = build_manifests(_dialogue_utterances(), {}, ["multiturn"])
    assert set(manifests) == {"multiturn_test"}  # the training one: its person has no other training fact
    two, three = manifests["multiturn_test"]
    assert two["system"] == "You are asked to generate text tokens." == three["system"]
    assert [json.loads(a)["path"] for a in two["audio"]] == ["tts/wavs/q-city.wav", "tts/wavs/m-pet-1.wav"]
    assert [m["content"] for m in two["messages"]] == [AUDIO_PLACEHOLDER, "paris", AUDIO_PLACEHOLDER, "dog"]
    # distance 2: someone else is asked about in between; a test fact's clip (q-pet) is never an earlier turn
    assert [json.loads(a)["path"] for a in three["audio"]] == ["tts/wavs/q-city.wav", "tts/wavs/q-other.wav",
                                                               "tts/wavs/m-pet-2.wav"]
    assert [m["content"] for m in three["messages"][1::2]] == ["paris", "tokyo", "dog"]
    assert (two["meta"]["distance"], three["meta"]["distance"], three["meta"]["answer"]) == (1, 2, "dog")
    assert three["meta"]["history"] == ["q-city", "q-other"] and three["meta"]["task"] == "multiturn"
