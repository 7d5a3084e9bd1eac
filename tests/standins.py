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


def released_checkpoint(folder: str | Path, seed: int = 0, max_shard_size: str = "4MB") -> Path:
    """A random Fun-Audio-Chat checkpoint in the released layout: config.json and safetensors shards with an index,
    Qwen3's vocabulary rows and the released special ids, 6,561 S3 codes + 4 speech specials, 128 mel bins."""
    import torch

    from fac.model import FunAudioChatForConditionalGeneration, build_config
    from fac.model.builders import PAPER_SPECIAL_IDS

    config = build_config({
        "llm": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 16, "intermediate_size": 64, "vocab_size": QWEN3_EMBEDDING_ROWS, "rope_theta": 1e6},
        "encoder": {"num_mel_bins": 128, "d_model": 16, "encoder_layers": 1, "encoder_attention_heads": 2,
                    "encoder_ffn_dim": 32, "n_window": 50, "max_source_positions": 50},
        "speech": {"codebook_size": 6565, "group_size": 5},
        "srh": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 8, "intermediate_size": 32},
        "special_ids": dict(PAPER_SPECIAL_IDS)})
    torch.manual_seed(seed)
    FunAudioChatForConditionalGeneration(config).save_pretrained(folder, max_shard_size=max_shard_size)
    return Path(folder)


def whisper_asr(folder: str | Path, seed: int = 0) -> Path:
    """A random Whisper speech-recognition folder as `save_pretrained` writes whisper-large-v3's: model (128 mel
    bins) with its generation config, a byte-level tokenizer with Whisper's task tokens, the feature extractor."""
    import torch
    from transformers import (GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperTokenizerFast)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["the red cat sat on the mat", "hello world"], trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = WhisperTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                     unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                            "<|translate|>", "<|notimestamps|>"]})
    ids = tokenizer.convert_tokens_to_ids
    end, start = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    config = WhisperConfig(vocab_size=len(tokenizer), num_mel_bins=128, d_model=32, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                           max_source_positions=1500, max_target_positions=64, pad_token_id=end, bos_token_id=end,
                           eos_token_id=end, decoder_start_token_id=start)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start, eos_token_id=end, pad_token_id=end, no_timestamps_token_id=ids("<|notimestamps|>"),
        lang_to_id={"<|en|>": ids("<|en|>")}, is_multilingual=True, max_length=16,
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")})
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)
    return Path(folder)


