"""`fac demo`: talk to a trained model in a browser. A local page where a person uploads or records a spoken
question and hears the model's spoken answer (the DRSR model in s2m mode: text and speech tokens, the speech tokens
spoken by the experiment's detokenizer).

A plain page from the standard library (`http.server.ThreadingHTTPServer`), not gradio: gradio's dependencies do
not fit the project's pins (gradio 6.31 caps pillow below 13, which the pinned matplotlib brought in as 13.0, and
adds fastapi, starlette, uvicorn, pydub and ten more packages to requirements.txt), and the page needs no more than
one form and one JSON endpoint.

- `GET /`: one self-contained HTML page (no external script, style or font): a wav file input, a Record button
  (MediaRecorder; the browser decodes the recording and resamples it to a 16 kHz mono PCM16 wav itself, with
  AudioContext and OfflineAudioContext), Ask, then the answer's text, its speech-unit count and an `<audio>` of the
  spoken answer (a `data:audio/wav;base64,...` URI).
- `POST /answer`, body the question's audio bytes (a wav; flac and ogg read too): JSON `{"text", "speech_tokens"
  (the units), "audio" (base64 wav, null when the answer holds no speech unit), "sample_rate"}`. Audio that is
  empty, unreadable or silent gets HTTP 400 and `{"error": "..."}` naming the problem (fac.data.audio.decode_audio:
  read_wav's checks on bytes); the page shows it in `#error`.

The checkpoint and the detokenizer are loaded once, when the server starts (`DemoServer`), and questions are
answered one at a time (a lock: two answers at once would only share the same cores). Recording needs a secure
context: the page on http://127.0.0.1 or http://localhost records; opened from another machine over plain http the
browser refuses the microphone, and uploading a file still works.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fac.data.audio import SAMPLE_RATE, AudioError, decode_audio, encode_wav
from fac.data.detokenizer import load_detokenizer
from fac.eval.infer import Answerer

log = logging.getLogger("fac.demo")

MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # about 35 minutes of 16 kHz 16-bit mono: far longer than any question


class DemoServer:
    """The demo's HTTP server with its model and detokenizer, loaded once. Port 0 binds a free port (`port` says
    which). `serve_forever()` serves in this thread (the CLI), `start()` in a background one (a test); `close()`
    stops it and frees the port. Also a context manager: `with DemoServer(...).start() as server: ...`."""

    def __init__(self, model_dir: str, detokenizer_dir: str, host: str = "127.0.0.1", port: int = 7860,
                 max_new_tokens: int = 64, min_new_tokens: int = 0):
        if max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1; got {max_new_tokens}")
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"--min-new-tokens must be between 0 and --max-new-tokens ({max_new_tokens}); got "
                             f"{min_new_tokens}")
        try:
            self.httpd = ThreadingHTTPServer((host, port), _Handler)
        except OSError as error:
            raise RuntimeError(f"cannot listen on {host}:{port} ({error.strerror or error}); give another --port "
                               "(0: any free one) or --host") from error
        self.httpd.demo = self
        try:
            self.answerer = Answerer(model_dir)
            self.speaker = load_detokenizer(detokenizer_dir)
        except BaseException:
            self.httpd.server_close()
            raise
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.httpd.server_address[0]

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.host
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}/"

    def respond(self, data: bytes, name: str = "the question") -> dict:
        """POST /answer's JSON for the question's audio bytes; an AudioError (HTTP 400) for bad audio."""
        samples = decode_audio(data, name)
        with self._lock:
            start = time.perf_counter()
            result = self.answerer.answer(samples, mode="s2m", max_new_tokens=self.max_new_tokens,
                                          min_new_tokens=self.min_new_tokens)
            speech = self.speaker.synthesize(result["speech_tokens"])
            seconds = time.perf_counter() - start
        log.info("answered %.1f s of audio in %.1f s: %r, %d units", len(samples) / SAMPLE_RATE, seconds,
                 result["text"], len(result["speech_tokens"]))
        audio = base64.b64encode(encode_wav(speech, self.speaker.sample_rate)).decode("ascii") if len(speech) else None
        return {"text": result["text"], "speech_tokens": result["speech_tokens"], "audio": audio,
                "sample_rate": self.speaker.sample_rate, "question_seconds": round(len(samples) / SAMPLE_RATE, 3),
                "answer_seconds": round(seconds, 3)}

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start(self) -> DemoServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, name="fac-demo", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving (the background thread, if `start` began one) and free the port."""
        if self._thread is not None:
            self.httpd.shutdown()  # waits for serve_forever to return
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> DemoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(model_dir: str, detokenizer_dir: str, host: str = "127.0.0.1", port: int = 7860,
          max_new_tokens: int = 64, min_new_tokens: int = 0) -> None:
    """`fac demo`: serve until interrupted (Ctrl-C)."""
    server = DemoServer(model_dir, detokenizer_dir, host, port, max_new_tokens, min_new_tokens)
    print(f"fac demo: {server.url} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "fac-demo"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if urllib.parse.urlsplit(self.path).path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.encode("utf-8"), "text/html; charset=utf-8")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: no such page; the demo is at /"})

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/answer":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"{self.path}: nothing to post to; POST a wav to /answer"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "the request has no Content-Length; POST the wav's "
                                                             "bytes as the body"})
            return
        if int(length) > MAX_UPLOAD_BYTES:
            self.close_connection = True  # the body is not read: the connection cannot carry another request
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                       {"error": f"the question is {int(length)} bytes, over {MAX_UPLOAD_BYTES} bytes; expected a "
                                 "clip of speech of a few seconds"})
            return
        data = self.rfile.read(int(length))
        name = urllib.parse.unquote(self.headers.get("X-File-Name", "")).strip() or "the question"
        try:
            result = self.server.demo.respond(data, name)
        except AudioError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except Exception as error:  # the page shows it; the server goes on with the next question
            log.exception("answering %s failed", name)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"answering {name} failed: "
                                                                   f"{type(error).__name__}: {error}"})
        else:
            self._json(HTTPStatus.OK, result)

    def _json(self, status: HTTPStatus, body: dict) -> None:
        self._send(status, json.dumps(body).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fac demo: talk to the model</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin: 1rem 0; padding: 0.8rem 1rem; }
  button { font-size: 1rem; padding: 0.4rem 1rem; margin-right: 0.5rem; }
  audio { display: block; width: 100%; margin-top: 0.5rem; }
  #error { color: #b00020; white-space: pre-wrap; }
  #error:empty, #question-audio:not([src]) { display: none; }
  #status { color: #555; min-height: 1.2em; }
  #answer-text { font-size: 1.2rem; font-weight: 600; min-height: 1.4em; }
  #answer-text:empty::before { content: "(no words)"; color: #999; font-weight: normal; }
