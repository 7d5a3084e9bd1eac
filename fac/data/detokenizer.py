"""Speech out: 25 Hz speech units -> a waveform in the assistant's voice. One component, two kinds (params
`detokenizer.kind`), one interface: `.sample_rate`, `.config`, `.synthesize(units)` and `.synthesize_batch(list of
units)` -> float32 arrays at `sample_rate`; a detokenizer is a folder with its config, like every checkpoint
(`load_detokenizer` dispatches on its `model_type`).

`flow` (`FlowDetokenizer`, the tiny world's): the paper's detokenizer is CosyVoice 3's token2wav, flow matching from
S3 codes to mel, then a vocoder; this is the same in small: a conditional flow-matching network (`FlowNet`) turns the
units, encoded with their neighbours and repeated to the mel frame rate (four 10 ms frames per 40 ms unit), into
80-bin log-mel frames in a few Euler steps from noise, and Griffin-Lim inverts the mel to 16 kHz audio (a learned
vocoder has nothing to win: the clips' own mel through Griffin-Lim is heard by the ASR scorer as well as the clips
themselves). Like CosyVoice's flow it is conditioned on the speaker; rule `detokenizer` (fac.data.steps.
train_detokenizer) trains it on the assistant's voice alone, on its answer clips and on the training sentences
spoken again in that voice, so that the units the model generates can be spoken.

`command` (`CommandDetokenizer`, paper scale): CosyVoice 3's token2wav itself (S3 codes 0..6560 and a speaker
embedding -> 24 kHz), or any other, run from a bash template once per batch of answers (loading it per answer
would be slow); its folder (`write_command_detokenizer`, rule `detokenizer` of rules/imported.smk) holds the template,
the rate, the codebook and a copy of the speaker file.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fac import atomic
from fac.data import templates
from fac.data.audio import SAMPLE_RATE, one_thread

MODEL_TYPE = "fac_flow_detokenizer"
COMMAND_MODEL_TYPE = "fac_command_detokenizer"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
UNIT_RATE = 25  # units per second (the speech tokenizer's)
N_MELS, N_FFT, WIN_LENGTH, HOP_LENGTH = 80, 1024, 640, 160  # 100 Hz frames of 40 ms windows
FRAMES_PER_UNIT = SAMPLE_RATE // UNIT_RATE // HOP_LENGTH  # 4
LOG_FLOOR = 1e-5


@functools.lru_cache(maxsize=1)
def _mel_transform() -> torch.nn.Module:
    """One filterbank for every clip (log_mel runs once per training clip)."""
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH,
                                                hop_length=HOP_LENGTH, n_mels=N_MELS, power=1.0)


def log_mel(samples, units: int) -> torch.Tensor:
    """[4 * units, 80] log-mel magnitude frames of a 16 kHz clip, one row per 10 ms, aligned with its units."""
    wave = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    with one_thread():
        mel = torch.log(_mel_transform()(wave).clamp_min(LOG_FLOOR)).T  # [frames, 80], frames = len // 160 + 1
    wanted = units * FRAMES_PER_UNIT
    if len(mel) < wanted:
        mel = torch.cat([mel, mel[-1:].expand(wanted - len(mel), -1)])
    return mel[:wanted].contiguous()


class _Block(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.conv = nn.Conv1d(channels, channels, kernel, dilation=dilation, padding=dilation * (kernel // 2))
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """h [B, C, T] (zero past each row's end), keep [B, 1, T] (1 on a row's frames): each row's output on its
        frames is what the row alone, unpadded, would give (the norm's statistics and the convolution see only its
        frames), so that a batch of answers of different lengths gives each its batch-of-one mel."""
        count = keep.sum((1, 2), keepdim=True) * h.shape[1]
        mean = (h * keep).sum((1, 2), keepdim=True) / count
        var = (((h - mean) * keep) ** 2).sum((1, 2), keepdim=True) / count
        normed = (h - mean) * torch.rsqrt(var + self.norm.eps) * self.norm.weight[None, :, None] \
            + self.norm.bias[None, :, None]  # GroupNorm(1, C) over the kept frames
        return self.proj(F.gelu(self.conv(normed * keep)))


class FlowNet(nn.Module):
    """The velocity field v(x_t, t | units, speaker) of conditional flow matching over normalised log-mel frames: the
    units' embeddings pass `unit_layers` residual convolutions at the unit rate (each unit sees its neighbours, as a
    word's sound depends on its context), are repeated to the frame rate and joined by the speaker's embedding; a
    stack of dilated residual convolutions runs over [x_t ; that condition], with t added."""

    def __init__(self, codebook_size: int, speakers: int = 1, channels: int = 192, layers: int = 6,
                 unit_dim: int = 128, kernel: int = 5, dilations: int = 3, unit_layers: int = 0):
        super().__init__()
        self.units = nn.Embedding(codebook_size, unit_dim)
        self.unit_encoder = nn.ModuleList(_Block(unit_dim, 3, 1) for _ in range(unit_layers))
        self.speakers = nn.Embedding(speakers, unit_dim)
        self.time = nn.Sequential(nn.Linear(64, channels), nn.GELU(), nn.Linear(channels, channels))
        self.inp = nn.Conv1d(N_MELS + unit_dim, channels, 1)
        self.blocks = nn.ModuleList(_Block(channels, kernel, 2 ** (i % dilations)) for i in range(layers))
        self.out = nn.Conv1d(channels, N_MELS, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Per-bin mean and std of the training frames: the flow runs in normalised units.
        self.register_buffer("mel_mean", torch.zeros(N_MELS))
        self.register_buffer("mel_std", torch.ones(N_MELS))

    def forward(self, x_t: torch.Tensor, units: torch.Tensor, speaker: torch.Tensor, t: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x_t [B, T, 80], units [B, T // 4] (long), speaker [B] (long), t [B], mask [B, T] -> velocity [B, T, 80]."""
        unit_keep = mask[:, None, ::FRAMES_PER_UNIT].to(x_t.dtype)  # [B, 1, T // 4]
        e = self.units(units).transpose(1, 2) * unit_keep
        for block in self.unit_encoder:
            e = (e + block(e, unit_keep)) * unit_keep
        cond = (e.transpose(1, 2) + self.speakers(speaker)[:, None]).repeat_interleave(FRAMES_PER_UNIT, dim=1)
        half = torch.exp(-math.log(1000.0) * torch.arange(32, device=t.device) / 32)
        angles = 1000.0 * t[:, None] * half[None]
        h = self.inp(torch.cat([x_t, cond], dim=-1).transpose(1, 2))
        keep = mask[:, None, :].to(h.dtype)
        h = (h + self.time(torch.cat([angles.sin(), angles.cos()], dim=-1))[:, :, None]) * keep
        for block in self.blocks:
            h = (h + block(h, keep)) * keep
        return self.out(h).transpose(1, 2)


