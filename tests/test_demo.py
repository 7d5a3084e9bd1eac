"""`fac demo`: the page answers a spoken question as `fac infer` does, in headless Chromium (uploaded, and recorded
from Chromium's fake microphone), and plays the spoken answer; bad audio gets HTTP 400 naming the problem, shown on
the page; the model is loaded once, at start; the command serves until Ctrl-C. On the micro experiment."""
import base64
import io
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from browser import FAKE_MICROPHONE, audio_report, chrome
from workflow_helpers import BIN, env

MAX_NEW_TOKENS = 12
MIN_NEW_TOKENS = 6  # the micro model, trained a few steps, may end its answer at once: made to say a few tokens first
SAMPLES_PER_UNIT = 640  # the detokenizer's: 16 kHz / 25 units per second


@pytest.fixture(scope="module")
def experiment(micro_run) -> dict:
    """The micro experiment's stage-2 model, its detokenizer and a spoken test question."""
    data = micro_run / "results/micro/data"
    first = json.loads((data / "manifests/spoken_qa_test.jsonl").read_text().splitlines()[0])
    return {"model": str(micro_run / "results/micro/checkpoints/stage2"), "detokenizer": str(data / "detokenizer"),
            "question": str(data / json.loads(first["audio"][0])["path"]), "workdir": micro_run}


@pytest.fixture(scope="module")
def expected(experiment) -> dict:
    """The model's own answer to the question (`fac infer --mode s2m`'s)."""
    from fac.eval.infer import answer

    return answer(experiment["model"], experiment["question"], mode="s2m", max_new_tokens=MAX_NEW_TOKENS,
                  min_new_tokens=MIN_NEW_TOKENS)