def s3_tokenizer_file(path: str | Path, width: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A random CosyVoice 3 S3 tokenizer as a PyTorch state dict (`*.pt`), the s3tokenizer package's own layout:
    128 mel bins, 64-wide heads, the FSQ quantizer of 3^8 = 6,561 codes; only width and depth are small."""
    import torch
    from s3tokenizer.model_v3 import ModelConfigV3, S3TokenizerV3

    torch.manual_seed(seed)
    model = S3TokenizerV3("speech_tokenizer_v3_25hz",
                          ModelConfigV3(n_audio_state=width, n_audio_head=width // 64, n_audio_layer=layers))
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("freqs_cis")}, path)
    return Path(path)


def official_dataset(folder: str | Path, codebook: int = 6561, seed: int = 0) -> dict:
    """A small data set in the official SFT format (fac.data.imported): `manifests/` with prealign.jsonl,
    sft.jsonl, eval.jsonl and preferences.jsonl, `media/` with their 16 kHz wavs (tones in noise: a rehearsal
    checks formats and plumbing, not what is said). Some assistant clips carry their speech tokens, others only a
    wav (the tokenizer computes them); sft holds a two-turn conversation and three records the model cannot take
    (bad JSON, a missing clip, turns out of order), which must be refused with file, line and reason.
    Returns {"folder", "refused": [(file name, line)], "kept": {name: count}}."""
    import numpy as np

    from fac.data.audio import write_wav
    from fac.data.manifests import AUDIO_PLACEHOLDER, SPEECH_DELAY, speech_token_string

    folder = Path(folder)
    media, manifests = folder / "media", folder / "manifests"
    rng = np.random.default_rng(seed)

    def clip(name: str) -> str:
        seconds = float(rng.uniform(0.6, 1.2))
        t = np.arange(int(16000 * seconds)) / 16000
        samples = 0.3 * np.sin(2 * np.pi * rng.uniform(120, 400) * t) + 0.02 * rng.standard_normal(t.size)
        write_wav(media / f"{name}.wav", samples)
        return f"{name}.wav"

    def user(path: str, transcript: str = "") -> str:
        return json.dumps({"path": path, "text": transcript, "token": "", "ref_path": "", "ref_text": ""})

    def spoken(text: str, with_tokens: bool, name: str) -> str:
        if with_tokens:
            codes = rng.integers(0, codebook, size=int(rng.integers(8, 20))).tolist()
            return json.dumps({"path": "", "text": text, "token": "<|audio_bos|>" * SPEECH_DELAY
                               + speech_token_string(codes), "ref_path": "", "ref_text": ""})
        return json.dumps({"path": "", "text": text, "token": "", "ref_path": clip(name), "ref_text": text})

    s2t, s2m = "You are asked to generate text tokens.", "You are asked to generate both text and speech tokens at the same time."
    words = ["paris", "blue", "seven", "river", "north", "green", "tiger", "piano"]
    files: dict[str, list[str]] = {"prealign": [], "sft": [], "eval": [], "preferences": []}
    for i, word in enumerate(words):
        files["prealign"].append(json.dumps({
            "system": s2m, "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                                        {"role": "assistant", "content": AUDIO_PLACEHOLDER}],
            "audio": [user(clip(f"pre_user_{i}")), spoken(f"the word is {word}", i % 2 == 0, f"pre_asst_{i}")]}))
        if i % 2:
            record = {"system": s2t, "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                                                  {"role": "assistant", "content": f"it is {word}"}],
                      "audio": [user(clip(f"sft_user_{i}"))]}
        else:
            record = {"system": s2m, "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                                                  {"role": "assistant", "content": AUDIO_PLACEHOLDER}],
                      "audio": [user(clip(f"sft_user_{i}")), spoken(f"it is {word}", i % 4 == 0, f"sft_asst_{i}")]}
        files["sft"].append(json.dumps(record))
    files["sft"].append(json.dumps({  # two turns: every turn and every audio is kept
        "system": s2m, "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                                    {"role": "assistant", "content": "it is paris"},
                                    {"role": "user", "content": "and again? " + AUDIO_PLACEHOLDER},
                                    {"role": "assistant", "content": AUDIO_PLACEHOLDER}],
        "audio": [user(clip("multi_user_0")), user(clip("multi_user_1")), spoken("still paris", False, "multi_asst")],
        "meta": {"id": "two-turns"}}))
    refused_at = len(files["sft"]) + 1
    files["sft"].append('{"system": "broken", "messages": [')
    files["sft"].append(json.dumps({"system": s2t, "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                                                                {"role": "assistant", "content": "lost"}],
                                    "audio": [user("no_such_clip.wav")]}))
    files["sft"].append(json.dumps({"system": s2t, "messages": [{"role": "assistant", "content": "first"},
                                                                {"role": "user", "content": "then"}], "audio": []}))
    for i, word in enumerate(words[:4]):
        files["eval"].append(json.dumps({
            "system": s2t if i % 2 else s2m,
            "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER},
                         {"role": "assistant", "content": word if i % 2 else AUDIO_PLACEHOLDER}],
            "audio": [user(clip(f"eval_user_{i}"), f"say {word}")] + ([] if i % 2 else [spoken(word, True, "")])}))
        other = words[(i + 1) % len(words)]
        files["preferences"].append(json.dumps({
            "system": s2m, "messages": [{"role": "user", "content": AUDIO_PLACEHOLDER}],
            "chosen": {"role": "assistant", "content": AUDIO_PLACEHOLDER},
            "rejected": {"role": "assistant", "content": AUDIO_PLACEHOLDER},
            "audio": [user(clip(f"pref_user_{i}")), spoken(word, True, ""), spoken(other, i % 2 == 0, f"pref_rej_{i}")],
            "meta": {"dimension": "robustness"} if i % 2 else {}}))
    manifests.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (manifests / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {"folder": folder, "refused": [("sft.jsonl", refused_at + k) for k in range(3)],
            "kept": {"prealign": 8, "sft": 9, "eval": 4, "preferences": 4}}


def s3_tokenizer_onnx(path: str | Path, state_dict_file: str | Path) -> Path:
    """The S3 tokenizer of `state_dict_file` (see `s3_tokenizer_file`) as an ONNX file laid out as the official
    `speech_tokenizer_v3.onnx` export, as far as the `s3tokenizer` package's converter (`onnx2torch_v3`) reads it:
    its weights as initializers, consumed by nodes named as the export names them (`/conv1/Conv`,
    `/blocks.N/attn/query/MatMul` with the transposed weight, `/blocks.N/attn_ln/Add`, ...), the FSMN kernels and the
    quantizer's bias as named initializers. Only the weights matter to the converter: the graph is not runnable."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    state = torch.load(state_dict_file, map_location="cpu", weights_only=True)
    initializers, nodes = [], []

    def tensor(name: str, value) -> str:
        initializers.append(numpy_helper.from_array(value.detach().numpy().copy(), name))
        return name

    def node(op: str, name: str, *weights: str) -> None:
        nodes.append(helper.make_node(op, ["x", *weights], [f"{name}_out"], name=name))

    for conv in ("conv1", "conv2"):
        node("Conv", f"/{conv}/Conv", tensor(f"{conv}.w", state[f"encoder.{conv}.weight"]),
             tensor(f"{conv}.b", state[f"encoder.{conv}.bias"]))
    blocks = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.blocks.")})
    for i in blocks:
        p = f"encoder.blocks.{i}"
        for ln in ("attn_ln", "mlp_ln"):
            node("Mul", f"/blocks.{i}/{ln}/Mul", tensor(f"b{i}.{ln}.w", state[f"{p}.{ln}.weight"]))
            node("Add", f"/blocks.{i}/{ln}/Add", tensor(f"b{i}.{ln}.b", state[f"{p}.{ln}.bias"]))
        for layer in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/mlp.0", "mlp/mlp.2"):
            key = f"{p}.{layer.replace('/', '.').replace('mlp.mlp.', 'mlp.')}"
            node("MatMul", f"/blocks.{i}/{layer}/MatMul", tensor(f"b{i}.{layer}.w", state[f"{key}.weight"].t()))
            if f"{key}.bias" in state:
                node("Add", f"/blocks.{i}/{layer}/Add", tensor(f"b{i}.{layer}.b", state[f"{key}.bias"]))
        tensor(f"blocks.{i}.attn.fsmn_block.weight", state[f"{p}.attn.fsmn_block.weight"])
    tensor("quantizer.project_in.bias", state["quantizer._codebook.project_down.bias"])
    node("MatMul", "/quantizer/project_in/MatMul", tensor("quantizer.w", state["quantizer._codebook.project_down.weight"].t()))
    graph = helper.make_graph(nodes, "speech_tokenizer_v3", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                           None)], [], initializers)
    onnx.save(helper.make_model(graph), str(path))
    return Path(path)


