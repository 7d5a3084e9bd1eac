"""25 Hz discrete speech units, one component with two kinds (`speech_tokenizer.kind`): `kmeans` (the tiny world:
k-means over stacked log-mel frames, learned in the DAG) or `s3` (CosyVoice's supervised semantic tokens through the
`s3tokenizer` package, from a local file). Both give one unit per 40 ms, as the official placeholders count, and
are saved as a folder (config.json + model.safetensors); `load_speech_tokenizer` reads either."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
import torchaudio.compliance.kaldi

from fac import atomic
from fac.data.audio import SAMPLE_RATE, one_thread

FRAME_RATE = 25  # units per second, as CosyVoice S3 tokens and the official <|audio_pad|> count
HOP_MS, WINDOW_MS = 10, 25
FRAMES_PER_UNIT = 1000 // FRAME_RATE // HOP_MS  # four 10 ms frames make one 40 ms unit
DYNAMIC_RANGE_DB = 80.0  # log-mel power is floored this far below the clip's maximum
FEATURE_SCALE = 4.0  # divides the max-relative log-mel (natural log, 0 down to -18.4) to about unit spread
# Bump when frame_features changes: codes of an older tokenizer mean nothing for new features.
FEATURE_VERSION = "logmel-kaldi-maxrel80db-stack4-v2"
MODEL_TYPE = "fac_speech_tokenizer"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def unit_count(num_samples: int) -> int:
    """int(25 * seconds) of a 16 kHz clip, in integers so that no rounding of seconds can shift it."""
    return num_samples * FRAME_RATE // SAMPLE_RATE


def frame_features(samples, n_mels: int = 40) -> np.ndarray:
    """[unit_count(len), 4 * n_mels] float32: log-mel frames relative to the clip's peak, stacked by four."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"samples have shape {samples.shape}; expected a 1-D 16 kHz mono array")
    units = unit_count(len(samples))
    if units == 0:
        return np.zeros((0, FRAMES_PER_UNIT * n_mels), dtype=np.float32)
    # Kaldi's fbank expects 16-bit sample values; its energy floor is tuned for that scale.
    waveform = torch.from_numpy(samples * 32768.0).unsqueeze(0)
    # snip_edges=False centres frames on multiples of the hop: round(len / 160) frames,
    # which makes 4 * unit_count frames or up to one unit more.
    with one_thread():
        mel = torchaudio.compliance.kaldi.fbank(waveform, num_mel_bins=n_mels, frame_length=WINDOW_MS,
                                                frame_shift=HOP_MS, sample_frequency=SAMPLE_RATE, dither=0.0,
                                                snip_edges=False).numpy()
    # Relative to the clip's loudest bin, floored 80 dB below it: the same sound gets the same features at any gain,
    # and in any utterance. (Per-utterance mean and variance normalisation made a word's features depend on what
    # else the clip said and how long it was: a one-word answer and the same word inside a sentence, or the same
    # word at another speaking rate, got different codes: a unit-trigram lookup of mel spoke new renditions of the
    # answers at ASR-WER 0.81 from such codes, 0.29 from these, the recordings 0.17-0.21.)
    # espeak-ng pads clips with digital silence, which sits at kaldi's fixed log floor, far below the relative one.
    peak = mel.max()
    mel = (np.maximum(mel, peak - DYNAMIC_RANGE_DB / 10.0 * math.log(10.0)) - peak) / FEATURE_SCALE
    wanted = units * FRAMES_PER_UNIT
    if len(mel) < wanted:
        mel = np.pad(mel, ((0, wanted - len(mel)), (0, 0)), mode="edge")
    # [frames, n_mels] -> [units, 4, n_mels] -> [units, 4 * n_mels]
    return np.ascontiguousarray(mel[:wanted].reshape(units, FRAMES_PER_UNIT * n_mels), dtype=np.float32)


def usage_stats(token_lists, codebook_size: int | None = None) -> dict:
    """How much of the codebook the tokens use: distinct codes and the perplexity of their distribution."""
    counts = np.bincount(np.concatenate([np.asarray(tokens, dtype=np.int64) for tokens in token_lists]
                                        or [np.zeros(0, dtype=np.int64)]), minlength=codebook_size or 0)
    total = int(counts.sum())
    probabilities = counts[counts > 0] / max(total, 1)
    stats = {
        "tokens": total,
        "codes_used": int(np.count_nonzero(counts)),
        # exp(entropy): the number of equally likely codes that would carry the same information.
        "perplexity": float(math.exp(-np.sum(probabilities * np.log(probabilities)))) if total else 0.0,
    }
    if codebook_size:
        stats["codebook_size"] = codebook_size
        stats["codes_used_fraction"] = stats["codes_used"] / codebook_size
    return stats


