"""Data source manifests (fac.data.imported): the user's official-format records taken in whole, or refused with
file, line and reason; missing assistant speech tokens computed; multi-turn conversations kept turn by turn."""
import json

import pytest

from fac.data import steps
from fac.data.imported import PREFERENCE_FILE, Refused, import_manifests, record_turns
from fac.data.manifests import AUDIO_PLACEHOLDER
from standins import official_dataset, s3_tokenizer_file


@pytest.fixture(scope="module")
def taken_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    data = official_dataset(root / "user")
    s3 = s3_tokenizer_file(root / "s3.pt", width=64, layers=1)
    speech_tokenizer = root / "data/speech_tokenizer"
    steps.train_speech_tokenizer({"kind": "s3", "path": str(s3), "codebook_size": 6561}, None, str(root / "data"),
                                 str(speech_tokenizer))
    out = root / "data/manifests"
    summary = import_manifests(str(data["folder"] / "manifests"), str(data["folder"] / "media"),
                               ["prealign", "sft", "eval"], "preferences", str(speech_tokenizer), str(root / "data"),
                               str(out))
    return {"root": root, "data": data, "out": out, "summary": summary, "speech_tokenizer": speech_tokenizer}


def test_kept_and_refused_records_are_counted_and_listed(taken_in):
    assert taken_in["summary"] == {"kept": taken_in["data"]["kept"], "refused": {"sft": 3}}
    refusals = [json.loads(line) for line in (taken_in["out"] / "refusals.jsonl").read_text().splitlines()]
    assert [(r["file"].rsplit("/", 1)[-1], r["line"]) for r in refusals] == taken_in["data"]["refused"]
    reasons = [r["reason"] for r in refusals]
    assert reasons[0].startswith("not valid JSON")
    assert "no_such_clip.wav: no such audio file" in reasons[1]
    assert "must alternate, user first" in reasons[2]


def test_audio_paths_resolve_from_the_data_folder_and_tokens_are_filled_in(taken_in):
    from fac.train.data import SpokenRecord

    root = taken_in["root"] / "data"
    records = [json.loads(line) for line in (taken_in["out"] / "sft.jsonl").read_text().splitlines()]
    for record in records:
        rec = SpokenRecord(record, "sft")
        assert all((root / clip).is_file() for clip in rec.clips)
        assert rec.codes is None or (rec.codes and all(0 <= c < 6561 for c in rec.codes))
    two = next(SpokenRecord(r, "sft") for r in records if r["meta"]["id"] == "two-turns")
    assert [t["role"] for t in two.turns] == ["user", "assistant", "user", "assistant"]
    assert two.turns[2]["pieces"][0] == {"text": "and again? "} and len(two.clips) == 2
    assert two.text == "still paris" and two.codes  # computed by the S3 tokenizer from the reply's wav
    assert records[0]["meta"]["source"].endswith("sft.jsonl") and records[0]["meta"]["line"] == 1


def test_a_multi_turn_conversation_trains_on_every_assistant_turn(taken_in):
    import torch

    from fac.data.text_tokenizer import text_tokenizer
    from fac.model.processing import IGNORE_INDEX, SpecialIds
    from fac.train.data import FeatureCache, SpokenData
    from fac.train.stages import load_tokenizer
    from standins import qwen_tokenizer

    folder = taken_in["root"] / "tokenizer"
    text_tokenizer({"kind": "pretrained", "path": str(qwen_tokenizer(taken_in["root"] / "qwen"))}).build([], folder)
    tok = load_tokenizer(folder)

    def enc(text):
        return tuple(tok.encode(text, add_special_tokens=False))

    def one(token):
        return tok.convert_tokens_to_ids(token)

    special = SpecialIds(enc("<|im_start|>system\n"), enc("<|im_start|>user\n"), enc("<|im_start|>assistant\n"),
                         enc("<|im_end|>\n"), audio=one("<|AUDIO|>"), audio_bos=one("<|audio_bos|>"),
                         audio_eos=one("<|audio_eos|>"), text_pad=tok.pad_token_id, speech_bos=6561, speech_pad=6562)
    data = SpokenData(taken_in["out"], {"sft": 1.0}, FeatureCache(taken_in["root"] / "data", 128), tok, special, 5)
    two = next(r for r in data.records["sft"] if r.meta["id"] == "two-turns")
    example = data.example(two)
    labelled = example.labels != IGNORE_INDEX
    # both replies are labelled: the text one ("it is paris") and the spoken one (its audio span)
    assert tok.decode(example.labels[labelled][: len(enc("it is paris"))].tolist()) == "it is paris"
    assert int((example.input_ids[labelled] == special.audio_bos).sum()) == 1
    assert len(example.speech_ids) == 3 and example.input_features[2] is None  # user, user, assistant
    assert torch.equal(example.speech_ids[2][:10], torch.full((10,), 6561))


def test_a_manifest_with_no_record_left_is_an_error_naming_it_and_the_reasons_are_kept(taken_in, tmp_path):
    source = tmp_path / "manifests"
    source.mkdir()
    (source / "bad.jsonl").write_text('{"system": "", "messages": []}\n')
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"bad\.jsonl could be taken \(1 refused"):
        import_manifests(str(source), None, ["bad"], None, str(taken_in["speech_tokenizer"]), str(tmp_path), str(out))
    assert "'messages' is empty" in (out / "refusals.jsonl").read_text()
    with pytest.raises(FileNotFoundError, match="absent.jsonl: manifest not found"):
        import_manifests(str(source), None, ["absent"], None, str(taken_in["speech_tokenizer"]), str(tmp_path), str(out))


@pytest.mark.parametrize("record, reason", [
    ({"system": "", "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER}]}, "ends with a user turn"),
    ({"system": "", "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                                 {"role": "assistant", "content": "x"}], "audio": []}, "more audio placeholders"),
    ({"system": "", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "audio": [{"path": "a.wav"}]}, "1 audio entries but 0 audio placeholders"),
    ({"system": "", "messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "say " + AUDIO_PLACEHOLDER}], "audio": [{}]},
     "mixes text and audio"),
    ({"system": "", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": AUDIO_PLACEHOLDER}],
      "audio": [{"text": "hi", "token": "<|audio_pad|>"}]}, "not <|audio_bos|> delay tokens"),
    ({"system": "", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": AUDIO_PLACEHOLDER}],
      "audio": [{"text": "hi", "token": ""}]}, "no speech tokens and no wav"),
])
def test_records_the_model_cannot_take_are_refused_with_the_reason(record, reason):
    with pytest.raises(Refused, match=reason.replace("|", r"\|")):
        record_turns(record)


def test_preference_pairs_keep_their_dimension(taken_in):
    pairs = [json.loads(line) for line in (taken_in["out"] / PREFERENCE_FILE).read_text().splitlines()]
    assert [p["dimension"] for p in pairs] == ["general", "robustness", "general", "robustness"]
    assert all(p["chosen"]["codes"] and p["rejected"]["codes"] for p in pairs)
