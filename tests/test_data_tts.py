"""fac.data.tts and fac.data.voices: espeak-ng voices are validated, clips are 16 kHz wavs, batches resume without redoing work."""

import pytest
import soundfile as sf

from fac.data import audio, tts, voices

ACCENTS = {"en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc"}


def job(name, text="the red cat", voice="en-us", **extra):
    return dict(id=name, text=text, voice=voice, rate=160, pitch=50, amplitude=100, **extra)


def test_available_voices_are_the_eight_accents_alone_and_with_every_variant():
    known = voices.available_voices()
    assert {v for v in known if "+" not in v} == ACCENTS
    variants = {v.split("+")[1] for v in known if "+" in v}
    assert {"f1", "f5", "m1", "m7"} <= variants
    assert len(known) == len(ACCENTS) * (1 + len(variants))


def test_available_voices_leave_out_mbrola_voices():
    assert "en-uk" not in voices.available_voices()  # listed by espeak-ng, needs the mbrola program


def test_check_voices_names_each_unknown_voice():
    with pytest.raises(ValueError, match=r"\['en-xx', 'en-us\+zz'\].*en-us\+f3"):
        voices.check_voices(["en-us", "en-xx", "en-us+zz"])


def test_check_voices_accepts_known_voices():
    voices.check_voices(["en-us", "en-gb-scotland+m3", "en-029+f1"])


def test_synthesize_writes_a_16_khz_wav_of_the_returned_duration(tmp_path):
    seconds = tts.synthesize("the red cat sat on the mat", "en-gb+f3", 160, 50, 100, tmp_path / "a.wav")
    info = sf.info(tmp_path / "a.wav")
    assert info.samplerate == audio.SAMPLE_RATE and info.channels == 1
    assert info.duration == pytest.approx(seconds)
    assert 1.0 < seconds < 3.0


def test_synthesize_faster_rate_gives_a_shorter_clip(tmp_path):
    slow = tts.synthesize("the red cat sat on the mat", "en-us", 100, 50, 100, tmp_path / "slow.wav")
    fast = tts.synthesize("the red cat sat on the mat", "en-us", 300, 50, 100, tmp_path / "fast.wav")
    assert fast < 0.6 * slow


def test_synthesize_rejects_an_unknown_voice_that_espeak_would_replace_silently(tmp_path):
    with pytest.raises(ValueError, match="en-xx"):
        tts.synthesize("hello", "en-xx", 160, 50, 100, tmp_path / "a.wav")
    assert not (tmp_path / "a.wav").exists()


def test_synthesize_rejects_pitch_outside_espeak_range(tmp_path):
    with pytest.raises(ValueError, match=r"pitch 120 .* expected 0 to 99"):
        tts.synthesize("hello", "en-us", 160, 120, 100, tmp_path / "a.wav")


def test_synthesize_reads_text_starting_with_a_dash_as_text(tmp_path):
    assert tts.synthesize("-w red cat", "en-us", 160, 50, 100, tmp_path / "a.wav") > 0.5


def test_synthesize_all_returns_jobs_in_order_with_path_and_duration(tmp_path):
    jobs = [job("b2", text="a blue dog ran to the park", speaker="s1"), job("a1"), job("c3", voice="en-gb+m3")]
    done = tts.synthesize_all(jobs, tmp_path / "wavs", workers=2)
    assert [d["id"] for d in done] == ["b2", "a1", "c3"]
    assert [d["path"] for d in done] == ["b2.wav", "a1.wav", "c3.wav"]
    assert done[0]["speaker"] == "s1"
    for d in done:
        assert d["duration"] == pytest.approx(audio.duration_seconds(tmp_path / "wavs" / d["path"]))
    assert done[0]["duration"] > done[1]["duration"]  # the longer text


