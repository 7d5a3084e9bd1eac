"""The text tokenizer: BPE trained on the world's text (one token per word, the official special tokens), or a
pretrained folder (Qwen3's) with Fun-Audio-Chat's audio tokens added at the released checkpoint's ids."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fac.data.text_tokenizer import (RELEASED_IDS, SPECIAL_TOKENS, adopt_pretrained, released_id_mismatches, special_ids,
                                     text_tokenizer, tokens_per_word, train_tokenizer)
from standins import qwen_tokenizer
from fac.data.world import all_sentences, build_world, load_source, vocabulary


def test_tokenizer_round_trip_and_one_token_per_word(lexicon_path, tmp_path):
    source = load_source(lexicon_path)
    world = build_world(source, 20, 0.3, seed=1)
    sentences = all_sentences(world, source)
    train_tokenizer(sentences, 1024, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tokens_per_word(tok, vocabulary(sentences)) == 1.0
    # An answer starts the assistant's turn (no space before it): each fact's value and each emotion's name is one
    # token there too, so that an answer of a few tokens can say it.
    answers = {f["value"] for f in world.facts} | set(source["paralinguistic"]["replies"])
    assert {a for a in answers if len(tok.encode(a, add_special_tokens=False)) != 1} == set()
    text = sentences[0]
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids_in_fixed_order(lexicon_path, tmp_path):
    source = load_source(lexicon_path)
    tok = train_tokenizer(all_sentences(build_world(source, 5, 0.3, seed=1), source), 512, tmp_path)
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = special_ids(tok)
    encoded = tok.encode("<|im_start|>user\n<|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|><|im_end|>",
                         add_special_tokens=False)
    assert encoded[0] == ids["im_start"] and encoded[-1] == ids["eos"]
    assert encoded.count(ids["audio"]) == 2 and ids["audio_bos"] in encoded and ids["audio_eos"] in encoded


# ------------------------------------------------------------------ kind pretrained (Qwen3's tokenizer)

@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return qwen_tokenizer(tmp_path_factory.mktemp("qwen3"))


def test_pretrained_qwen_tokenizer_gets_the_audio_tokens_at_the_released_ids(qwen_folder, tmp_path):
    source = AutoTokenizer.from_pretrained(qwen_folder)
    text_tokenizer({"kind": "pretrained", "path": str(qwen_folder)}).build([], tmp_path)
    adopted = AutoTokenizer.from_pretrained(tmp_path)  # as saved: what every later stage loads
    assert released_id_mismatches(adopted) == {}
    assert {t: adopted.convert_tokens_to_ids(t) for t in RELEASED_IDS} == RELEASED_IDS
    assert len(adopted) == len(source) + 5 == 151674  # five audio tokens; the chat tokens were Qwen's already
    ids = special_ids(adopted)
    assert (ids["pad"], ids["im_start"], ids["eos"], ids["audio"], ids["sil"]) == (151643, 151644, 151645, 151669, 151673)
    text = "the capital of france is paris"
    assert adopted.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False)
    encoded = adopted.encode("<|audio_bos|><|AUDIO|><|sil|>", add_special_tokens=False)
    assert encoded == [151670, 151669, 151673]  # each a single id, never split into bytes


def test_a_tokenizer_that_has_the_tokens_keeps_its_ids(qwen_folder, tmp_path):
    first = adopt_pretrained(qwen_folder, tmp_path / "once")
    again = adopt_pretrained(tmp_path / "once", tmp_path / "twice")
    assert len(again) == len(first) and again.get_vocab() == first.get_vocab()


def test_another_vocabulary_gets_the_tokens_appended_and_says_where_they_differ(tmp_path):
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.train_from_iterator(["a small other vocabulary"], trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=other).save_pretrained(tmp_path / "other")
    adopted = adopt_pretrained(tmp_path / "other", tmp_path / "out")
    base = len(AutoTokenizer.from_pretrained(tmp_path / "other"))
    assert [adopted.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(base, base + len(SPECIAL_TOKENS)))
    assert released_id_mismatches(adopted)["<|AUDIO|>"] == (base + 3, 151669)
    assert adopted.pad_token == "<|endoftext|>"


def test_pretrained_path_that_is_not_a_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"text_tokenizer.path {tmp_path / 'missing'}: not a tokenizer folder"):
        adopt_pretrained(tmp_path / "missing", tmp_path / "out")


def test_text_tokenizer_step_adopts_a_pretrained_folder_and_records_its_ids(qwen_folder, lexicon_path, tmp_path):
    from fac.data import steps

    world = tmp_path / "world"
    steps.build_world({"n_entities": 5, "test_fraction": 0.3, "seed": 1}, str(lexicon_path), str(world))
    stats = steps.build_text_tokenizer({"kind": "pretrained", "path": str(qwen_folder)}, str(world), str(tmp_path / "tok"))
    assert stats["kind"] == "pretrained" and stats["released_ids"] is True and stats["vocab_size"] == 151674
    assert stats["special_ids"]["audio_bos"] == 151670
