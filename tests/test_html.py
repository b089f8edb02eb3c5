"""report.html: one self-contained page (no network, pictures inlined), checked in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from robustcnn.html import render_html
from robustcnn.plots import save_grid
from robustcnn.report import ReportRequest, run_report, write_report

SECTIONS = ("summary", "model", "curve", "results", "eps-0", "eps-1", "eps-2", "other", "warnings", "gallery")


@pytest.fixture(scope="module")
def report_dir(trained, tmp_path_factory):
    """A real report of the tiny fixture model: three budgets, two attacks, every file written (report.html too)."""
    model, x, y = trained
    x, y = x[:24], y[:24]
    out = tmp_path_factory.mktemp("html") / "rep"
    request = ReportRequest(suite=None, attacks=["fgsm", "pgd"], eps=[0.0, 0.15, 0.3], norm="linf", n=len(y), seed=0,
                            checkpoint_sha256="ab" * 32, dataset="blobs <&>")
    doc, gallery = run_report(model, x, y, request, out, device=torch.device("cpu"), batch_size=32)
    doc["model"] = {"source": "tests/conftest.py TinyCNN", "dataset": "blobs"}
    classes = ["q0", "q1", "q2", "q3"]
    idx, x_adv = gallery
    write_report(out, doc, classes=classes,
                 gallery=lambda p: save_grid(p, x[idx], x_adv, y[idx], model, classes, torch.device("cpu")))
    return out, doc


def test_page_is_self_contained_and_complete(report_dir):
    out, doc = report_dir
    page = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f'id="{section}"' in page, section
    assert page.count('src="data:image/png;base64,') == 2  # the curve and the gallery, inlined
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<script" not in page and "http" not in page
    assert "blobs &lt;&amp;&gt;" in page and "blobs <&>" not in page  # user text is escaped
    for r in doc["results"]:
        assert f"eps = {r['eps']:g}" in page
        for st in r["attacks"]:
            assert f"{st['seconds']:.1f} s" in page
    # the page is the same whether drawn from the document in memory (NaN) or from report.json (null)
    assert render_html(json.loads((out / "report.json").read_text()), out) == page


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing under CI (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    return found


def _browse(tmp_path, page, *args):
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


#: Added to a copy of the page for the test only: after loading, the DOM records every script error and how many
#: images decoded (the product page itself has no script).
PROBE = """<script>
var errors = [];
window.addEventListener('error', function (e) { errors.push(String(e.message)); });
window.addEventListener('load', function () {
  var ok = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  var d = document.createElement('div'); d.id = 'probe';
  d.textContent = 'images-decoded=' + ok.length + ';errors=' + errors.length; document.body.appendChild(d);
});
</script>"""


def test_every_section_renders_in_a_headless_browser(report_dir, tmp_path):
    out, _ = report_dir
    probed = tmp_path / "probed.html"
    probed.write_text((out / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    run = _browse(tmp_path, probed, "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    assert "images-decoded=2;errors=0" in dom, dom[-500:]
    assert "Uncaught" not in run.stderr and "ERROR:CONSOLE" not in run.stderr
    shot = tmp_path / "report.png"
    run = _browse(tmp_path, out / "report.html", f"--screenshot={shot}", "--window-size=1200,2600",
                  "--hide-scrollbars")
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
    assert "Uncaught" not in run.stderr and "ERROR:CONSOLE" not in run.stderr
    if os.environ.get("ROBUSTCNN_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["ROBUSTCNN_KEEP_SCREENSHOT"])