def test_synthesize_all_keeps_finished_wavs_and_redoes_broken_ones(tmp_path):
    jobs = [job("a"), job("b")]
    tts.synthesize_all(jobs, tmp_path)
    kept = (tmp_path / "a.wav").stat().st_mtime_ns
    (tmp_path / "b.wav").write_bytes(b"RIFF cut off by a kill")
    done = tts.synthesize_all(jobs, tmp_path)
    assert (tmp_path / "a.wav").stat().st_mtime_ns == kept
    assert len(audio.read_wav(tmp_path / "b.wav")) / audio.SAMPLE_RATE == pytest.approx(done[1]["duration"])


def test_synthesize_all_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="'a' appears twice"):
        tts.synthesize_all([job("a"), job("a")], tmp_path)


def test_synthesize_all_rejects_an_id_that_is_a_path(tmp_path):
    with pytest.raises(ValueError, match=r"'\.\./a'"):
        tts.synthesize_all([job("../a")], tmp_path)


def test_synthesize_all_rejects_a_job_without_text(tmp_path):
    incomplete = job("a")
    del incomplete["text"]
    with pytest.raises(ValueError, match=r"tts job 0 \('a'\) lacks \['text'\]"):
        tts.synthesize_all([incomplete], tmp_path)


def test_synthesize_all_checks_every_voice_before_synthesising(tmp_path):
    with pytest.raises(ValueError, match="en-zz"):
        tts.synthesize_all([job("a"), job("b", voice="en-zz")], tmp_path)
    assert not (tmp_path / "a.wav").exists()


def test_plan_adds_each_answer_in_every_instructed_style_at_its_rate(root, lexicon_path):
    import yaml

    from fac.data.plan import plan_utterances
    from fac.data.world import build_world, load_source

    params = yaml.safe_load((root / "params/default.yaml").read_text())
    source = load_source(lexicon_path)
    world = build_world(source, 4, 0.25, 1)
    tts_cfg, styles = params["tts"], {"slowly": 0.6, "quickly": 1.6}
    plain = plan_utterances(world, source, tts_cfg, params["paraling"], 5)
    jobs = plan_utterances(world, source, tts_cfg, params["paraling"], 5, {"styles": styles})
    normal = {j["text"]: j for j in jobs if j["kind"] == "answer" and "style" not in j}
    styled = [j for j in jobs if j.get("style")]
    values = {f["value"] for f in world.facts}
    assert {(j["text"], j["style"]) for j in styled} == {(v, s) for v in values for s in styles}
    for j in styled:
        assert j["rate"] == round(normal[j["text"]]["rate"] * styles[j["style"]])
        assert (j["voice"], j["pitch"]) == (normal[j["text"]]["voice"], normal[j["text"]]["pitch"])
    # the styles add clips and change nothing else (the same draws, the same ids)
    assert [j for j in jobs if not j.get("style")] == plain


# ------------------------------------------------------------------ engine command (any external synthesiser)

ESPEAK_COMMAND = "espeak-ng -v {voice} -s {rate} -p {pitch} -a {amplitude} -w {out} {text}"


def test_command_engine_speaks_through_the_template_as_a_16khz_clip(tmp_path):
    engine = tts.engine({"engine": "command", "command": ESPEAK_COMMAND})
    seconds = engine.synthesize("the red cat sat on the mat", "en-gb+f3", 160, 50, 100, tmp_path / "a.wav")
    data, rate = sf.read(tmp_path / "a.wav")
    assert rate == audio.SAMPLE_RATE and data.ndim == 1 and abs(len(data) / rate - seconds) < 1e-6 and seconds > 0.8
    # the same clip espeak-ng's own engine writes: the command engine changes how it is called, nothing else
    tts.synthesize("the red cat sat on the mat", "en-gb+f3", 160, 50, 100, tmp_path / "b.wav")
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_command_engine_quotes_text_that_the_shell_would_read(tmp_path):
    engine = tts.CommandEngine(ESPEAK_COMMAND)
    assert engine.synthesize("it's $HOME; rm -rf / `x`", "en-us", 160, 50, 100, tmp_path / "a.wav") > 0.5


