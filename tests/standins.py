"""Tiny random stand-ins, in the real formats, for the components the paper takes pretrained: only sizes differ.

`qwen_tokenizer`: a Qwen-style byte-level BPE tokenizer folder whose special tokens sit where Qwen3's do (its 26
added tokens at 151643-151668, so `len()` is Qwen3's 151,669) and no audio tokens, as Qwen3 ships; it has only a few
real merges, and the ids between them and 151643 are unused fillers that no merge produces.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# Qwen3's added tokens in id order from 151643 (its tokenizer.json).
QWEN3_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
               "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
               "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
               "</tool_response>", "<think>", "</think>"]
QWEN3_FIRST_ADDED_ID = 151643
QWEN3_EMBEDDING_ROWS = 151936


def qwen_tokenizer(folder: str | Path, corpus: list[str] | None = None, merges_vocab: int = 600) -> Path:
    """Write the stand-in under `folder` (tokenizer.json + tokenizer_config.json of class Qwen2Tokenizer)."""
    corpus = corpus or ["the capital of france is paris", "what is the colour of the sky", "hello world"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=merges_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus + [" " + s for s in corpus], trainer=trainer)
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), QWEN3_FIRST_ADDED_ID):
        vocab[f"<|unused_{i}|>"] = i
    spec["added_tokens"] = [{"id": QWEN3_FIRST_ADDED_ID + i, "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": token.startswith("<|")}
                            for i, token in enumerate(QWEN3_ADDED)]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    folder = Path(folder)
    fast.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))
    assert len(AutoTokenizer.from_pretrained(folder)) == QWEN3_FIRST_ADDED_ID + len(QWEN3_ADDED)
    return folder


def qwen3_llm(folder: str | Path, hidden_size: int = 32, layers: int = 2, vocab_size: int = QWEN3_EMBEDDING_ROWS,
              seed: int = 0) -> Path:
    """A random Qwen3 causal LM folder (config.json + model.safetensors) with Qwen3's 151,936 embedding rows."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden_size // 2, max_position_embeddings=512, rope_theta=1_000_000.0,
                         bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return Path(folder)