@pytest.fixture(scope="module")
def server(experiment):
    from fac.eval.demo import DemoServer

    with DemoServer(experiment["model"], experiment["detokenizer"], port=0,
                    max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MIN_NEW_TOKENS).start() as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with chrome(*FAKE_MICROPHONE) as driver:
        yield driver


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "answer", data=body, method="POST", headers={"Content-Type": "audio/wav"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wav_bytes(samples, sample_rate=16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def element(driver, id_: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, id_)


def wait_for_state(driver, *states: str, timeout: float = 120) -> str:
    """The page's #status data-state once it is one of `states` (idle, ready, recording, asking, answered, error)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: element(d, "status").get_attribute("data-state") in states)
    return element(driver, "status").get_attribute("data-state")


def test_the_page_answers_an_uploaded_question_as_fac_infer_does_and_plays_the_spoken_answer(
        server, experiment, expected, browser):
    browser.get(server.url)
    assert element(browser, "ask").get_attribute("disabled")  # nothing to ask yet
    element(browser, "question-file").send_keys(experiment["question"])
    element(browser, "ask").click()
    assert wait_for_state(browser, "answered", "error") == "answered", element(browser, "error").text
    assert element(browser, "error").text == ""
    assert element(browser, "answer-text").text == expected["text"]
    assert expected["speech_tokens"], "the micro model spoke no unit: nothing to hear"
    assert element(browser, "answer-units").text == str(len(expected["speech_tokens"]))
    src = element(browser, "answer-audio").get_attribute("src")
    assert src.startswith("data:audio/wav;base64,")
    heard = audio_report(browser, "#answer-audio")  # as Chromium decodes it
    assert heard["duration"] == pytest.approx(len(expected["speech_tokens"]) * SAMPLES_PER_UNIT / 16000, abs=0.01)
    assert heard["duration"] > 0 and heard["peak"] > 0.01  # not silent


def test_post_answer_returns_the_text_units_and_the_spoken_answer_as_a_wav(server, experiment, expected):
    from fac.data.detokenizer import load_detokenizer

    with open(experiment["question"], "rb") as question:
        status, body = post(server.url, question.read())
    assert status == 200, body
    assert body["text"] == expected["text"] and body["speech_tokens"] == expected["speech_tokens"]
    samples, sample_rate = sf.read(io.BytesIO(base64.b64decode(body["audio"])), dtype="float32")
    assert sample_rate == body["sample_rate"] == 16000 and samples.ndim == 1
    assert len(samples) == SAMPLES_PER_UNIT * len(body["speech_tokens"])
    # What the detokenizer says for these units (fac infer --speak's wav), to 16-bit rounding.
    spoken = load_detokenizer(experiment["detokenizer"]).synthesize(body["speech_tokens"])
    assert np.abs(samples - np.clip(spoken, -1, 1)).max() < 2 / 32768


@pytest.mark.parametrize("body, problem", [
    (b"not a wav", "not a readable audio file"),
    (b"", "is empty (0 bytes)"),
    (wav_bytes(np.zeros(16000, dtype=np.float32)), "is silent"),
    (wav_bytes(np.zeros(0, dtype=np.float32)), "holds 0 samples"),
])
def test_bad_audio_gets_400_naming_the_problem(server, body, problem):
    status, answer = post(server.url, body)
    assert status == 400 and set(answer) == {"error"}
    assert problem in answer["error"] and answer["error"].startswith("the question: "), answer


def test_the_page_shows_the_error_of_a_bad_file(server, browser, tmp_path):
    bad = tmp_path / "question.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not really a wav file")
    browser.get(server.url)
    element(browser, "question-file").send_keys(str(bad))
    element(browser, "ask").click()
    assert wait_for_state(browser, "answered", "error") == "error"
    shown = element(browser, "error").text
    assert shown.startswith("question.wav: not a readable audio file"), shown  # the page names the file it sent
    assert element(browser, "answer-text").text == "" and not element(browser, "answer-audio").get_attribute("src")


_QUESTION_BYTES = """
const done = arguments[0];
fetch(document.getElementById("question-audio").src).then((r) => r.arrayBuffer()).then((buffer) => {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 8192) text += String.fromCharCode(...bytes.subarray(i, i + 8192));
  done(btoa(text));
}).catch((error) => done("error: " + error));
"""


def test_a_recorded_question_is_sent_as_a_16khz_mono_wav_and_answered(server, browser):
    browser.get(server.url)
    element(browser, "record").click()
    assert wait_for_state(browser, "recording", "error", timeout=20) == "recording", element(browser, "error").text
    time.sleep(2.0)  # Chromium's fake microphone beeps every second
    element(browser, "record").click()
    assert wait_for_state(browser, "ready", "error", timeout=30) == "ready", element(browser, "error").text
    encoded = browser.execute_async_script(_QUESTION_BYTES)
    assert not encoded.startswith("error"), encoded
    samples, sample_rate = sf.read(io.BytesIO(base64.b64decode(encoded)), dtype="float32", always_2d=True)
    assert sample_rate == 16000 and samples.shape[1] == 1  # resampled and encoded in the page
    assert 1.5 < len(samples) / sample_rate < 4.0 and np.abs(samples).max() > 0.01
    element(browser, "ask").click()
    assert wait_for_state(browser, "answered", "error") == "answered", element(browser, "error").text
    assert element(browser, "answer-units").text.isdigit()


def test_requests_use_the_model_and_detokenizer_loaded_at_start(server, experiment, expected):
    def never(*args, **kwargs):
        raise AssertionError("a request loaded a model again")

    with open(experiment["question"], "rb") as question:
        data = question.read()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fac.eval.infer.load_checkpoint", never)
        patch.setattr("fac.eval.infer.load_tokenizer", never)
        patch.setattr("fac.data.detokenizer.load_detokenizer", never)
        status, body = post(server.url, data)
    assert status == 200 and body["text"] == expected["text"], body


def test_decode_audio_reads_bytes_as_read_wav_reads_the_file(tmp_path):
    from fac.data.audio import AudioError, read_wav
    from fac.data.audio import decode_audio

    t = np.arange(44100) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="PCM_16")
    decoded = decode_audio(path.read_bytes(), "stereo.wav")
    assert decoded.dtype == np.float32 and decoded.shape == (16000,)  # mono, resampled to 16 kHz
    np.testing.assert_array_equal(decoded, read_wav(path))
    silent, broken = tmp_path / "silent.wav", tmp_path / "broken.wav"
    sf.write(silent, np.zeros(8000), 16000, subtype="PCM_16")
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not really a wav file")
    for bad in (silent, broken):
        with pytest.raises(AudioError) as from_file:
            read_wav(bad)
        with pytest.raises(AudioError) as from_bytes:
            decode_audio(bad.read_bytes(), str(bad))
        # The same words, but where libsndfile names what it opened (the path, or a buffer).
        assert str(from_bytes.value).split(" (")[0] == str(from_file.value).split(" (")[0]


def test_fac_demo_serves_the_experiment_until_interrupted(experiment):
    """The command as a person runs it: the detokenizer found two folders above --model, the URL printed, a
    question answered, Ctrl-C (SIGINT) ends it with status 0."""
    proc = subprocess.Popen([str(BIN / "fac"), "demo", "--model", experiment["model"], "--port", "0",
                             "--max-new-tokens", str(MAX_NEW_TOKENS),
                             "--min-new-tokens", str(MIN_NEW_TOKENS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), cwd=experiment["workdir"])
    try:
        line = proc.stdout.readline()  # printed once the model and the detokenizer are loaded
        if not line:
            raise AssertionError(f"fac demo ended ({proc.wait()}) before serving:\n{proc.stderr.read()[-3000:]}")
        assert line.startswith("fac demo: http://127.0.0.1:"), line
        url = line.split()[2]
        with urllib.request.urlopen(url, timeout=30) as page:
            html = page.read().decode()
        assert all(f'id="{id_}"' in html for id_ in ("question-file", "record", "ask", "answer-text", "answer-audio",
                                                     "error", "status"))
        with open(experiment["question"], "rb") as question:
            status, body = post(url, question.read())
        assert status == 200 and body["audio"] and body["sample_rate"] == 16000, body
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fac_demo_names_a_missing_detokenizer_or_model(experiment, tmp_path, capsys):
    from fac.cli import main

    assert main(["demo", "--model", experiment["model"], "--port", "0", "--detokenizer", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "fac demo: error:" in err and str(tmp_path / "none") in err and "detokenizer" in err
    assert main(["demo", "--model", str(tmp_path / "checkpoints/stage2"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "fac demo: error:" in err and f"{tmp_path / 'checkpoints/stage2'}: no checkpoint here" in err