</style>
</head>
<body>
<h1>Talk to the model</h1>
<p>Ask a spoken question: choose a wav file or record one, then Ask. The model answers in text and speech.</p>
<fieldset>
  <legend>Question</legend>
  <label>A wav file: <input type="file" id="question-file" accept="audio/wav,audio/x-wav,.wav"></label>
  <p>or <button type="button" id="record">Record</button></p>
  <audio id="question-audio" controls></audio>
  <p><button type="button" id="ask" disabled>Ask</button></p>
</fieldset>
<p id="status" data-state="idle"></p>
<p id="error" role="alert"></p>
<fieldset>
  <legend>Answer</legend>
  <p id="answer-text"></p>
  <p>Speech units: <span id="answer-units">-</span></p>
  <audio id="answer-audio" controls></audio>
</fieldset>
<script>
"use strict";
const RATE = 16000;
const $ = (id) => document.getElementById(id);
let question = null;  // {blob, name}: what Ask sends
let recorder = null;

function status(text, state) { $("status").textContent = text; $("status").dataset.state = state; }
function showError(text) { $("error").textContent = text; status("", "error"); }
function clearError() { $("error").textContent = ""; }
function setQuestion(blob, name) {
  question = {blob, name};
  const player = $("question-audio");
  if (player.src.startsWith("blob:")) URL.revokeObjectURL(player.src);
  player.src = URL.createObjectURL(blob);
  $("ask").disabled = false;
}

// 16-bit PCM mono wav of float samples in [-1, 1].
function encodeWav(samples, rate) {
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * samples.length, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return view.buffer;
}

// Any audio the browser decodes (the recorder's webm/ogg) -> a 16 kHz mono wav.
async function toWav16k(encoded) {
  const context = new AudioContext();
  let decoded;
  try { decoded = await context.decodeAudioData(encoded); } finally { context.close(); }
  const offline = new OfflineAudioContext(1, Math.max(1, Math.ceil(decoded.duration * RATE)), RATE);
  const source = offline.createBufferSource();
  source.buffer = decoded;  // a stereo recording is mixed down into the one channel
  source.connect(offline.destination);
  source.start();
  const rendered = await offline.startRendering();
  return encodeWav(rendered.getChannelData(0), RATE);
}

$("question-file").addEventListener("change", () => {
  clearError();
  const file = $("question-file").files[0];
  if (file) { setQuestion(file, file.name); status("question: " + file.name, "ready"); }
});

$("record").addEventListener("click", async () => {
  if (recorder) { recorder.stop(); return; }
  clearError();
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError("this browser cannot record here (recording needs the page on http://127.0.0.1 or localhost); " +
              "choose a wav file instead");
    return;
  }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({audio: true}); } catch (error) {
    showError("no microphone: " + error.message + "; choose a wav file instead");
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (event) => { if (event.data.size) chunks.push(event.data); });
  recorder.addEventListener("stop", async () => {
    stream.getTracks().forEach((track) => track.stop());
    const type = recorder.mimeType;
    recorder = null;
    $("record").textContent = "Record";
    try {
      const wav = await toWav16k(await new Blob(chunks, {type}).arrayBuffer());
      setQuestion(new Blob([wav], {type: "audio/wav"}), "the recording");
      status("recorded " + ((wav.byteLength - 44) / 2 / RATE).toFixed(1) + " s", "ready");
    } catch (error) {
      showError("the recording could not be decoded: " + error.message);
    }
  });
  recorder.start();
  $("record").textContent = "Stop";
  status("recording... click Stop to end", "recording");
});

$("ask").addEventListener("click", async () => {
  if (!question) { showError("choose a wav file or record a question first"); return; }
  clearError();
  $("ask").disabled = true;
  $("answer-text").textContent = "";  // no earlier answer left beside this question
  $("answer-units").textContent = "-";
  $("answer-audio").removeAttribute("src");
  $("answer-audio").load();
  status("asking...", "asking");
  try {
    let response, body;
    try {
      response = await fetch("answer", {method: "POST", body: question.blob,
        headers: {"Content-Type": "audio/wav", "X-File-Name": encodeURIComponent(question.name)}});
    } catch (error) { showError("the demo server did not answer: " + error.message); return; }
    try { body = await response.json(); } catch (error) { showError("HTTP " + response.status); return; }
    if (!response.ok) { showError(body.error || ("HTTP " + response.status)); return; }
    $("answer-text").textContent = body.text;
    $("answer-units").textContent = String(body.speech_tokens.length);
    const player = $("answer-audio");
    if (body.audio) {
      player.src = "data:audio/wav;base64," + body.audio;
      player.play().catch(() => {});  // a browser that blocks autoplay leaves the controls to the listener
      status("answered in " + body.answer_seconds.toFixed(1) + " s", "answered");
    } else {
      status("answered in " + body.answer_seconds.toFixed(1) + " s, with no speech units to speak", "answered");
    }
  } finally {
    $("ask").disabled = false;
  }
});
</script>
</body>
</html>
"""
