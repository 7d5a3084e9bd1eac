"""Headless Chromium for the tests that check a page as a person's browser shows it (the demo page, the report's
images): Debian's chromium and chromium-driver (`make browser`) driven by selenium, with the driver's path given, so
that Selenium Manager looks nothing up and downloads nothing. A machine without them fails the test, naming
`make browser`: a browser test that skipped would pass without having looked at anything."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required")
# A microphone that needs no one to allow it: Chromium's fake capture device (a beep every second) for getUserMedia.
FAKE_MICROPHONE = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")


@contextlib.contextmanager
def chrome(*arguments: str, script_timeout: float = 60):
    """A selenium webdriver.Chrome on headless Chromium (ARGUMENTS, then `arguments`), quit on exit."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `make browser` installs Debian's chromium and "
                    "chromium-driver (the browser tests need them)", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        pytest.fail(f"selenium is not installed ({error}): `make setup` installs requirements.txt", pytrace=False)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager, should it run at all, downloads nothing
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (*ARGUMENTS, *arguments):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_script_timeout(script_timeout)
        yield driver
    finally:
        driver.quit()


_AUDIO_REPORT = """
const [css, done] = arguments;
const element = document.querySelector(css);
if (!element) { done({error: "no element matches " + css}); return; }
const src = element.currentSrc || element.src;
if (!src) { done({error: css + " has no src"}); return; }
const context = new AudioContext();
fetch(src)
  .then((response) => response.arrayBuffer())
  .then((encoded) => context.decodeAudioData(encoded))
  .then((buffer) => {
    let peak = 0;
    for (let c = 0; c < buffer.numberOfChannels; c++) {
      const samples = buffer.getChannelData(c);
      for (let i = 0; i < samples.length; i++) peak = Math.max(peak, Math.abs(samples[i]));
    }
    done({duration: buffer.duration, peak: peak, channels: buffer.numberOfChannels, src_chars: src.length});
  })
  .catch((error) => done({error: css + ": the browser cannot decode its audio: " + error}))
  .finally(() => context.close());
"""


def audio_report(driver, element_css: str) -> dict:
    """The audio of the page's `element_css` element (its src) as the browser decodes it (decodeAudioData):
    {duration (seconds), peak (max abs sample), channels, src_chars}; fails the test when it does not decode."""
    report = driver.execute_async_script(_AUDIO_REPORT, element_css)
    if "error" in report:
        raise AssertionError(report["error"])
    return report


_IMAGE_SIZES = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
Promise.all(images.map((image) => image.decode().catch(() => null))).then(() => done(images.map((image) => ({
  src: (image.currentSrc || image.src).slice(0, 80), alt: image.alt,
  width: image.naturalWidth, height: image.naturalHeight, complete: image.complete}))));
"""


def image_sizes(driver) -> list[dict]:
    """Every <img> of the page once the browser has decoded it (or given up): {src (its first 80 characters),
    alt, width, height (naturalWidth/naturalHeight: 0 for an image that did not decode), complete}."""
    return driver.execute_async_script(_IMAGE_SIZES)
