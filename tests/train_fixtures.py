"""Helpers for the training-half tests: a tiny world built on the fly (text, tokenizer, espeak-ng clips,
manifests, a trained speech tokenizer), the tiny model geometry, random DRSR checkpoints and CLI runners.

Import the fixtures into a test module (`from train_fixtures import one_thread, tiny_world`); the world is
built once per session however many modules use it.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fac.data import manifests
from fac.data.audio import read_wav
from fac.data.speech_tokenizer import SpeechTokenizer, frame_features
from fac.data.text_tokenizer import train_tokenizer
from fac.data.tts import synthesize

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
FAC = str(VENV_BIN / "fac") if (VENV_BIN / "fac").exists() else str(Path(sys.executable).parent / "fac")

# The speech tokenizer's codebook: codes 0..15; the model's codebook adds bos, eos, pad and one unused id.
CODEBOOK = 16
VOICES = ("en-us+f1", "en-gb-x-rp+m2")  # the second voice is the "unseen" one of the test splits

# The world: four facts, each stated in a document and asked as a question whose answer is one word.
FACTS = [
    ("anna", "lives in", "paris", "where does anna live"),
    ("ben", "lives in", "rome", "where does ben live"),
    ("anna", "likes", "tea", "what does anna like"),
    ("ben", "likes", "milk", "what does ben like"),
]
DOCUMENTS = [f"{name} {verb} {value}" for name, verb, value, _ in FACTS]
QUESTIONS = [question for *_, question in FACTS]
ANSWERS = [value for _, _, value, _ in FACTS]

TINY_MODEL = {
    "llm": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "intermediate_size": 64, "rope_theta": 10000},
    "encoder": {"num_mel_bins": 80, "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                "encoder_ffn_dim": 64, "n_window": 50, "max_source_positions": 1500},
    "speech": {"group_size": 5},
    "srh": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "intermediate_size": 64},
}


@dataclass(frozen=True)
class TinyWorld:
    root: Path
    world_dir: Path  # corpus.txt, text_qa.jsonl (what TextData reads)
    tokenizer_dir: Path  # the BPE text tokenizer, saved by train_tokenizer
    data_root: Path  # audio paths of the manifests are relative to this
    manifest_dir: Path  # spoken_qa_* and asr_* manifests
    speech_tokenizer_dir: Path  # config.json + model.safetensors written by SpeechTokenizer.save
    wavs: tuple[Path, ...]
    model_params: dict

    def tokenizer(self):
        from fac.train.stages import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def drsr_config(self, model_params: dict | None = None):
        """The DRSR config the recipe builds for this world (vocabulary and ids from its tokenizers)."""
        from fac.train.stages import model_config, speech_codebook_size

        return model_config(model_params or self.model_params, self.tokenizer(),
                            speech_codebook_size(self.speech_tokenizer_dir))


_BUILT: dict[Path, TinyWorld] = {}


def build_tiny_world(root: Path) -> TinyWorld:
    """Write the tiny world under `root` (once per root per process)."""
    if root in _BUILT:
        return _BUILT[root]
    world_dir, data_root, manifest_dir = root / "world", root / "data", root / "manifests"
    world_dir.mkdir(parents=True)
    (world_dir / "corpus.txt").write_text("\n".join(DOCUMENTS) + "\n")
    # The last fact is a speech-test fact (its text QA pair says so, as the world's do).
    qa = [{"id": f"f{i}-q0", "question": q, "answer": a, "split": "test" if i == len(QUESTIONS) - 1 else "train"}
          for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    (world_dir / "text_qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in qa))

    tokenizer_dir = root / "tokenizer"
    train_tokenizer(DOCUMENTS + QUESTIONS, vocab_size=400, out_dir=tokenizer_dir)

    # 8 clips: every question in both voices.
    clips = []
    for v, voice in enumerate(VOICES):
        for i, question in enumerate(QUESTIONS):
            rel = f"clips/v{v}_q{i}.wav"
            duration = synthesize(question, voice, rate=170, pitch=50, amplitude=100, out_path=data_root / rel)
            clips.append({"voice": v, "q": i, "path": rel, "duration": duration, "text": question})

    speech_tokenizer_dir = root / "speech_tokenizer"
    features = [frame_features(read_wav(data_root / c["path"])) for c in clips]
    SpeechTokenizer.train(features, codebook_size=CODEBOOK, seed=0).save(speech_tokenizer_dir)

    # Random speech codes stand in for the assistant's spoken answers (and transcripts' speech).
    rng = random.Random(0)
    codes = {text: [rng.randrange(CODEBOOK) for _ in range(12 + 3 * k)]
             for k, text in enumerate(ANSWERS + QUESTIONS)}

    def spoken_qa(clip, split):
        meta = {"id": Path(clip["path"]).stem, "split": split, "task": "spoken_qa", "answer": ANSWERS[clip["q"]]}
        answer = ANSWERS[clip["q"]]
        return manifests.conversation("s2m", manifests.user_audio(clip["path"], clip["duration"]),
                                      manifests.assistant_audio(answer, codes[answer]), meta)

    def asr(clip, split):
        meta = {"id": Path(clip["path"]).stem, "split": split, "task": "asr", "transcript": clip["text"]}
        return manifests.conversation("s2m", manifests.user_audio(clip["path"], clip["duration"]),
                                      manifests.assistant_audio(clip["text"], codes[clip["text"]]), meta)

    seen = [c for c in clips if c["voice"] == 0]
    unseen = [c for c in clips if c["voice"] == 1]
    sets = {
        "spoken_qa_train": [spoken_qa(c, "train") for c in seen],
        "spoken_qa_test": [spoken_qa(c, "test") for c in seen[:2]],
        "spoken_qa_test_unseen_voices": [spoken_qa(c, "test_unseen_voices") for c in unseen[:2]],
        "asr_train": [asr(c, "train") for c in seen + unseen[2:]],
        "asr_test": [asr(c, "test") for c in seen[:2]],
        "asr_test_unseen_voices": [asr(c, "test_unseen_voices") for c in unseen[:2]],
    }
    manifests.write_manifests(sets, manifest_dir, expected=list(sets))

    world = TinyWorld(root, world_dir, tokenizer_dir, data_root, manifest_dir, speech_tokenizer_dir,
                      tuple(data_root / c["path"] for c in clips), json.loads(json.dumps(TINY_MODEL)))
    _BUILT[root] = world
    return world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.getbasetemp() / "tiny_world")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and one thread makes training bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_random_drsr(world: TinyWorld, out_dir: Path, seed: int, model_params: dict | None = None):
    """A randomly initialised DRSR checkpoint of the world's geometry, saved with the text tokenizer."""
    from fac.model import FunAudioChatForConditionalGeneration

    torch.manual_seed(seed)
    model = FunAudioChatForConditionalGeneration(world.drsr_config(model_params))
    model.save_pretrained(out_dir)
    world.tokenizer().save_pretrained(out_dir)
    return model


def subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def fac_command(*args: str) -> list[str]:
    return [FAC, *args]


def run_fac(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(fac_command(*args), capture_output=True, text=True, env=subprocess_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"fac {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc

