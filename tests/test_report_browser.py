"""The report as a person's browser shows it (headless Chromium, tests/browser.py): the micro experiment's
report.html plays its spoken answers (every <audio> loads, has a duration and decodes to sound that is not silence)
and shows its images (each decodes to a picture of some size)."""
import json

from browser import audio_report, chrome, image_sizes

_LOADED = """
const done = arguments[arguments.length - 1];
const audios = Array.from(document.querySelectorAll("audio"));
audios.forEach((audio, i) => { audio.id = "audio-" + i; });
Promise.all(audios.map((audio) => new Promise((resolve) => {
  if (audio.readyState >= 1) { resolve(); return; }
  audio.addEventListener("loadedmetadata", resolve, {once: true});
  audio.addEventListener("error", resolve, {once: true});
  audio.load();
}))).then(() => done(audios.map((audio) => ({title: audio.title, duration: audio.duration,
                                             error: audio.error && audio.error.code}))));
"""


def test_the_report_plays_each_spoken_answer_and_shows_its_figures_in_chromium(micro_run):
    results = micro_run / "results/micro"
    examples = json.loads((results / "eval/examples/stage2.json").read_text())
    with chrome() as driver:
        driver.get((results / "report.html").as_uri())
        assert "Spoken answers" in driver.find_element("tag name", "body").text
        audios = driver.execute_async_script(_LOADED)
        titles = [a["title"] for a in audios]
        # two questions of each of the two test sets: the question's and the reference answer's recordings, and
        # every stage's spoken answer that has units
        assert titles.count("question") == titles.count("reference answer") == 4
        shown = examples[0:2] + examples[3:5]  # the first two of each set (the report's QUESTIONS_PER_SET)
        assert titles.count("stage2 spoken answer") == sum(bool(e["units"]) for e in shown)
        for index, audio in enumerate(audios):
            assert audio["error"] is None and audio["duration"] > 0, audio
            decoded = audio_report(driver, f"#audio-{index}")
            assert decoded["duration"] > 0.03 and decoded["peak"] > 0.01, (audio["title"], decoded)
        images = image_sizes(driver)
        assert sum(i["alt"].startswith("mels: ") for i in images) == 4
        assert all(i["width"] > 50 and i["height"] > 50 for i in images), images
