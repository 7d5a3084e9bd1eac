"""The BPE text tokenizer: trained on the world's text, one token per word, the official special tokens."""
from transformers import AutoTokenizer

from fac.data.text_tokenizer import SPECIAL_TOKENS, special_ids, tokens_per_word, train_tokenizer
from fac.data.world import all_sentences, build_world, load_source, vocabulary


def test_tokenizer_round_trip_and_one_token_per_word(lexicon_path, tmp_path):
    source = load_source(lexicon_path)
    world = build_world(source, 20, 0.3, seed=1)
    sentences = all_sentences(world, source)
    train_tokenizer(sentences, 1024, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tokens_per_word(tok, vocabulary(sentences)) == 1.0
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