def _save_folder(directory, config: dict, write_weights) -> None:
    """A tokenizer folder: the weights (written by `write_weights(path)`), then config.json, each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic.write_file(directory / WEIGHTS_NAME, write_weights)
    atomic.write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


class SpeechTokenizer:
    """Nearest-centroid coder of 25 Hz frame features; centroids learned with k-means."""

    def __init__(self, centroids: np.ndarray, n_mels: int = 40):
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[1] != FRAMES_PER_UNIT * n_mels:
            raise ValueError(f"centroids have shape {centroids.shape}; expected [codebook_size, "
                             f"{FRAMES_PER_UNIT * n_mels}] for n_mels={n_mels}")
        self.centroids = centroids
        self.n_mels = n_mels
        self._squared_norms = np.sum(centroids.astype(np.float64) ** 2, axis=1)

    @property
    def codebook_size(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def train(cls, feature_arrays: list[np.ndarray], codebook_size: int, seed: int, max_frames: int = 200_000,
              n_mels: int = 40) -> "SpeechTokenizer":
        """k-means (MiniBatchKMeans, n_init=3) on at most max_frames frames drawn with `seed`."""
        width = FRAMES_PER_UNIT * n_mels
        for index, features in enumerate(feature_arrays):
            if features.ndim != 2 or features.shape[1] != width:
                raise ValueError(f"feature_arrays[{index}] has shape {features.shape}; expected [frames, {width}] "
                                 f"from frame_features(samples, n_mels={n_mels})")
        frames = np.concatenate(feature_arrays) if feature_arrays else np.zeros((0, width), np.float32)
        if len(frames) < codebook_size:
            raise ValueError(f"{len(frames)} frames cannot train a codebook of {codebook_size}; "
                             f"expected at least as many frames as codes (more clips, or a smaller codebook)")
        rng = np.random.default_rng(seed)
        if len(frames) > max_frames:
            # Sorted indices keep the sample's order stable, so the same seed gives the same fit.
            frames = frames[np.sort(rng.choice(len(frames), size=max_frames, replace=False))]
        from sklearn.cluster import MiniBatchKMeans  # here: 1.7 s to import, and only training needs it

        kmeans = MiniBatchKMeans(n_clusters=codebook_size, n_init=3, random_state=seed)
        kmeans.fit(frames.astype(np.float32))
        return cls(kmeans.cluster_centers_, n_mels=n_mels)

    def encode_features(self, features: np.ndarray) -> list[int]:
        """Nearest centroid of each row of frame_features."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"features have shape {features.shape}; expected [units, {self.centroids.shape[1]}]")
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centroid.
        distances = self._squared_norms[None, :] - 2.0 * features @ self.centroids.T.astype(np.float64)
        return [int(code) for code in np.argmin(distances, axis=1)]

    def encode(self, samples) -> list[int]:
        """One code per 40 ms: unit_count(len(samples)) codes."""
        return self.encode_features(frame_features(samples, self.n_mels))

    def usage_stats(self, token_lists) -> dict:
        return usage_stats(token_lists, self.codebook_size)

    def save(self, directory) -> None:
        config = {"model_type": MODEL_TYPE, "codebook_size": self.codebook_size, "n_mels": self.n_mels,
                  "frame_rate": FRAME_RATE, "sample_rate": SAMPLE_RATE, "feature_version": FEATURE_VERSION}
        _save_folder(directory, config, lambda path: safetensors.numpy.save_file({"centroids": self.centroids}, path))

    @classmethod
    def load(cls, directory) -> "SpeechTokenizer":
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing; expected a speech tokenizer folder written by "
                                        f"SpeechTokenizer.save ({CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path}: not valid JSON ({error}); expected a speech tokenizer config") from error
        if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
            found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"{config_path}: model_type {found!r} is not a speech tokenizer; "
                             f"expected model_type {MODEL_TYPE!r}")
        expected = {"feature_version": FEATURE_VERSION, "frame_rate": FRAME_RATE, "sample_rate": SAMPLE_RATE}
        for key, value in expected.items():
            if config.get(key) != value:
                raise ValueError(f"{config_path}: {key} {config.get(key)!r} differs from this code's {value!r}; "
                                 f"retrain the speech tokenizer with the current features")
        try:
            centroids = safetensors.numpy.load_file(weights_path)["centroids"]
        except Exception as error:  # safetensors raises its own and OS errors for a bad file
            raise ValueError(f"{weights_path}: no readable 'centroids' tensor ({error}); "
                             f"expected weights written by SpeechTokenizer.save") from error
        if centroids.shape[0] != config.get("codebook_size"):
            raise ValueError(f"{weights_path}: {centroids.shape[0]} centroids but {config_path} says codebook_size "
                             f"{config.get('codebook_size')}; expected the pair written by one save")
        return cls(centroids, n_mels=int(config["n_mels"]))


