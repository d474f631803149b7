"""Look at an HTML report the way a person does: in headless Chromium.

``check_report(report, screenshot)`` loads an instrumented copy of the report (a script at the top of ``<head>``
records script errors, failed loads and ``console.error`` calls; one at the end of ``<body>`` measures every
image once the page has loaded), reads the measurements back from the DOM Chromium dumps, and saves a screenshot
of the page as it is. Chromium is a separate program (``apt-get install chromium``); :func:`find_chromium`
returns None where it is absent.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
WINDOW = (1400, 2400)

RECORD_ERRORS = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  var failed = t && t !== window && t.tagName;
  window.__errors.push(failed ? "failed to load " + t.tagName.toLowerCase() : String(e.message));
}, true);
(function () { var original = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); }; })();
</script>"""

MEASURE = """<script>
window.addEventListener("load", function () {
  var images = [];
  document.querySelectorAll("img").forEach(function (img) {
    var box = img.getBoundingClientRect(), view = img.closest(".prompt-view");
    images.push({alt: img.alt, natural: [img.naturalWidth, img.naturalHeight], shown: [box.width, box.height],
                 complete: img.complete, in_prompt_view: !!view,
                 prompt_shown: view ? view.classList.contains("shown") : null,
                 container: img.parentElement.getBoundingClientRect().width});
  });
  var out = document.createElement("pre");
  out.id = "__report_check";
  out.textContent = JSON.stringify({errors: window.__errors, images: images, title: document.title});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or the one ``DIFFALIGN_CHROMIUM`` names; None if absent."""
    named = os.environ.get("DIFFALIGN_CHROMIUM")
    if named:
        return named if Path(named).is_file() else None
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


def _run(chromium: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="diffalign-chromium-") as profile:
        cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=10000", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def check_report(report: str | Path, screenshot: str | Path | None = None, chromium: str | None = None,
                 timeout: float = 120) -> dict[str, Any]:
    """{errors, images, title} of the report as Chromium renders it; writes ``screenshot`` (PNG) if given.

    ``images`` holds, for every ``<img>``: ``alt``, ``natural`` [w, h], ``shown`` [w, h] (CSS pixels),
    ``complete``, ``in_prompt_view`` / ``prompt_shown`` (the per-prompt view shows one prompt at a time) and
    ``container`` (the parent's width, which caps an image's shown width).
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("Chromium not found: install it (apt-get install chromium) or set DIFFALIGN_CHROMIUM")
    report = Path(report).resolve()
    text = report.read_text(encoding="utf-8")
    if "<head>" not in text or "</body>" not in text:
        raise ValueError(f"{report}: no <head> or </body>: not a diffalign report")
    probe = report.with_name(f".check-{report.name}")
    probe.write_text(text.replace("<head>", "<head>\n" + RECORD_ERRORS, 1).replace("</body>", MEASURE + "</body>", 1),
                     encoding="utf-8")
    try:
        done = _run(chromium, ["--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(r'<pre id="__report_check">(.*?)</pre>', done.stdout, re.S)
    if found is None:
        raise RuntimeError(f"Chromium did not render {report} (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(html.unescape(found.group(1)))
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        shot = _run(chromium, [f"--screenshot={screenshot}", report.as_uri()], timeout)
        if not screenshot.is_file():
            raise RuntimeError(f"Chromium wrote no screenshot of {report} (exit {shot.returncode}): "
                               f"{shot.stderr[-2000:]}")
    return result
