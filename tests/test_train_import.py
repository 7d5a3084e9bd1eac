"""Components the paper takes pretrained, imported: a Qwen3 LLM folder is saved with the experiment's tokenizer
(its rows resized only when they must be), and the DRSR model takes the LLM's geometry and vocabulary from it."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config

from fac.data.text_tokenizer import RELEASED_IDS, adopt_pretrained
from fac.train import stages
from standins import QWEN3_EMBEDDING_ROWS, qwen3_llm, qwen_tokenizer


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A Qwen3 folder as a researcher has it on disk, and the experiment's tokenizer adopted from it."""
    root = tmp_path_factory.mktemp("qwen3")
    folder = qwen3_llm(qwen_tokenizer(root / "Qwen3"))
    adopt_pretrained(folder, root / "tokenizer")
    return folder, root / "tokenizer"


def test_imported_qwen3_keeps_every_tensor_and_its_rows_and_is_saved_with_the_experiments_tokenizer(qwen, tmp_path):
    folder, tokenizer_dir = qwen
    summary = stages.train_base_llm({"import": str(folder)}, {}, "", str(tokenizer_dir), tmp_path / "base_llm", "", {})
    assert summary["resized"] is False and summary["embedding_rows"] == QWEN3_EMBEDDING_ROWS
    source, saved = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "base_llm/model.safetensors"))
    assert saved.keys() == source.keys()
    assert [name for name in source if not torch.equal(source[name], saved[name])] == []
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base_llm")
    assert len(tokenizer) == 151674 and tokenizer.convert_tokens_to_ids("<|sil|>") == RELEASED_IDS["<|sil|>"]


def test_import_resizes_the_embeddings_only_when_the_tokenizer_has_more_tokens(qwen, tmp_path):
    _, tokenizer_dir = qwen
    small = qwen3_llm(tmp_path / "small", vocab_size=151669)  # as many rows as Qwen3 has tokens: five too few
    summary = stages.import_llm(str(small), AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "base_llm")
    assert summary["resized"] is True
    saved = load_file(str(tmp_path / "base_llm/model.safetensors"))
    before = load_file(str(small / "model.safetensors"))
    assert saved["model.embed_tokens.weight"].shape[0] == 151674
    assert torch.equal(saved["model.embed_tokens.weight"][:151669], before["model.embed_tokens.weight"])


def test_import_refuses_a_folder_of_another_model_type_and_names_it(qwen, tmp_path):
    _, tokenizer_dir = qwen
    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=f"base_llm.import {tmp_path / 'gpt2'}: a 'gpt2' model"):
        stages.import_llm(str(tmp_path / "gpt2"), AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        stages.import_llm(str(tmp_path / "nothing"), AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_drsr_config_takes_the_imported_llms_geometry_rows_and_the_tokenizers_ids(qwen, tmp_path):
    from transformers import AutoConfig

    folder, tokenizer_dir = qwen
    params = {"speech": {"group_size": 5}, "srh": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 32},
              "encoder": {"num_mel_bins": 128, "d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2,
                          "encoder_ffn_dim": 32, "n_window": 50, "max_source_positions": 50}}
    config = stages.model_config(params, AutoTokenizer.from_pretrained(tokenizer_dir), 6565,
                                 llm_config=AutoConfig.from_pretrained(folder))
    text = config.text_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers) == (QWEN3_EMBEDDING_ROWS, 32, 2)
    assert config.audio_token_index == RELEASED_IDS["<|AUDIO|>"]
    assert json.loads(config.to_json_string())["text_config"]["vocab_size"] == 151936


# ------------------------------------------------------------------ init.released (the released weights)

@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from standins import released_checkpoint

    folder = released_checkpoint(tmp_path_factory.mktemp("released") / "Fun-Audio-Chat-8B")
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return folder


def s3_tokenizer_config(folder, codes: int = 6561):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"codebook_size": codes}))
    return folder


def test_init_from_the_released_weights_keeps_every_tensor_bit_for_bit(released, qwen, tmp_path):
    _, tokenizer_dir = qwen
    shards = sorted({f for f in json.loads((released / "model.safetensors.index.json").read_text())["weight_map"].values()})
    assert len(shards) > 1  # sharded, as released
    stages.init_from_released(str(released), str(tokenizer_dir), str(s3_tokenizer_config(tmp_path / "s3")),
                              str(tmp_path / "init"))
    source = {}
    for shard in shards:
        source.update(load_file(str(released / shard)))
    from fac.model import load_checkpoint

    saved = load_checkpoint(tmp_path / "init").state_dict()
    assert [name for name in source if not torch.equal(source[name], saved[name])] == []
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "init")
    assert tokenizer.convert_tokens_to_ids("<|AUDIO|>") == 151669


def test_released_weights_with_another_tokenizer_are_refused_naming_the_ids(released, tmp_path):
    from fac.data.text_tokenizer import train_tokenizer

    train_tokenizer(["the red cat", "a blue dog"], 300, tmp_path / "bpe")  # the tiny world's own BPE: ids from 0
    with pytest.raises(ValueError, match=r"init.released .*puts special tokens where the checkpoint does not "
                                         r"\(pad: tokenizer 0, checkpoint 151643"):
        stages.init_from_released(str(released), str(tmp_path / "bpe"), str(s3_tokenizer_config(tmp_path / "s3")),
                                  str(tmp_path / "init"))
    assert not (tmp_path / "init").exists()


def test_released_weights_with_another_speech_codebook_are_refused(released, qwen, tmp_path):
    _, tokenizer_dir = qwen
    with pytest.raises(ValueError, match=r"gives a codebook of 260 \(256 codes \+ 4 specials\), the checkpoint's is 6565"):
        stages.init_from_released(str(released), str(tokenizer_dir), str(s3_tokenizer_config(tmp_path / "km", 256)),
                                  str(tmp_path / "init"))


def test_released_folder_missing_a_shard_is_named(released, qwen, tmp_path):
    import shutil

    _, tokenizer_dir = qwen
    broken = tmp_path / "broken"
    shutil.copytree(released, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=shard.name):
        stages.init_from_released(str(broken), str(tokenizer_dir), str(s3_tokenizer_config(tmp_path / "s3")),
                                  str(tmp_path / "init"))
