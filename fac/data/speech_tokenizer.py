"""25 Hz discrete speech units for the tiny world: k-means over stacked log-mel frames.
It stands in for CosyVoice's S3 tokenizer, with one unit per 40 ms as the official placeholders count."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy
import torch
import torchaudio.compliance.kaldi
from sklearn.cluster import MiniBatchKMeans

from fac.data.audio import SAMPLE_RATE

FRAME_RATE = 25  # units per second, as CosyVoice S3 tokens and the official <|audio_pad|> count
HOP_MS, WINDOW_MS = 10, 25
FRAMES_PER_UNIT = 1000 // FRAME_RATE // HOP_MS  # four 10 ms frames make one 40 ms unit
DYNAMIC_RANGE_DB = 80.0  # log-mel power is floored this far below the clip's maximum
# Bump when frame_features changes: codes of an older tokenizer mean nothing for new features.
FEATURE_VERSION = "logmel-kaldi-floor80db-cmvn-stack4-v1"
MODEL_TYPE = "fac_speech_tokenizer"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def unit_count(num_samples: int) -> int:
    """int(25 * seconds) of a 16 kHz clip, in integers so that no rounding of seconds can shift it."""
    return num_samples * FRAME_RATE // SAMPLE_RATE


def frame_features(samples, n_mels: int = 40) -> np.ndarray:
    """[unit_count(len), 4 * n_mels] float32: log-mel frames, normalised per utterance, stacked by four."""
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
    mel = torchaudio.compliance.kaldi.fbank(waveform, num_mel_bins=n_mels, frame_length=WINDOW_MS,
                                            frame_shift=HOP_MS, sample_frequency=SAMPLE_RATE, dither=0.0,
                                            snip_edges=False).numpy()
    # espeak-ng pads clips with digital silence, which sits at kaldi's fixed log floor. A floor relative
    # to the clip's loudest bin instead moves with the gain, so that normalised features of a quieter
    # copy are the same (a fixed floor changed 6% of the codes at -26 dB).
    mel = np.maximum(mel, mel.max() - DYNAMIC_RANGE_DB / 10.0 * math.log(10.0))
    mel = (mel - mel.mean(axis=0)) / (mel.std(axis=0) + 1e-5)
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


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": MODEL_TYPE, "codebook_size": self.codebook_size, "n_mels": self.n_mels,
                  "frame_rate": FRAME_RATE, "sample_rate": SAMPLE_RATE, "feature_version": FEATURE_VERSION}
        _atomic_write(directory / WEIGHTS_NAME,
                      lambda path: safetensors.numpy.save_file({"centroids": self.centroids}, path))
        _atomic_write(directory / CONFIG_NAME,
                      lambda path: Path(path).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))

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