S3_MODEL_TYPE = "fac_s3_speech_tokenizer"
S3_HEAD_DIM = 64  # s3tokenizer's rotary tables are built for 64-wide heads: heads = width / 64


class S3SpeechTokenizer:
    """kind `s3`: CosyVoice's S3 tokens (3^8 = 6,561 codes at 25 Hz) computed by the `s3tokenizer` package's model,
    version `v3` (CosyVoice 3) or `v2` (CosyVoice 2), from the official ONNX export or a PyTorch state dict."""

    def __init__(self, version: str, dims: dict, state: dict[str, torch.Tensor]):
        if version not in ("v2", "v3"):
            raise ValueError(f"S3 tokenizer version {version!r}: expected v2 or v3")
        self.version, self.dims = version, dict(dims)
        self.model = self._build(version, self.dims)
        self.model.load_state_dict(state, strict=True)
        self.model.eval()

    @staticmethod
    def _build(version: str, dims: dict):
        if version == "v3":
            from s3tokenizer.model_v3 import ModelConfigV3 as Config, S3TokenizerV3 as Model
        else:
            from s3tokenizer.model_v2 import ModelConfig as Config, S3TokenizerV2 as Model
        return Model(f"speech_tokenizer_{version}_25hz", Config(**dims))

    @staticmethod
    def dims_of(state: dict[str, torch.Tensor], origin) -> dict:
        """The model's sizes, read off a state dict (the official files carry no config)."""
        try:
            width, n_mels, _ = state["encoder.conv1.weight"].shape
            levels = state["quantizer._codebook.project_down.weight"].shape[0]
        except KeyError as error:
            raise ValueError(f"{origin}: not an S3 tokenizer state dict (no {error}); expected the s3tokenizer "
                             "package's encoder.* and quantizer.* tensors") from error
        layers = len({key.split(".")[2] for key in state if key.startswith("encoder.blocks.")})
        return {"n_mels": int(n_mels), "n_audio_state": int(width), "n_audio_head": int(width) // S3_HEAD_DIM,
                "n_audio_layer": layers, "n_codebook_size": 3 ** int(levels)}

    @classmethod
    def from_file(cls, path) -> "S3SpeechTokenizer":
        """speech_tokenizer.path: `*.onnx` (converted by s3tokenizer) or `*.pt` (a state dict); `v2` in the file name
        picks CosyVoice 2's model, otherwise CosyVoice 3's."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"speech_tokenizer.path {path}: no such file; expected CosyVoice's "
                                    "speech_tokenizer_v3.onnx (or v2), or a .pt state dict of it")
        version = "v2" if "v2" in path.name else "v3"
        if path.suffix == ".onnx":
            from s3tokenizer.utils import onnx2torch, onnx2torch_v3

            state = (onnx2torch_v3 if version == "v3" else onnx2torch)(str(path), None, False)
        elif path.suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"speech_tokenizer.path {path}: expected a .onnx or .pt file")
        state = {key: value for key, value in state.items() if not key.endswith("freqs_cis")}
        return cls(version, cls.dims_of(state, path), state)

    @property
    def codebook_size(self) -> int:
        return int(self.dims["n_codebook_size"])

    def encode(self, samples) -> list[int]:
        """S3 codes of a 16 kHz clip: about 25 per second (the model's own count for the clip's length)."""
        from s3tokenizer.utils import log_mel_spectrogram

        mel = log_mel_spectrogram(torch.as_tensor(np.asarray(samples, dtype=np.float32)), n_mels=self.dims["n_mels"])
        codes, lengths = self.model.quantize(mel[None], torch.tensor([mel.shape[-1]]))
        return [int(code) for code in codes[0, : int(lengths[0])]]

    def usage_stats(self, token_lists) -> dict:
        return usage_stats(token_lists, self.codebook_size)

    def save(self, directory) -> None:
        from safetensors.torch import save_file

        config = {"model_type": S3_MODEL_TYPE, "version": self.version, "dims": self.dims,
                  "codebook_size": self.codebook_size, "frame_rate": FRAME_RATE, "sample_rate": SAMPLE_RATE}
        state = {k: v.contiguous() for k, v in self.model.state_dict().items() if not k.endswith("freqs_cis")}
        _save_folder(directory, config, lambda path: save_file(state, path))

    @classmethod
    def load(cls, directory) -> "S3SpeechTokenizer":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        return cls(config["version"], config["dims"], load_file(str(directory / WEIGHTS_NAME)))


def load_speech_tokenizer(directory):
    """The speech tokenizer saved in `directory`, of whichever kind its config.json names."""
    config_path = Path(directory) / CONFIG_NAME
    if config_path.is_file():
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            model_type = None
        if model_type == S3_MODEL_TYPE:
            return S3SpeechTokenizer.load(directory)
    return SpeechTokenizer.load(directory)  # names what is wrong with the folder
