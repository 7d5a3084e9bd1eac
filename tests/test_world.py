"""The tiny world: a seeded knowledge base whose facts split into speech-train and text-only test facts."""
import pytest

from fac.data.asr import out_of_vocabulary
from fac.data.world import (SourceError, all_sentences, build_world, load_source, qa_pairs, text_documents,
                            vocabulary, write_world)


@pytest.fixture(scope="module")
def source(lexicon_path):
    return load_source(lexicon_path)


def test_same_seed_same_world_other_seed_other_world(source):
    a = build_world(source, 20, 0.3, seed=1)
    assert a.to_json() == build_world(source, 20, 0.3, seed=1).to_json()
    assert a.to_json() != build_world(source, 20, 0.3, seed=2).to_json()


def test_entity_count_and_distinct_names_come_from_params(source):
    world = build_world(source, 37, 0.3, seed=1)
    names = [e["name"] for e in world.entities]
    assert len(names) == 37 == len(set(names))
    assert len(world.facts) == 37 * len(source["attributes"])


def test_test_facts_are_only_in_text_documents_not_speech_train(source):
    world = build_world(source, 40, 0.25, seed=3)
    test = [f for f in world.facts if f["split"] == "test"]
    assert len(test) == 10 * len(source["attributes"])  # stratified: 25% of entities per attribute
    docs = set(text_documents(world, source))
    for fact in test:  # every test fact is stated in the text documents
        assert any(fact["name"] in d and fact["value"] in d for d in docs)
    train_q = {p["fact"] for p in qa_pairs(world, source) if p["split"] == "train"}
    assert not train_q & {f["id"] for f in test}


def test_every_word_is_known_to_the_asr_dictionary(source):
    world = build_world(source, 50, 0.3, seed=1)
    assert out_of_vocabulary(vocabulary(all_sentences(world, source))) == []


def test_too_many_entities_for_the_lexicon_is_an_error(source):
    with pytest.raises(SourceError, match="n_entities=1000"):
        build_world(source, 1000, 0.3, seed=1)


def test_missing_text_source_names_the_file(tmp_path):
    with pytest.raises(SourceError, match=str(tmp_path / "nope.yaml") + ": text source not found"):
        load_source(tmp_path / "nope.yaml")


def test_empty_text_source_names_the_file(tmp_path):
    empty = tmp_path / "lexicon.yaml"
    empty.write_text("\n")
    with pytest.raises(SourceError, match="text source is empty"):
        load_source(empty)


def test_template_without_name_is_refused(tmp_path, lexicon_path):
    text = lexicon_path.read_text().replace('"where does {name} live"', '"where does it live"')
    bad = tmp_path / "lexicon.yaml"
    bad.write_text(text)
    with pytest.raises(SourceError, match="where does it live"):
        load_source(bad)


def test_write_world_files_and_counts(source, tmp_path):
    world = build_world(source, 10, 0.3, seed=1)
    stats = write_world(world, source, tmp_path)
    assert stats["facts"] == 40 and stats["test_facts"] == 12
    # every fact in each of its 3 statements, and each of the 4 emotions named and answered
    assert len((tmp_path / "corpus.txt").read_text().splitlines()) == stats["documents"] == 40 * 3 + 4 * 2
    assert len((tmp_path / "text_qa.jsonl").read_text().splitlines()) == stats["qa_pairs"] == 40 * 2
