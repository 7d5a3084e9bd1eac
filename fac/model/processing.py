"""Turn conversations into Fun-Audio-Chat model inputs exactly as the official training pipeline does
(LLaMA-Factory `funaudiochat` template, ARCH_NOTES section 10), batch them, and compute log-mel features."""

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import WhisperFeatureExtractor

IGNORE_INDEX = -100
MEL_FRAMES_PER_SECOND = 100  # Whisper features: hop 160 at 16 kHz
SPEECH_TOKENS_PER_SECOND = 25
SPEECH_DELAY = 10  # speech-bos tokens before the assistant's codes: 2 slots of 5 = 0.4 s


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the template, independent of any tokenizer.

    The prefixes are the ids of "<|im_start|>system\\n", "<|im_start|>user\\n", "<|im_start|>assistant\\n" and
    turn_suffix those of "<|im_end|>\\n". Text: `<|AUDIO|>`, `<|audio_bos|>`, `<|audio_eos|>`, the text pad
    `<|endoftext|>`. Speech codebook: bos (the delay token) and pad (the user's placeholder speech).
    """

    system_prefix: tuple[int, ...]
    user_prefix: tuple[int, ...]
    assistant_prefix: tuple[int, ...]
    turn_suffix: tuple[int, ...]
    audio: int
    audio_bos: int
    audio_eos: int
    text_pad: int
    speech_bos: int
    speech_pad: int

    @classmethod
    def from_config(cls, config, *, system_prefix, user_prefix, assistant_prefix, turn_suffix) -> "SpecialIds":
        """Audio and pad ids from a FunAudioChatConfig; template pieces as token-id sequences."""
        text, audio = config.text_config, config.audio_config
        return cls(
            tuple(system_prefix), tuple(user_prefix), tuple(assistant_prefix), tuple(turn_suffix),
            audio=config.audio_token_index, audio_bos=text.audio_bos_index, audio_eos=text.audio_eos_index,
            text_pad=text.pad_token_id, speech_bos=audio.bos_token_id, speech_pad=audio.pad_token_id,
        )

    @classmethod
    def from_tokenizer(cls, tokenizer, config) -> "SpecialIds":
        """Template pieces encoded by a transformers tokenizer or a `tokenizers.Tokenizer` (no extra special tokens)."""

        def encode(text: str) -> tuple[int, ...]:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            return tuple(getattr(encoded, "ids", encoded))

        return cls.from_config(
            config,
            system_prefix=encode("<|im_start|>system\n"),
            user_prefix=encode("<|im_start|>user\n"),
            assistant_prefix=encode("<|im_start|>assistant\n"),
            turn_suffix=encode("<|im_end|>\n"),
        )


@dataclass
class Example:
    """One conversation: the LLM stream [S] and its audios in `<|AUDIO|>` order (user first, then assistant)."""

    input_ids: torch.Tensor  # [S]
    labels: torch.Tensor  # [S] unshifted: assistant content + turn suffix, IGNORE_INDEX elsewhere
    speech_ids: list[torch.Tensor] = field(default_factory=list)  # per audio [L_a]
    text_ids: list[torch.Tensor] = field(default_factory=list)  # per audio transcript [T_a] (empty for the user)
    input_features: list[torch.Tensor | None] = field(default_factory=list)  # per audio [M, T_f] or None


def speech_length_of_frames(num_frames: int) -> int:
    """The user's placeholder speech length int(25 * seconds) for a clip of `num_frames` mel frames (100/s)."""
    return num_frames * SPEECH_TOKENS_PER_SECOND // MEL_FRAMES_PER_SECOND


def audio_span(num_speech: int, ids: SpecialIds, group_size: int) -> list[int]:
    """`<|audio_bos|>` + ceil(num_speech / G) x `<|AUDIO|>` + `<|audio_eos|>`."""
    return [ids.audio_bos] + [ids.audio] * (-(-num_speech // group_size)) + [ids.audio_eos]


def _user_audio(user_audio: int | torch.Tensor, ids: SpecialIds):
    """(speech placeholder [L], features [M, T] or None) of the user's turn."""
    if isinstance(user_audio, int):
        return torch.full((user_audio,), ids.speech_pad, dtype=torch.long), None
    if not (isinstance(user_audio, torch.Tensor) and user_audio.ndim == 2):
        raise ValueError(
            f"user_audio must be a speech length (int) or log-mel features [n_mels, frames], got {type(user_audio)}"
        )
    length = speech_length_of_frames(user_audio.shape[1])
    return torch.full((length,), ids.speech_pad, dtype=torch.long), user_audio


def _prompt(system_ids, user_speech: torch.Tensor, ids: SpecialIds, group_size: int) -> list[int]:
    """Token ids up to and including "<|im_start|>assistant\\n"."""
    return [
        *ids.system_prefix, *system_ids, *ids.turn_suffix,
        *ids.user_prefix, *audio_span(len(user_speech), ids, group_size), *ids.turn_suffix,
        *ids.assistant_prefix,
    ]


@dataclass
class UserTurn:
    """A user turn: its content in order, each piece token ids (text) or audio (log-mel features [M, T], or a bare
    speech length when there are no features)."""

    pieces: list  # list[list[int] | torch.Tensor | int]


@dataclass
class AssistantTurn:
    """An assistant turn: text, or, with `codes` (25 Hz speech codes), a spoken reply whose transcript is `text_ids`."""

    text_ids: list[int]
    codes: list[int] | None = None


def _is_audio(piece) -> bool:
    return isinstance(piece, int) or isinstance(piece, torch.Tensor)


def build_conversation(system_ids, turns: list, special_ids: SpecialIds, group_size: int, delay: int = SPEECH_DELAY,
                       generation_prompt: bool = False) -> Example:
    """A conversation of any number of turns (UserTurn / AssistantTurn, in order) as the official template lays it
    out: every audio of every turn in `<|AUDIO|>` order, labels on every assistant turn (its content and turn
    suffix). With `generation_prompt` the stream ends with "<|im_start|>assistant\\n" (inference), no reply after it."""
    ids = special_ids
    stream = [*ids.system_prefix, *system_ids, *ids.turn_suffix]
    labels = [IGNORE_INDEX] * len(stream)
    speech_ids, text_ids, features = [], [], []
    for turn in turns:
        if isinstance(turn, UserTurn):
            part = list(ids.user_prefix)
            for piece in turn.pieces:
                if _is_audio(piece):
                    user_speech, user_features = _user_audio(piece, ids)
                    part += audio_span(len(user_speech), ids, group_size)
                    speech_ids.append(user_speech)
                    text_ids.append(torch.zeros(0, dtype=torch.long))
                    features.append(user_features)
                else:
                    part += list(piece)
            part += [*ids.turn_suffix, *ids.assistant_prefix]
            stream += part
            labels += [IGNORE_INDEX] * len(part)
        elif isinstance(turn, AssistantTurn):
            if stream[-len(ids.assistant_prefix):] != list(ids.assistant_prefix):
                raise ValueError("build_conversation: an assistant turn must follow a user turn")
            if turn.codes is None:
                reply = [*turn.text_ids, *ids.turn_suffix]
            else:
                codes = torch.as_tensor(list(turn.codes), dtype=torch.long)
                speech = torch.cat([torch.full((delay,), ids.speech_bos, dtype=torch.long), codes])
                reply = [*audio_span(len(speech), ids, group_size), *ids.turn_suffix]
                speech_ids.append(speech)
                text_ids.append(torch.as_tensor(list(turn.text_ids), dtype=torch.long))
                features.append(None)  # the official plugin blanks the assistant audio's wav
            stream += reply
            labels += reply
        else:
            raise TypeError(f"build_conversation: a turn is a UserTurn or an AssistantTurn, got {type(turn).__name__}")
    ends_open = stream[-len(ids.assistant_prefix):] == list(ids.assistant_prefix)
    if generation_prompt != ends_open:
        raise ValueError("build_conversation: a generation prompt ends with a user turn, a training conversation "
                         "with an assistant turn")
    return Example(torch.tensor(stream, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                   speech_ids, text_ids, features)


def build_example(
    system_ids,
    user_audio: int | torch.Tensor,
    assistant_text_ids,
    assistant_speech_codes,
    special_ids: SpecialIds,
    group_size: int,
    delay: int = SPEECH_DELAY,
) -> Example:
    """One training conversation: system text, user speech, assistant reply (`build_conversation` of one turn each).

    `user_audio` is the user's log-mel features [M, T] (100 frames/s; its placeholder speech is int(25 * seconds)
    pad tokens) or just a speech length (no features). With `assistant_speech_codes` (25 Hz codes) the reply is an
    audio span whose speech is `delay` x speech-bos then the codes and whose transcript is `assistant_text_ids`
    (the parallel text stream); with None the reply is the plain text `assistant_text_ids` (speech-to-text data).
    """
    if not _is_audio(user_audio) or (isinstance(user_audio, torch.Tensor) and user_audio.ndim != 2):
        raise ValueError(
            f"user_audio must be a speech length (int) or log-mel features [n_mels, frames], got {type(user_audio)}"
        )
    codes = None if assistant_speech_codes is None else list(assistant_speech_codes)
    return build_conversation(system_ids, [UserTurn([user_audio]), AssistantTurn(list(assistant_text_ids), codes)],
                              special_ids, group_size, delay)


def _length_mask(lengths: list[int], width: int) -> torch.Tensor:
    """[N, width] with 1 on the first lengths[n] entries of row n."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def _pad_1d(rows: list[torch.Tensor], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D rows into [N, L_max] and the matching 0/1 mask."""
    padded = pad_sequence(rows, batch_first=True, padding_value=value)
    return padded, _length_mask([len(r) for r in rows], padded.shape[1])


def collate(examples: list[Example], special_ids: SpecialIds, feature_pad_value: float = 0.0) -> dict:
    """Right-pad examples into the model's named inputs (audios flattened in order over the batch).

    input_ids/attention_mask/labels [B, S]; speech_ids/speech_attention_mask [A, L]; text_ids [A, T] with
    text_attention_mask [A] (audio has a transcript); input_features [A_f, M, T_f] with feature_attention_mask
    [A_f, T_f] for the audios marked in feature_exist_mask [A]. Audio keys are None when no example has audio.
    """
    ids = special_ids
    input_ids, attention_mask = _pad_1d([e.input_ids for e in examples], ids.text_pad)
    labels, _ = _pad_1d([e.labels for e in examples], IGNORE_INDEX)
    batch = {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "speech_ids": None, "speech_attention_mask": None, "text_ids": None, "text_attention_mask": None,
        "input_features": None, "feature_attention_mask": None, "feature_exist_mask": None,
    }
    speech = [s for e in examples for s in e.speech_ids]
    if not speech:
        return batch
    texts = [t for e in examples for t in e.text_ids]
    features = [f for e in examples for f in e.input_features]
    batch["speech_ids"], batch["speech_attention_mask"] = _pad_1d(speech, ids.speech_pad)
    batch["text_ids"], _ = _pad_1d(texts, ids.text_pad)
    batch["text_attention_mask"] = torch.tensor([len(t) > 0 for t in texts])
    batch["feature_exist_mask"] = torch.tensor([f is not None for f in features])
    present = [f for f in features if f is not None]
    if present:
        frames = pad_sequence([f.transpose(0, 1) for f in present], batch_first=True, padding_value=feature_pad_value)
        batch["input_features"] = frames.transpose(1, 2).contiguous()  # [A_f, M, T_max]
        batch["feature_attention_mask"] = _length_mask([f.shape[1] for f in present], frames.shape[1])
    return batch


def build_prompt(
    system_ids,
    user_audio: int | torch.Tensor,
    special_ids: SpecialIds,
    group_size: int,
    feature_frames: int | None = None,
    feature_pad_value: float = 0.0,
) -> dict:
    """Inference inputs (batch of 1) up to "<|im_start|>assistant\\n", as the official processor builds them:
    speech ids padded to a multiple of G, features padded to `feature_frames` (3000 = 30 s officially)."""
    ids = special_ids
    user_speech, user_features = _user_audio(user_audio, ids)
    padded_len = -(-len(user_speech) // group_size) * group_size
    speech_ids = torch.full((1, padded_len), ids.speech_pad, dtype=torch.long)
    speech_mask = _length_mask([len(user_speech)], padded_len)
    input_ids = torch.tensor([_prompt(list(system_ids), user_speech, ids, group_size)], dtype=torch.long)
    prompt = {
        "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
        "speech_ids": speech_ids, "speech_attention_mask": speech_mask,
        "input_features": None, "feature_attention_mask": None, "feature_exist_mask": torch.tensor([False]),
    }
    if user_features is not None:
        frames = user_features.shape[1]
        total = max(frames, feature_frames or 0)
        features = torch.full((1, user_features.shape[0], total), feature_pad_value, dtype=user_features.dtype)
        features[0, :, :frames] = user_features
        mask = _length_mask([frames], total)
        prompt.update(input_features=features, feature_attention_mask=mask, feature_exist_mask=torch.tensor([True]))
    return prompt


@lru_cache(maxsize=4)
def _feature_extractor(n_mels: int, sampling_rate: int) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=sampling_rate)


def log_mel(
    samples_16k: np.ndarray | torch.Tensor | list,
    n_mels: int = 128,
    sampling_rate: int = 16000,
    max_seconds: float = 30.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features (transformers' WhisperFeatureExtractor, hop 160: 100 frames/s) of one clip or a
    list of clips, padded to the longest clip only (not to 30 s); clips longer than `max_seconds` are truncated.

    Returns features [N, n_mels, T] float32 and feature_attention_mask [N, T] (1 on each clip's own frames).
    """
    clips = samples_16k if isinstance(samples_16k, (list, tuple)) else [samples_16k]
    clips = [np.asarray(c.numpy() if isinstance(c, torch.Tensor) else c, dtype=np.float32) for c in clips]
    for i, clip in enumerate(clips):
        if clip.ndim != 1 or clip.size == 0:
            raise ValueError(f"log_mel: clip {i} must be a non-empty 1-D mono signal, got shape {clip.shape}")
    extractor = _feature_extractor(n_mels, sampling_rate)
    max_samples = int(max_seconds * sampling_rate)
    clips = [c[:max_samples] for c in clips]
    out = extractor(clips, sampling_rate=sampling_rate, padding="longest", return_tensors="pt")
    features = out["input_features"].float()  # [N, n_mels, T]
    return features, _length_mask([len(c) // extractor.hop_length for c in clips], features.shape[-1])


def collate_prompts(prompts: list[dict], special_ids: SpecialIds) -> dict:
    """Prompts of `build_prompt` or `SpokenData.prompt` (a batch of one each) as one batch for
    `generate_speech_text`: input_ids left-padded with text_pad (attention_mask 0 there), so that every row ends at
    its "<|im_start|>assistant\\n"; the audio rows of every prompt, in order: speech ids right-padded with speech_pad
    under their masks, features right-padded to the longest (feature_exist_mask says which audios have them)."""
    ids = special_ids
    width = max(p["input_ids"].shape[1] for p in prompts)
    input_ids = torch.full((len(prompts), width), ids.text_pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        input_ids[row, width - n:] = p["input_ids"][0]
        attention_mask[row, width - n:] = p["attention_mask"][0]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "speech_ids": None,
             "speech_attention_mask": None, "input_features": None, "feature_attention_mask": None,
             "feature_exist_mask": None}
    with_audio = [p for p in prompts if p.get("speech_ids") is not None]
    if not with_audio:
        return batch
    speech_rows = [row for p in with_audio for row in p["speech_ids"]]
    mask_rows = [row for p in with_audio for row in p["speech_attention_mask"]]
    length = max(len(row) for row in speech_rows)
    speech_ids = torch.full((len(speech_rows), length), ids.speech_pad, dtype=torch.long)
    speech_mask = torch.zeros((len(speech_rows), length), dtype=torch.long)
    for row, (speech, mask) in enumerate(zip(speech_rows, mask_rows)):
        speech_ids[row, : len(speech)] = speech
        speech_mask[row, : len(mask)] = mask
    batch.update(speech_ids=speech_ids, speech_attention_mask=speech_mask,
                 feature_exist_mask=torch.cat([p["feature_exist_mask"] for p in with_audio]))
    features = [(f, m) for p in with_audio if p["input_features"] is not None
                for f, m in zip(p["input_features"], p["feature_attention_mask"])]
    if features:
        frames = max(f.shape[1] for f, _ in features)
        padded = torch.zeros((len(features), features[0][0].shape[0], frames), dtype=features[0][0].dtype)
        lengths = []
        for row, (f, m) in enumerate(features):
            n = int(m.sum())
            padded[row, :, :n] = f[:, :n]
            lengths.append(n)
        batch.update(input_features=padded, feature_attention_mask=_length_mask(lengths, frames))
    return batch
