"""The tiny detokenizer (fac/data/detokenizer.py): units -> mel by flow matching, mel -> wav by Griffin-Lim."""
import numpy as np
import pytest
import torch

from fac.data.audio import SAMPLE_RATE
from fac.data.detokenizer import (FRAMES_PER_UNIT, N_MELS, FlowDetokenizer, load_detokenizer, log_mel,
                                  sample_mel, sample_mels,
                                  train_flow_detokenizer)

PARAMS = {"channels": 64, "layers": 3, "kernel": 5, "dilations": 3, "unit_layers": 1, "sampling_steps": 8,
          "temperature": 1.0, "griffin_lim_iterations": 8, "steps": 300, "batch_size": 8, "crop_units": 8, "lr": 1e-2,
          "seed": 0}
CODEBOOK = 6


def tone_clip(units: list[int], voice: str = "low") -> np.ndarray:
    """A clip whose every 40 ms unit is a tone of its own pitch (unit u at 300 + 250 u Hz in voice "low", an octave
    higher in voice "high"): units and voice say the mel."""
    t = np.arange(640) / SAMPLE_RATE
    scale = 2.0 if voice == "high" else 1.0
    return np.concatenate([0.4 * np.sin(2 * np.pi * scale * (300 + 250 * u) * t) for u in units]).astype(np.float32)


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)
    out = []
    for n in range(32):
        units = [int(u) for u in np.repeat(rng.integers(0, CODEBOOK, size=6), rng.integers(1, 4, size=6))]
        voice = ("low", "high")[n % 2]
        out.append((units, log_mel(tone_clip(units, voice), len(units)), voice))
    return out


@pytest.fixture(scope="module")
def trained(examples, one_thread):
    return train_flow_detokenizer(examples, CODEBOOK, "low", PARAMS)


def test_log_mel_has_four_frames_per_unit():
    mel = log_mel(tone_clip([0, 1, 2]), 3)
    assert mel.shape == (3 * FRAMES_PER_UNIT, N_MELS)
    assert int(mel[2].argmax()) < int(mel[10].argmax())  # the higher tone's energy sits in a higher bin


def test_training_lowers_the_flow_loss_and_the_sampled_mel_approaches_the_clips(examples, trained):
    """Learning: the flow-matching loss falls, and mel sampled from held-out units is nearer the clip's mel than
    what the untrained flow samples (noise around the mean frame)."""
    detokenizer, losses = trained
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:10])  # (x0 is noise: the loss has a floor above 0)
    untrained, _ = train_flow_detokenizer(examples, CODEBOOK, "low", dict(PARAMS, steps=0))
    units = [0, 0, 3, 3, 5, 1, 1, 4]
    target = log_mel(tone_clip(units), len(units))
    error = (detokenizer.mel(units) - target).abs().mean()
    baseline = (untrained.mel(units) - target).abs().mean()
    assert error < 0.5 * baseline, (float(error), float(baseline))


def test_synthesis_speaks_640_samples_per_unit_and_drops_ids_outside_the_codebook(trained):
    detokenizer, _ = trained
    wave = detokenizer.synthesize([0, 2, 4, CODEBOOK, CODEBOOK + 1, 1])
    assert wave.dtype == np.float32 and len(wave) == 4 * 640 and detokenizer.sample_rate == SAMPLE_RATE
    assert 0.1 < np.abs(wave).max() <= 1.0
    assert len(detokenizer.synthesize([CODEBOOK])) == 0
    for units in ([3], [3, 1]):  # shorter than Griffin-Lim's STFT window: still 640 samples per unit, and sound
        short = detokenizer.synthesize(units)
        assert len(short) == 640 * len(units) and np.abs(short).max() > 0.1