TOKEN2WAV_RATE = 24000
TOKEN2WAV_SAMPLES_PER_UNIT = 960  # 40 ms at 24 kHz, as CosyVoice 3's token2wav speaks a 25 Hz S3 code

TOKEN2WAV_SCRIPT = '''"""Stand-in for a CosyVoice 3 token2wav script (fac.data.detokenizer.CommandDetokenizer's contract): reads the
units JSON Lines and the speaker embedding, writes <id>.wav per line into the out folder: 960 samples per unit at
24 kHz, a tone per unit whose pitch follows the unit (and the speaker), so the clip is not silent."""
import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf

parser = argparse.ArgumentParser()
for name in ("--units", "--speaker", "--out"):
    parser.add_argument(name, required=True)
parser.add_argument("--sample-rate", type=int, default=24000)
parser.add_argument("--calls", help="append one line per run to this file (tests count the runs)")
parser.add_argument("--skip", help="write no wav for this id")
parser.add_argument("--fail", action="store_true", help="exit 3 after a message on stderr")
args = parser.parse_args()
if args.calls:
    with open(args.calls, "a") as calls:
        calls.write(args.units + "\\n")
if args.fail:
    raise SystemExit("token2wav stand-in: CUDA out of memory (asked to fail)")
if args.speaker.endswith(".npy"):
    speaker = np.load(args.speaker)
else:
    import torch

    speaker = torch.load(args.speaker).numpy()
shift = 20.0 * float(np.tanh(np.asarray(speaker, dtype=np.float64).mean()))
t = np.arange(960) / 24000
for line in Path(args.units).read_text().splitlines():
    record = json.loads(line)
    if record["id"] == args.skip:
        continue
    wave = np.concatenate([0.4 * np.sin(2 * np.pi * (150 + 10 * (u % 64) + shift) * t) for u in record["units"]])
    sf.write(Path(args.out) / f"{record['id']}.wav", wave.astype(np.float32), args.sample_rate, subtype="PCM_16")
'''


