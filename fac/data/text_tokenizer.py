"""The text tokenizer: byte-level BPE trained on the world's text, with Fun-Audio-Chat's special tokens.

Saved as a transformers fast tokenizer, so `AutoTokenizer.from_pretrained(dir)` loads it.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The official model's special tokens (ARCH_NOTES §2), in a fixed order so their ids are stable.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                  "<|audio_eos|>", "<|audio_pad|>", "<|sil|>"]
SYSTEM_PROMPTS = {
    "s2t": "You are asked to generate text tokens.",
    "s2m": "You are asked to generate both text and speech tokens at the same time.",
    # fac's own: speech-text pairs (pre-alignment) must not look like a question to answer, or the
    # model learns to repeat spoken questions instead of answering them.
    "asr": "You are asked to transcribe the speech.",
}
# Audio understanding: a question about how something was said, asked of an emotion clip (answer: the emotion).
AUDIO_QUESTION_PROMPT = "You are asked to tell how the speaker sounds."


def instruction_prompt(style: str) -> str:
    """The system prompt of an instruction-following turn: reply in speech, said in `style` ("slowly")."""
    return f"{SYSTEM_PROMPTS['s2m']} Say the answer {style}."


# The chat template's own words, so that every conversation tokenizes into known merges.
TEMPLATE_TEXT = ["system", "user", "assistant", SYSTEM_PROMPTS["s2t"], SYSTEM_PROMPTS["s2m"]]


def train_tokenizer(sentences: list[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `sentences` and save it under `out_dir` as a transformers tokenizer."""
    if not sentences:
        raise ValueError("text tokenizer: no training sentences (is the world's corpus empty?)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Words are seen with and without a leading space (sentence start vs. middle).
    corpus = [s for s in sentences + TEMPLATE_TEXT] + [" " + s for s in sentences + TEMPLATE_TEXT]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return fast


def special_ids(tokenizer) -> dict[str, int]:
    """The ids the model config needs, read from a tokenizer."""
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    return {"pad": ids["<|endoftext|>"], "bos": ids["<|endoftext|>"], "im_start": ids["<|im_start|>"],
            "eos": ids["<|im_end|>"], "audio": ids["<|AUDIO|>"], "audio_bos": ids["<|audio_bos|>"],
            "audio_eos": ids["<|audio_eos|>"], "audio_pad": ids["<|audio_pad|>"], "sil": ids["<|sil|>"]}


def tokens_per_word(tokenizer, words: list[str]) -> float:
    """Mean number of tokens per word (1.0 = every word is one token, as the tiny LLM prefers)."""
    counts = [len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in words]
    return sum(counts) / max(1, len(counts))