def test_a_saved_detokenizer_loads_and_speaks_the_same_and_another_folder_is_named(trained, tmp_path):
    detokenizer, _ = trained
    detokenizer.save(tmp_path / "detok")
    again = load_detokenizer(tmp_path / "detok")
    assert isinstance(again, FlowDetokenizer)
    assert np.array_equal(again.synthesize([1, 2, 3]), detokenizer.synthesize([1, 2, 3]))
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text('{"model_type": "fac_speech_tokenizer"}')
    (tmp_path / "other/model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"other/config.json: model_type 'fac_speech_tokenizer' is not a detok"):
        load_detokenizer(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"missing/config.json: missing"):
        load_detokenizer(tmp_path / "missing")


def test_no_example_is_an_error_that_says_what_was_expected():
    with pytest.raises(ValueError, match="expected synthesised clips"):
        train_flow_detokenizer([], CODEBOOK, "low", PARAMS)


def test_it_speaks_in_the_voice_it_is_asked_for(examples, trained):
    """Conditioned on the speaker: the same units in the "high" voice put their energy an octave above "low"'s
    (the default, the voice it was trained to speak in); a voice it never heard is named."""
    detokenizer, _ = trained
    units = [1, 1, 1, 1]
    low, high = detokenizer.mel(units), detokenizer.mel(units, voice="high")
    assert detokenizer.config["voice"] == "low" and detokenizer.config["voices"] == ["high", "low"]
    assert int(high.mean(0).argmax()) > int(low.mean(0).argmax()) + 5
    with pytest.raises(ValueError, match=r"voice 'en-us\+f2': not one this detokenizer learned"):
        detokenizer.mel(units, voice="en-us+f2")


def test_temperature_scales_the_starting_noise(trained):
    """At temperature 0 the flow starts from the mean (zero noise): the seed no longer matters; at 1 it does."""
    detokenizer, _ = trained
    units = [0, 2, 2, 5]
    config = dict(detokenizer.config)
    try:
        detokenizer.config["temperature"] = 0.0
        assert torch.equal(detokenizer.mel(units, seed=0), detokenizer.mel(units, seed=1))
        detokenizer.config["temperature"] = 1.0
        assert not torch.equal(detokenizer.mel(units, seed=0), detokenizer.mel(units, seed=1))
    finally:
        detokenizer.config.update(config)


def test_training_windows_are_crops_of_the_clips_aligned_with_their_units():
    from fac.data.detokenizer import _crop

    units = list(range(20))
    mel = torch.arange(80, dtype=torch.float32)[:, None].expand(80, N_MELS)  # frame i holds i
    rng = np.random.default_rng(0)
    for _ in range(10):
        part, frames, voice = _crop((units, mel, "v"), 6, rng)
        assert len(part) == 6 and voice == "v" and frames.shape == (6 * FRAMES_PER_UNIT, N_MELS)
        assert int(frames[0, 0]) == FRAMES_PER_UNIT * part[0] and part == list(range(part[0], part[0] + 6))
    assert _crop((units, mel, "v"), 0, rng)[0] == units and _crop((units[:4], mel[:16], "v"), 6, rng)[0] == units[:4]


def test_the_learning_rate_warms_up_over_a_tenth_of_the_steps_then_falls_to_zero_even_for_a_few_steps(examples):
    """Any number of steps trains (the micro world's 10 broke torch's OneCycleLR: a warm-up of zero steps)."""
    from fac.data.detokenizer import _warmup_cosine

    assert [_warmup_cosine(s, 100) for s in (0, 9)] == [0.1, 1.0] and _warmup_cosine(99, 100) < 0.001
    assert _warmup_cosine(0, 10) == 1.0 and _warmup_cosine(9, 10) < 0.05
    for steps in (1, 3, 10):
        _, losses = train_flow_detokenizer(examples, CODEBOOK, "low", dict(PARAMS, steps=steps))
        assert len(losses) == steps


# ------------------------------------------------------------------ kind command: CosyVoice 3's token2wav, by template
from standins import TOKEN2WAV_RATE, TOKEN2WAV_SAMPLES_PER_UNIT, speaker_embedding, token2wav_command  # noqa: E402


def command_params(tmp_path, extra: str = "", **changes) -> dict:
    params = {"kind": "command", "command": token2wav_command(tmp_path / "bin", extra),
              "speaker": str(speaker_embedding(tmp_path / "voice.npy")), "sample_rate": TOKEN2WAV_RATE,
              "codebook_size": 6561}
    return {**params, **changes}


@pytest.fixture
def command_detokenizer(tmp_path):
    from fac.data.detokenizer import write_command_detokenizer

    calls = tmp_path / "calls.txt"
    check = write_command_detokenizer(command_params(tmp_path, f"--calls {calls}"), tmp_path / "detok")
    return load_detokenizer(tmp_path / "detok"), calls, check


def test_a_command_detokenizer_speaks_a_batch_in_one_run_at_its_rate_dropping_ids_outside_the_codebook(
        command_detokenizer, tmp_path):
    from fac.data.detokenizer import CHECK_UNITS, CommandDetokenizer

    detokenizer, calls, check = command_detokenizer
    assert isinstance(detokenizer, CommandDetokenizer) and detokenizer.sample_rate == TOKEN2WAV_RATE
    assert check["samples"] == len(CHECK_UNITS) * TOKEN2WAV_SAMPLES_PER_UNIT  # the folder was checked by one run
    assert len(calls.read_text().splitlines()) == 1
    # The folder is self-contained: its own copy of the speaker file, which the command is handed.
    assert (tmp_path / "detok/speaker.npy").read_bytes() == (tmp_path / "voice.npy").read_bytes()
    assert detokenizer.config["model_type"] == "fac_command_detokenizer"
    batch = [[1, 2, 3], [6561, 6562, 6563], [], [7, 6561, 8, -1, 9, 10], [5] * 30]
    waves = detokenizer.synthesize_batch(batch)
    assert len(calls.read_text().splitlines()) == 2  # one run for the whole batch
    assert [len(w) for w in waves] == [n * TOKEN2WAV_SAMPLES_PER_UNIT for n in (3, 0, 0, 4, 30)]
    assert all(w.dtype == np.float32 for w in waves)
    assert all(np.abs(w).max() > 0.1 for w in waves if len(w))
    assert not np.array_equal(waves[0], waves[3][: len(waves[0])])  # the pitch follows the units
    assert len(detokenizer.synthesize([4, 5])) == 2 * TOKEN2WAV_SAMPLES_PER_UNIT  # one answer: one more run
    assert len(calls.read_text().splitlines()) == 3
    assert [len(w) for w in detokenizer.synthesize_batch([[6561], []])] == [0, 0]  # nothing to say: no run
    assert len(calls.read_text().splitlines()) == 3


def test_a_flow_detokenizer_has_the_same_batch_method(trained):
    detokenizer, _ = trained
    waves = detokenizer.synthesize_batch([[0, 1], [CODEBOOK], [2, 3, 4]])
    assert [len(w) for w in waves] == [2 * 640, 0, 3 * 640]
    alone = detokenizer.synthesize([2, 3, 4])
    # Padded beside a shorter answer, the flow gives the answer its mel alone (to float rounding), so Griffin-Lim
    # hears almost the same audio.
    assert np.corrcoef(waves[2], alone)[0, 1] > 0.99


def test_a_padded_batch_gives_each_answer_its_mel_alone(trained):
    detokenizer, _ = trained
    answers = [[5, 4, 3, 2, 1, 0, 1, 2], [3], [2, 1, 0]]
    batched = sample_mels(detokenizer.net, answers, 0, detokenizer.config["sampling_steps"], 0, 0.5)
    for units, mel in zip(answers, batched):
        alone = sample_mel(detokenizer.net, units, 0, detokenizer.config["sampling_steps"], 0, 0.5)
        assert mel.shape == alone.shape == (4 * len(units), 80)
        assert torch.allclose(mel, alone, atol=1e-4)
    # What follows an answer reaches its frames (the norm's statistics, the convolutions): were the padding not masked
    # out, the batch would change the short answer as these seven more units do.
    wrong = sample_mels(detokenizer.net, [answers[1] + [0] * 7], 0, detokenizer.config["sampling_steps"], 0, 0.5)
    assert not torch.allclose(wrong[0][:4], batched[1], atol=1e-2)


@pytest.mark.parametrize("template, message", [
    ("token2wav {units} {out}", r"detokenizer.command 'token2wav \{units\} \{out\}': lacks \['speaker'\]"),
    ("token2wav {units} {out} {speaker} {voice}", r"unknown placeholder\(s\) \['voice'\]"),
    ("token2wav {units", r"not a template"),
])
def test_a_bad_template_is_refused_naming_the_key_and_what_is_expected(tmp_path, template, message):
    from fac.data.detokenizer import write_command_detokenizer

    with pytest.raises(ValueError, match=message):
        write_command_detokenizer(command_params(tmp_path, command=template), tmp_path / "detok")
    assert not (tmp_path / "detok").exists()


def test_a_failing_command_names_itself_and_its_stderr_and_leaves_no_folder(tmp_path):
    from fac.data.detokenizer import write_command_detokenizer

    with pytest.raises(RuntimeError, match=r"(?s)detokenizer.command failed \(exit 1\): .*token2wav_standin.py.*"
                                           r"CUDA out of memory"):
        write_command_detokenizer(command_params(tmp_path, "--fail"), tmp_path / "detok")
    assert not (tmp_path / "detok").exists()


def test_a_missing_wav_or_a_wav_at_another_rate_is_named(command_detokenizer, tmp_path):
    from fac.data.detokenizer import CommandDetokenizer

    detokenizer, _, _ = command_detokenizer
    skipping = CommandDetokenizer({**detokenizer.config, "command": detokenizer.config["command"] + " --skip answer00001"},
                                  tmp_path / "detok/speaker.npy")
    with pytest.raises(RuntimeError, match=r"detokenizer.command wrote no answer00001.wav \(expected one <id>.wav"):
        skipping.synthesize_batch([[1], [2]])
    wrong = CommandDetokenizer({**detokenizer.config, "command": detokenizer.config["command"] + " --sample-rate 16000"},
                               tmp_path / "detok/speaker.npy")
    with pytest.raises(RuntimeError, match=r"wrote answer00000.wav at 16000 Hz, but detokenizer.sample_rate is 24000"):
        wrong.synthesize([1, 2])


def test_a_missing_speaker_file_or_a_folder_of_another_model_is_named(command_detokenizer, tmp_path):
    from fac.data.detokenizer import write_command_detokenizer

    with pytest.raises(FileNotFoundError, match=r"detokenizer.speaker .*nobody.npy: no such file"):
        write_command_detokenizer(command_params(tmp_path, speaker=str(tmp_path / "nobody.npy")), tmp_path / "d2")
    (tmp_path / "detok/speaker.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"detok/speaker.npy: no such speaker file"):
        load_detokenizer(tmp_path / "detok")
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text('{"model_type": "fac_s3_speech_tokenizer"}')
    with pytest.raises(ValueError, match=r"other/config.json: model_type 'fac_s3_speech_tokenizer' is not a "
                                         r"detokenizer; expected 'fac_flow_detokenizer' or 'fac_command_detokenizer'"):
        load_detokenizer(tmp_path / "other")


@pytest.mark.parametrize("speaker_file", ["voice.pt", "voice.npy"])
def test_the_shipped_cosyvoice3_script_speaks_each_line_through_token2wav_as_cosyvoice_calls_it(tmp_path, speaker_file):
    """workflow/scripts/cosyvoice3_token2wav.py (paper.yaml's command) over a stand-in CosyVoice install whose
    CosyVoice3Model.token2wav checks every argument as the real one needs it: one wav per line at 24 kHz, 960 samples
    per code; the speaker embedding reaches it as [1, 192]."""
    from standins import cosyvoice3_command

    from fac.data.detokenizer import write_command_detokenizer

    params = command_params(tmp_path, command=cosyvoice3_command(tmp_path / "cosyvoice"),
                            speaker=str(speaker_embedding(tmp_path / speaker_file)))
    check = write_command_detokenizer(params, tmp_path / "detok")
    assert check["samples"] == 25 * TOKEN2WAV_SAMPLES_PER_UNIT
    waves = load_detokenizer(tmp_path / "detok").synthesize_batch([[1, 2, 3], [6560] * 7, [], [6561, 4]])
    assert [len(w) for w in waves] == [3 * TOKEN2WAV_SAMPLES_PER_UNIT, 7 * TOKEN2WAV_SAMPLES_PER_UNIT, 0,
                                       TOKEN2WAV_SAMPLES_PER_UNIT]
    assert all(np.abs(w).max() > 0.3 for w in waves if len(w))


def test_the_shipped_cosyvoice3_script_refuses_a_model_at_another_rate(tmp_path):
    from standins import cosyvoice3_command

    from fac.data.detokenizer import write_command_detokenizer

    params = command_params(tmp_path, command=cosyvoice3_command(tmp_path / "cosyvoice"), sample_rate=22050)
    with pytest.raises(RuntimeError, match="speaks at 24000 Hz, but detokenizer.sample_rate is 22050"):
        write_command_detokenizer(params, tmp_path / "detok")
    assert not (tmp_path / "detok").exists()