def token2wav_command(folder: str | Path, extra: str = "") -> str:
    """A stand-in token2wav (TOKEN2WAV_SCRIPT, written into `folder`) and the command template that runs it with
    this interpreter: {units}, {speaker}, {out} and {sample_rate}, then `extra` flags (e.g. --calls FILE)."""
    import shlex
    import sys

    script = Path(folder) / "token2wav_standin.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(TOKEN2WAV_SCRIPT)
    return (f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} --units {{units}} --speaker {{speaker}} "
            f"--out {{out}} --sample-rate {{sample_rate}} {extra}").strip()


def speaker_embedding(path: str | Path, seed: int = 0) -> Path:
    """A random 192-dim speaker embedding as CosyVoice's campplus gives one: a torch.save'd [1, 192] tensor (`.pt`)
    or a numpy array (`.npy`)."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vector = np.random.default_rng(seed).standard_normal((1, 192)).astype(np.float32)
    if path.suffix == ".npy":
        np.save(path, vector)
    else:
        import torch

        torch.save(torch.from_numpy(vector), path)
    return path


COSYVOICE3_MODULE = '''"""Stand-in for CosyVoice's cosyvoice.cli.cosyvoice (repository commit ace7c47): CosyVoice3(model_dir) and the
one method of its model that token2wav uses, CosyVoice3Model.token2wav, with its signature; a random tone instead
of the flow and HiFT, 960 samples (40 ms at 24 kHz) per code. Each argument is checked as the real one needs it."""
import os

import torch


class CosyVoice3Model:
    def __init__(self):
        self.hift_cache_dict = {}

    def token2wav(self, token, prompt_token, prompt_feat, embedding, token_offset, uuid, stream=False, finalize=False,
                  speed=1.0):
        assert uuid in self.hift_cache_dict, "token2wav needs hift_cache_dict[uuid] set first (as tts does)"
        assert token.dtype == torch.int32 and token.dim() == 2 and token.shape[0] == 1, token
        assert int(token.min()) >= 0 and int(token.max()) < 6561, "S3 codes are 0..6560"
        assert prompt_token.shape == (1, 0) and prompt_token.dtype == torch.int32, prompt_token.shape
        assert prompt_feat.shape == (1, 0, 80), prompt_feat.shape
        assert embedding.shape == (1, 192) and embedding.dtype == torch.float32, embedding.shape
        assert token_offset == 0 and finalize and not stream
        t = torch.arange(960) / 24000
        shift = 20.0 * float(torch.tanh(embedding.mean()))
        waves = [0.4 * torch.sin(2 * torch.pi * (150 + 10 * (int(u) % 64) + shift) * t) for u in token[0]]
        return torch.cat(waves)[None]


class CosyVoice3:
    def __init__(self, model_dir, load_trt=False, load_vllm=False, fp16=False, trt_concurrent=1):
        if not os.path.exists(f"{model_dir}/cosyvoice3.yaml"):
            raise ValueError(f"{model_dir}/cosyvoice3.yaml not found!")
        self.sample_rate = 24000
        self.model = CosyVoice3Model()
'''


def cosyvoice3_command(folder: str | Path) -> str:
    """paper.yaml's detokenizer command (workflow/scripts/cosyvoice3_token2wav.py) over a stand-in CosyVoice install
    in `folder` (the `cosyvoice` package with COSYVOICE3_MODULE, a model folder with its cosyvoice3.yaml), run by
    this interpreter: the shipped script is what runs, only the install is a stand-in."""
    import shlex
    import sys

    folder = Path(folder)
    package = folder / "site" / "cosyvoice"
    (package / "cli").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("")
    (package / "cli" / "cosyvoice.py").write_text(COSYVOICE3_MODULE)
    model_dir = folder / "Fun-CosyVoice3-0.5B"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "cosyvoice3.yaml").write_text("# stand-in\n")
    script = Path(__file__).resolve().parent.parent / "workflow" / "scripts" / "cosyvoice3_token2wav.py"
    return (f"PYTHONPATH={shlex.quote(str(folder / 'site'))} {shlex.quote(sys.executable)} {shlex.quote(str(script))} "
            f"--model-dir {shlex.quote(str(model_dir))} --units {{units}} --speaker {{speaker}} --out {{out}} "
            f"--sample-rate {{sample_rate}}")
