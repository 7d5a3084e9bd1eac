"""The text tokenizer, one component with two kinds (`text_tokenizer.kind`): `train` (byte-level BPE trained on the
world's text) or `pretrained` (a Hugging Face tokenizer folder, e.g. Qwen3's). Either way it carries Fun-Audio-Chat's
special tokens and is saved as a transformers tokenizer folder, so `AutoTokenizer.from_pretrained(dir)` loads it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# The official model's special tokens (ARCH_NOTES §2), in a fixed order so their ids are stable.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                  "<|audio_eos|>", "<|audio_pad|>", "<|sil|>"]
# Where the released Fun-Audio-Chat checkpoint has them: Qwen3's own ids for the chat tokens, and the audio tokens
# right after Qwen3's 151,669 tokens (DESIGN.md, "Facts about the released checkpoint").
RELEASED_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151669,
                "<|audio_bos|>": 151670, "<|audio_eos|>": 151671, "<|audio_pad|>": 151672, "<|sil|>": 151673}
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


def adopt_pretrained(source: str | Path, out_dir: str | Path):
    """A pretrained tokenizer folder with Fun-Audio-Chat's special tokens added where missing, saved under `out_dir`.

    Tokens are appended in SPECIAL_TOKENS' order, so Qwen3's tokenizer (151,669 tokens, the chat tokens at
    151643-151645) gets the audio tokens at exactly the released checkpoint's ids; a tokenizer that already has
    them keeps its own ids, and nothing else of it changes (its merges, its chat template).
    """
    folder = Path(source)
    if not folder.is_dir() or not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"text_tokenizer.path {folder}: not a tokenizer folder (expected tokenizer.json or "
                                "tokenizer_config.json in it, as a Hugging Face model folder has)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    before = len(tokenizer)
    known = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS if token not in known]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    log.info("text tokenizer %s: %d tokens, added %s -> %d tokens", folder, before, missing or "nothing", len(tokenizer))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def released_id_mismatches(tokenizer) -> dict[str, tuple[int, int]]:
    """token -> (its id here, its id in the released checkpoint) for every special token that sits elsewhere."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in RELEASED_IDS}
    return {token: (ids[token], want) for token, want in RELEASED_IDS.items() if ids[token] != want}


class TrainedTextTokenizer:
    """kind `train`: byte-level BPE on the world's sentences (params: vocab_size)."""

    def __init__(self, params: dict):
        self.vocab_size = int(params["vocab_size"])

    def build(self, sentences: list[str], out_dir: str | Path):
        return train_tokenizer(sentences, self.vocab_size, out_dir)


class PretrainedTextTokenizer:
    """kind `pretrained`: a Hugging Face tokenizer folder (params: path), Fun-Audio-Chat's tokens added."""

    def __init__(self, params: dict):
        self.path = params["path"]

    def build(self, sentences: list[str], out_dir: str | Path):
        return adopt_pretrained(self.path, out_dir)


KINDS = {"train": TrainedTextTokenizer, "pretrained": PretrainedTextTokenizer}


def text_tokenizer(params: dict):
    """The text tokenizer that `params` (the `text_tokenizer` section) names."""
    kind = params.get("kind", "train")
    if kind not in KINDS:
        raise ValueError(f"text_tokenizer.kind {kind!r}: unknown; expected one of {sorted(KINDS)}")
    return KINDS[kind](params)


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