def test_command_engine_failure_names_the_command_and_its_error(tmp_path):
    engine = tts.CommandEngine("echo synthesiser broke >&2; exit 3 # {text} {voice} {out}")
    with pytest.raises(RuntimeError, match=r"tts.command failed \(exit 3\) on text 'hi' with voice 'v1'.*synthesiser broke"):
        engine.synthesize("hi", "v1", 160, 50, 100, tmp_path / "a.wav")
    silent = tts.CommandEngine("touch {out} # {text} {voice}")
    with pytest.raises(RuntimeError, match="wrote no usable speech"):
        silent.synthesize("hi", "v1", 160, 50, 100, tmp_path / "b.wav")
    assert not (tmp_path / "a.wav").exists() and not (tmp_path / "b.wav").exists()


@pytest.mark.parametrize("template, message", [
    ("say {text} > {out}", r"lacks \['voice'\]"),
    ("say -v {voice} {text} {speed} > {out}", r"unknown placeholder\(s\) \['speed'\]"),
])
def test_command_template_placeholders_are_checked(template, message):
    with pytest.raises(ValueError, match=message):
        tts.CommandEngine(template)


def test_command_engine_checks_each_voice_once_by_speaking_with_it(tmp_path):
    log = tmp_path / "calls.txt"
    engine = tts.CommandEngine(f"echo {{voice}} >> {log}; " + ESPEAK_COMMAND)
    engine.check_voices(["en-us", "en-gb", "en-us"])
    assert log.read_text().split() == ["en-us", "en-gb"]
    # a synthesiser that knows one speaker: the other is named before any clip is made
    one_speaker = tts.CommandEngine("test {voice} = alice && espeak-ng -v en-us -w {out} {text}")
    with pytest.raises(RuntimeError, match="with voice 'bob'"):
        one_speaker.check_voices(["alice", "bob"])


def test_command_engine_batches_resume_like_espeak_batches(tmp_path):
    engine = tts.CommandEngine(ESPEAK_COMMAND)
    jobs = [job("a"), job("b", text="a green dog")]
    tts.synthesize_all(jobs, tmp_path, synthesiser=engine)
    stamp = (tmp_path / "a.wav").stat().st_mtime_ns
    (tmp_path / "b.wav").unlink()
    done = tts.synthesize_all(jobs, tmp_path, synthesiser=engine)
    assert (tmp_path / "a.wav").stat().st_mtime_ns == stamp and (tmp_path / "b.wav").is_file()
    assert [d["path"] for d in done] == ["a.wav", "b.wav"]


def test_each_command_template_keeps_its_clips_apart():
    first, second = tts.CommandEngine(ESPEAK_COMMAND), tts.CommandEngine(ESPEAK_COMMAND + " --punct")
    assert first.folder != second.folder and tts.EspeakEngine().folder == "wavs"


def test_plan_adds_referring_questions_per_fact_and_distance_and_changes_no_other_clip(root, lexicon_path):
    import yaml

    from fac.data.plan import plan_utterances
    from fac.data.world import REFERENCES, all_sentences, build_world, load_source

    params = yaml.safe_load((root / "params/default.yaml").read_text())
    source = load_source(lexicon_path)
    world = build_world(source, 4, 0.25, 1)
    plain = plan_utterances(world, source, params["tts"], params["paraling"], 5)
    jobs = plan_utterances(world, source, params["tts"], params["paraling"], 5, None,
                           {"train_per_fact": 1, "test_per_fact": 2})
    referring = [j for j in jobs if j["kind"] == "reference"]
    facts = {f["id"]: f for f in world.facts}
    assert len(referring) == sum(1 if f["split"] == "train" else 2 for f in world.facts) * len(REFERENCES)
    sentences = set(all_sentences(world, source))
    for j in referring:
        fact = facts[j["fact"]]
        assert j["split"] == fact["split"] and j["answer"] == fact["value"] and j["entity"] == fact["entity"]
        assert fact["name"] not in j["text"] and REFERENCES[j["distance"]] in j["text"]
        assert j["voice"] in params["tts"]["train_voices"] and j["text"] in sentences  # the ASR LM and tokenizer know it
    assert [j for j in jobs if j["kind"] != "reference"] == plain  # every other clip as without dialogues