def flow_matching_loss(net: FlowNet, mels: torch.Tensor, units: torch.Tensor, speaker: torch.Tensor,
                       mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mean squared error of the predicted velocity against x1 - x0 on the straight path x_t = (1 - t) x0 + t x1
    from noise x0 to the normalised mel x1, over the frames the mask keeps."""
    x1 = (mels - net.mel_mean) / net.mel_std
    x0 = torch.randn(x1.shape, generator=generator)
    t = torch.rand(x1.shape[0], generator=generator)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
    error = (net(x_t, units, speaker, t, mask) - (x1 - x0)) ** 2
    return (error.mean(-1) * mask).sum() / mask.sum()


@torch.no_grad()
def sample_mel(net: FlowNet, units: list[int], speaker: int, steps: int, seed: int = 0,
               temperature: float = 1.0) -> torch.Tensor:
    """[4 * len(units), 80] log-mel frames for `units` in the voice of `speaker` (its index): `steps` Euler steps of
    the flow from seeded noise scaled by `temperature` (below 1: nearer the likeliest mel, as Matcha-TTS samples)."""
    return sample_mels(net, [units], speaker, steps, seed, temperature)[0]


@torch.no_grad()
def sample_mels(net: FlowNet, units_per_answer: list[list[int]], speaker: int, steps: int, seed: int = 0,
                temperature: float = 1.0) -> list[torch.Tensor]:
    """`sample_mel` of each answer (at least one unit each), the answers padded into one batch: each row starts from
    its own batch-of-one noise and FlowNet keeps rows apart, so each mel is its batch-of-one mel (to float rounding)."""
    net.eval()
    lengths = [len(units) * FRAMES_PER_UNIT for units in units_per_answer]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"sample_mels: every answer needs at least one unit; got lengths {lengths}")
    rows, frames = len(lengths), max(lengths)
    unit_ids = torch.zeros((rows, frames // FRAMES_PER_UNIT), dtype=torch.long)
    x = torch.zeros((rows, frames, N_MELS))
    mask = torch.zeros((rows, frames))
    for row, (units, n) in enumerate(zip(units_per_answer, lengths)):
        unit_ids[row, :len(units)] = torch.tensor(units, dtype=torch.long)
        x[row, :n] = temperature * torch.randn((n, N_MELS), generator=torch.Generator().manual_seed(seed))
        mask[row, :n] = 1.0
    speaker_ids = torch.full((rows,), speaker, dtype=torch.long)
    for i in range(steps):
        x = x + net(x, unit_ids, speaker_ids, torch.full((rows,), i / steps), mask) / steps
    mels = x * net.mel_std + net.mel_mean
    return [mels[row, :n].contiguous() for row, n in enumerate(lengths)]


def length_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices of `lengths` sorted by length, in runs of `size`: batches of similar lengths (little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


class GriffinLim:
    """Log-mel -> 16 kHz waveform without learning: the mel filterbank inverted by least squares, then Griffin-Lim's
    phase estimate (from a fixed start, so that the same mel always gives the same audio)."""

    def __init__(self, iterations: int = 32):
        import torchaudio

        self.inverse = torchaudio.transforms.InverseMelScale(n_stft=N_FFT // 2 + 1, n_mels=N_MELS,
                                                             sample_rate=SAMPLE_RATE)
        self.griffin_lim = torchaudio.transforms.GriffinLim(n_fft=N_FFT, n_iter=iterations, win_length=WIN_LENGTH,
                                                            hop_length=HOP_LENGTH, power=1.0, rand_init=False)

    # Griffin-Lim's STFT pads n_fft // 2 samples on each side by reflection, which needs a signal longer than that:
    # a shorter mel (one or two units) is extended with silent frames, then cut back.
    MIN_FRAMES = N_FFT // HOP_LENGTH + 1

    @torch.no_grad()
    def __call__(self, mel: torch.Tensor) -> np.ndarray:
        frames = len(mel)
        if frames < self.MIN_FRAMES:
            mel = torch.cat([mel, torch.full((self.MIN_FRAMES - frames, mel.shape[1]), math.log(LOG_FLOOR))])
        with one_thread():
            magnitude = self.inverse(torch.exp(mel).T).clamp_min(0.0)
            wave = self.griffin_lim(magnitude).numpy()[: frames * HOP_LENGTH]
        wave = np.pad(wave, (0, frames * HOP_LENGTH - len(wave)))  # 160 samples per frame: 640 per unit
        return np.clip(wave / max(float(np.abs(wave).max()), 1e-6) * 0.9, -1.0, 1.0).astype(np.float32)


class FlowDetokenizer:
    """The tiny world's detokenizer: FlowNet (units -> mel, in `config['voice']`), then Griffin-Lim (mel -> wav)."""

    def __init__(self, net: FlowNet, config: dict):
        self.net, self.config = net, config
        self.sample_rate = SAMPLE_RATE
        self.vocoder = GriffinLim(config["griffin_lim_iterations"])

    # Answers spoken together (synthesize_batch): batches of this many, of similar lengths.
    BATCH = 32

    def _speaker(self, voice: str | None) -> int:
        voices = self.config["voices"]
        voice = voice or self.config["voice"]
        if voice not in voices:
            raise ValueError(f"voice {voice!r}: not one this detokenizer learned; expected one of {voices}")
        return voices.index(voice)

    def _units(self, units: list[int]) -> list[int]:
        return [u for u in units if 0 <= u < self.config["codebook_size"]]

    def mel(self, units: list[int], seed: int = 0, voice: str | None = None) -> torch.Tensor:
        """Log-mel frames of `units` in `voice` (a voice it was trained on; default the assistant's)."""
        return sample_mel(self.net, self._units(units), self._speaker(voice), self.config["sampling_steps"], seed,
                          self.config["temperature"])

    def synthesize(self, units: list[int], seed: int = 0, voice: str | None = None) -> np.ndarray:
        """The waveform (float32, `sample_rate`) of `units` in `voice` (default the assistant's); ids outside the
        codebook (bos, eos, pad) are dropped. No unit: no samples."""
        return self.synthesize_batch([units], seed, voice)[0]

    def synthesize_batch(self, units_per_answer: list[list[int]], seed: int = 0,
                         voice: str | None = None) -> list[np.ndarray]:
        """`synthesize` of each answer: the flow samples `BATCH` answers of similar lengths at a time (each its
        batch-of-one mel to float rounding: sample_mels; measured twice as fast as one at a time), Griffin-Lim
        inverts each alone (a padded batch is no faster, and its silence would change a row's audio)."""
        speaker = self._speaker(voice)
        kept = [self._units(units) for units in units_per_answer]
        out = [np.zeros(0, dtype=np.float32) for _ in kept]
        spoken = [i for i, units in enumerate(kept) if units]
        for members in length_batches([len(kept[i]) for i in spoken], self.BATCH):
            rows = [spoken[m] for m in members]
            mels = sample_mels(self.net, [kept[i] for i in rows], speaker, self.config["sampling_steps"], seed,
                               self.config["temperature"])
            for i, mel in zip(rows, mels):
                out[i] = self.vocoder(mel)
        return out

    def save(self, directory, extra: dict[str, str] | None = None) -> None:
        """The folder, whole or not at all (fac.atomic.folder): config, weights and `extra` files (name -> text)."""
        with atomic.folder(directory) as tmp:
            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            for name, text in (extra or {}).items():
                (tmp / name).write_text(text)


def build_config(codebook_size: int, voices: list[str], voice: str, params: dict) -> dict:
    return {"model_type": MODEL_TYPE, "codebook_size": codebook_size, "voices": voices, "voice": voice,
            "sample_rate": SAMPLE_RATE,
            "unit_rate": UNIT_RATE, "n_mels": N_MELS, "hop_length": HOP_LENGTH, "channels": params["channels"],
            "layers": params["layers"], "kernel": params["kernel"], "dilations": params["dilations"],
            "unit_layers": params["unit_layers"], "sampling_steps": params["sampling_steps"],
            "temperature": params["temperature"],
            "griffin_lim_iterations": params["griffin_lim_iterations"]}


def new_net(config: dict) -> FlowNet:
    return FlowNet(config["codebook_size"], len(config["voices"]), channels=config["channels"],
                   layers=config["layers"], kernel=config["kernel"], dilations=config["dilations"],
                   unit_layers=config["unit_layers"])


class CommandDetokenizer:
    """kind `command`: an external units -> wav program (CosyVoice 3's token2wav: S3 codes and a speaker embedding ->
    24 kHz) run through bash from `config['command']`, ONCE PER BATCH of answers. Placeholders (values shell-quoted):
    `{units}` a JSON Lines file this class writes, one `{"id": "...", "units": [...]}` per answer; `{out}` an empty
    folder where the command writes `<id>.wav` for every line; `{speaker}` the speaker file (the folder's copy);
    optionally `{sample_rate}`. Each wav must be at `config['sample_rate']` (its header is checked). Ids outside
    0..codebook_size-1 (bos, eos, pad) are dropped; an answer left with no unit gives no samples and is not sent."""

    KEY, FIELDS, REQUIRED = templates.DETOKENIZER_COMMAND

    def __init__(self, config: dict, speaker_path):
        self.config = config
        self.template = self.check_template(config["command"])
        self.sample_rate = int(config["sample_rate"])
        self.codebook_size = int(config["codebook_size"])
        self.speaker = Path(speaker_path).resolve()
        if not self.speaker.is_file():
            raise FileNotFoundError(f"{self.speaker}: no such speaker file; expected the speaker embedding the "
                                    f"command reads ({{speaker}})")

    @classmethod
    def check_template(cls, template: str) -> str:
        """The template when its placeholders are {units}, {out}, {speaker} and optionally {sample_rate}; else a
        ValueError naming detokenizer.command and what is wrong."""
        return templates.check_template(template, cls.KEY, cls.FIELDS, cls.REQUIRED)

    def synthesize(self, units: list[int]) -> np.ndarray:
        """One answer's waveform (float32 at `sample_rate`); no unit: no samples (the command is not run)."""
        return self.synthesize_batch([units])[0]

    def synthesize_batch(self, units_per_answer: list[list[int]]) -> list[np.ndarray]:
        """Every answer's waveform, in order, from one run of the command (none when no answer has a unit)."""
        kept = [[int(u) for u in units if 0 <= int(u) < self.codebook_size] for units in units_per_answer]
        out = [np.zeros(0, dtype=np.float32) for _ in kept]
        asked = [i for i, units in enumerate(kept) if units]
        if not asked:
            return out
        with tempfile.TemporaryDirectory(prefix="fac-detokenizer-") as folder:
            units_file, wav_dir = Path(folder) / "units.jsonl", Path(folder) / "wavs"
            wav_dir.mkdir()
            ids = {i: f"answer{i:05d}" for i in asked}
            units_file.write_text("".join(json.dumps({"id": ids[i], "units": kept[i]}) + "\n" for i in asked))
            command = templates.fill(self.template, {"units": units_file, "out": wav_dir, "speaker": self.speaker,
                                                     "sample_rate": self.sample_rate})
            result = templates.run(command, self.KEY)
            for i in asked:
                out[i] = self._read(wav_dir / f"{ids[i]}.wav", command, result.stderr)
        return out

    def _read(self, path: Path, command: str, stderr: str) -> np.ndarray:
        if not path.is_file():
            raise RuntimeError(f"{self.KEY} wrote no {path.name} (expected one <id>.wav in {{out}} for every line of "
                               f"{{units}}): {command}\n{stderr.strip()[-2000:]}")
        try:
            samples, rate = sf.read(path, dtype="float32", always_2d=True)
        except (sf.SoundFileError, RuntimeError) as error:
            raise RuntimeError(f"{self.KEY} wrote {path.name}, which is not a readable wav ({error}): {command}") from error
        if rate != self.sample_rate:
            raise RuntimeError(f"{self.KEY} wrote {path.name} at {rate} Hz, but detokenizer.sample_rate is "
                               f"{self.sample_rate} Hz: {command}")
        mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        return np.ascontiguousarray(mono, dtype=np.float32)


CHECK_UNITS = list(range(25))  # one second of codes: what write_command_detokenizer speaks once to check the command


def write_command_detokenizer(params: dict, out_dir) -> dict:
    """The folder of kind `command` from the params section (`command`, `speaker`, `sample_rate`, `codebook_size`):
    config.json and a copy of the speaker file (the folder is self-contained), checked by speaking CHECK_UNITS once
    (a broken install or a wrong rate stops here, not after training); whole or not at all. Returns the check."""
    CommandDetokenizer.check_template(params["command"])
    source = Path(params["speaker"])
    if not source.is_file():
        raise FileNotFoundError(f"detokenizer.speaker {source}: no such file; expected the speaker embedding the "
                                "command reads (e.g. CosyVoice's 192-dim campplus embedding, .pt or .npy)")
    speaker_name = "speaker" + "".join(source.suffixes)
    config = {"model_type": COMMAND_MODEL_TYPE, "command": params["command"], "sample_rate": int(params["sample_rate"]),
              "codebook_size": int(params["codebook_size"]), "unit_rate": UNIT_RATE, "speaker": speaker_name}
    with atomic.folder(out_dir) as tmp:
        shutil.copyfile(source, tmp / speaker_name)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        samples = CommandDetokenizer(config, tmp / speaker_name).synthesize(CHECK_UNITS)
        check = {"units": len(CHECK_UNITS), "samples": len(samples), "seconds": len(samples) / config["sample_rate"],
                 "peak": float(np.abs(samples).max()) if len(samples) else 0.0}
        if not len(samples):
            raise RuntimeError(f"{CommandDetokenizer.KEY} wrote a wav without samples for {len(CHECK_UNITS)} units "
                               f"({params['command']}); expected speech")
        (tmp / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    return check


def load_detokenizer(directory) -> FlowDetokenizer | CommandDetokenizer:
    """A detokenizer folder: `FlowDetokenizer.save`'s (model_type fac_flow_detokenizer) or
    `write_command_detokenizer`'s (fac_command_detokenizer); a folder of anything else is named."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; expected a detokenizer folder ({CONFIG_NAME}, then "
                                f"{WEIGHTS_NAME} or the speaker file)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") == COMMAND_MODEL_TYPE:
        return CommandDetokenizer(config, directory / config["speaker"])
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{config_path}: model_type {config.get('model_type')!r} is not a detokenizer; "
                         f"expected {MODEL_TYPE!r} or {COMMAND_MODEL_TYPE!r}")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing; expected a detokenizer folder ({CONFIG_NAME}, {WEIGHTS_NAME})")
    net = new_net(config)
    net.load_state_dict(load_file(str(weights_path)))
    return FlowDetokenizer(net, config)


def _crop(example, crop_units: int, rng: np.random.Generator):
    units, mel, voice = example
    if not crop_units or len(units) <= crop_units:
        return example
    start = int(rng.integers(0, len(units) - crop_units + 1))
    return units[start:start + crop_units], mel[start * FRAMES_PER_UNIT:(start + crop_units) * FRAMES_PER_UNIT], voice


def _warmup_cosine(step: int, steps: int) -> float:
    """The learning rate's factor at `step` of `steps`: linear warm-up over the first tenth (at least one step), then
    a cosine down to zero."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def train_flow_detokenizer(examples: list[tuple[list[int], torch.Tensor, str]], codebook_size: int, voice: str,
                           params: dict, progress=None) -> tuple[FlowDetokenizer, list[float]]:
    """Train FlowNet on (units, log_mel(clip, len(units)), voice) examples for `params['steps']` steps of
    `params['batch_size']` clips, each a random window of at most `params['crop_units']` units (0: whole clips; a
    window is as good a lesson as its clip for a network that sees a few units around each frame, and long clips cost
    no more than short ones). AdamW warmed up to `params['lr']` over a tenth of the steps, then cosine to zero, seeded by `params['seed']`;
    it speaks in `voice` (one of the examples' voices). Returns the detokenizer and the loss of every step."""
    if not examples:
        raise ValueError("no (units, mel, voice) example to train the detokenizer on; expected synthesised clips")
    voices = sorted({v for _, _, v in examples})
    if voice not in voices:
        raise ValueError(f"voice {voice!r}: no example in it to learn it from; the examples' voices are {voices}")
    torch.manual_seed(params["seed"])
    config = build_config(codebook_size, voices, voice, params)
    net = new_net(config)
    frames = torch.cat([mel for _, mel, _ in examples])
    net.mel_mean.copy_(frames.mean(0))
    net.mel_std.copy_(frames.std(0).clamp_min(1e-3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=params["lr"])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup_cosine, steps=params["steps"]))
    generator = torch.Generator().manual_seed(params["seed"])
    order = np.random.default_rng(params["seed"])
    losses = []
    net.train()
    for _ in range(params["steps"]):
        batch = [_crop(examples[i], params["crop_units"], order)
                 for i in order.choice(len(examples), size=min(params["batch_size"], len(examples)), replace=False)]
        longest = max(len(u) for u, _, _ in batch)
        units = torch.zeros((len(batch), longest), dtype=torch.long)
        mels = torch.zeros((len(batch), longest * FRAMES_PER_UNIT, N_MELS))
        mask = torch.zeros((len(batch), longest * FRAMES_PER_UNIT))
        speaker = torch.tensor([voices.index(v) for _, _, v in batch])
        for row, (u, mel, _) in enumerate(batch):
            units[row, :len(u)] = torch.tensor(u)
            mels[row, :len(mel)] = mel
            mask[row, :len(mel)] = 1.0
        loss = flow_matching_loss(net, mels, units, speaker, mask, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(losses[-1])
    return FlowDetokenizer(net, config), losses
