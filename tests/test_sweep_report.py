"""The sweep report: three plots and a self-contained page whose table sorts by column in a
real headless browser (Debian's chromium through chromium-driver, driven by Selenium)."""

from __future__ import annotations

import base64
import re
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image

from compressor.sweep import results_schema_errors
from compressor.sweep_report import (
    ACCURACY_PNG,
    PARETO_PNG,
    REPORT_HTML,
    RUNTIME_PNG,
    series_name,
    write_report,
)


def _trial(key, method, ratio, accuracy, speedup1, speedup64, pareto=(), options=None):
    return {
        "key": key, "method": method, "ratio": ratio, "speedup_target": None,
        "options": options or {}, "status": "done", "quality": accuracy,
        "quality_metric": "accuracy", "accuracy": accuracy, "reference_accuracy": 0.90,
        "accuracy_delta": accuracy - 0.90, "agreement": min(1.0, accuracy + 0.05),
        "macs": int(1e6 * ratio), "params": int(2e5 * ratio), "file_bytes": int(8e5 * ratio),
        "macs_ratio": ratio, "params_ratio": ratio, "size_ratio": ratio,
        "latency_ms": {"1": {"p50_ms": 0.1 / speedup1}, "64": {"p50_ms": 2.0 / speedup64}},
        "reference_latency_ms": {"1": {"p50_ms": 0.1}, "64": {"p50_ms": 2.0}},
        "speedup": {"1": speedup1, "64": speedup64}, "pareto": list(pareto),
        "trial_seconds": 3.0, "timing_seconds": 1.0,
        "command": f"compressor compress m.pt --method {method} --ratio {ratio} -o {key}.onnx",
        "evaluate_command": f"compressor evaluate {key}.onnx --reference m.pt",
    }


@pytest.fixture
def results():
    trials = [
        _trial("svd-ratio0.75", "svd", 0.75, 0.895, 1.2, 1.3, pareto=(1,)),
        _trial("svd-ratio0.5", "svd", 0.5, 0.880, 1.5, 1.8, pareto=(1, 64)),
        _trial("prune-ratio0.5-criterion=l1", "prune", 0.5, 0.850, 1.1, 1.6,
               options={"criterion": "l1"}),
        {
            "key": "prune-ratio0.5-criterion=bogus", "method": "prune", "ratio": 0.5,
            "speedup_target": None, "options": {"criterion": "bogus"}, "status": "failed",
            "failed_phase": "compress", "error": "unknown --criterion 'bogus' <b>not bold</b>",
            "error_type": "OptionError", "pareto": [], "trial_seconds": 0.5,
            "command": "compressor compress m.pt --method prune --criterion bogus -o x.onnx",
        },
    ]
    return {
        "sweep": {"model": "models/checkpoints/mlp.pt", "arch": "mlp",
                  "methods": ["svd", "prune"], "ratios": [0.75, 0.5], "speedups": [],
                  "options": {"criterion": ["l1", "bogus"]}, "data": "calib.npz",
                  "eval_data": "eval.npz", "eval_limit": None, "calib_samples": 64,
                  "batch_sizes": [1, 64], "threads": None, "latency_min_time_s": 1.0},
        "run": {"executor": "ray", "workers": 2, "ray_version": "2.60.0", "seconds": 42.0},
        "machine": {"cpu": "test CPU", "usable_cores": 2, "onnxruntime": "1.x",
                    "provider": "cpu"},
        "timing": "Latency was timed one trial at a time.",
        "notes": [],
        "counts": {"trials": 4, "done": 3, "failed": 1, "compressed": 0},
        "original": {"accuracy": 0.90, "quality": 0.90, "macs": 1_000_000, "params": 200_000,
                     "file_bytes": 800_000, "latency_p50_ms": {"1": 0.1, "64": 2.0}},
        "pareto": {"1": ["svd-ratio0.75", "svd-ratio0.5", "original"],
                   "64": ["svd-ratio0.5", "original"]},
        "trials": trials,
    }


class _Rows(HTMLParser):
    """The trial table's rows: (data-key, classes), and every img src."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, set[str]]] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-key" in attrs:
            self.rows.append((attrs["data-key"], set((attrs.get("class") or "").split())))
        if tag == "img":
            self.images.append(attrs["src"])


def test_the_synthetic_results_follow_the_schema(results):
    assert results_schema_errors(results) == []


def test_report_is_one_self_contained_page(results, tmp_path):
    page = write_report(results, tmp_path)
    assert page == tmp_path / REPORT_HTML
    text = page.read_text()
    parser = _Rows()
    parser.feed(text)
    # the three plots, embedded byte for byte, and nothing fetched from anywhere
    assert len(parser.images) == 3
    for src, name in zip(parser.images, (PARETO_PNG, ACCURACY_PNG, RUNTIME_PNG), strict=True):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]) == (tmp_path / name).read_bytes()
        with Image.open(tmp_path / name) as image:
            assert image.width > 400 and image.height > 300
    assert not re.search(r"""(src|href)=["']?(https?:)?//|<link|@import|url\(""", text)
    # markup in an error message is shown as text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text and "<b>not bold</b>" not in text
    assert "Latency was timed one trial at a time." in text


def test_front_rows_are_highlighted_and_each_trial_has_its_command(results, tmp_path):
    text = write_report(results, tmp_path).read_text()
    parser = _Rows()
    parser.feed(text)
    classes = dict(parser.rows)
    assert list(classes) == ["original", *(t["key"] for t in results["trials"])]
    front = {k for k, c in classes.items() if "front" in c}
    assert front == {"original", "svd-ratio0.75", "svd-ratio0.5"}
    assert "failed" in classes["prune-ratio0.5-criterion=bogus"]
    for trial in results["trials"]:
        assert trial["command"].replace("'", "&#x27;") in text


def test_series_are_methods_with_their_options(results):
    assert [series_name(t) for t in results["trials"]] == [
        "svd", "svd", "prune criterion=l1", "prune criterion=bogus"]


def test_report_of_a_sweep_without_any_timed_trial(results, tmp_path):
    results["trials"] = results["trials"][3:]  # the failed one only
    results["pareto"] = {"1": ["original"], "64": ["original"]}
    write_report(results, tmp_path)
    for name in (PARETO_PNG, ACCURACY_PNG, RUNTIME_PNG, REPORT_HTML):
        assert (tmp_path / name).stat().st_size > 0


# ----------------------------------------------------------------------------- in a browser


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if shutil.which("apt-get"):
            pytest.fail("chromium or chromedriver is missing: `make browser` installs Debian's "
                        "chromium and chromium-driver (make test does it first)")
        pytest.skip("no chromium and no apt-get to install it: the report is not opened in "
                    "a browser here")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def _order(browser) -> list[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#trials tbody tr'))"
        ".map(function (r) { return r.dataset.key; });")


def _click(browser, header: str) -> None:
    from selenium.webdriver.common.by import By

    cells = browser.find_elements(By.CSS_SELECTOR, "#trials thead th")
    (cell,) = [c for c in cells if c.text.strip().rstrip("▲▼").strip() == header]
    cell.click()


def test_table_sorts_when_a_header_is_clicked(results, tmp_path, browser):
    page = write_report(results, tmp_path)
    browser.get(page.resolve().as_uri())
    assert _order(browser) == ["original", "svd-ratio0.75", "svd-ratio0.5",
                               "prune-ratio0.5-criterion=l1", "prune-ratio0.5-criterion=bogus"]
    # the plots decode and show
    widths = browser.execute_script(
        "return Array.from(document.images).map(function (i) { return i.naturalWidth; });")
    assert len(widths) == 3 and min(widths) > 400

    # accuracy, ascending then descending; the failed trial (no accuracy) stays last
    _click(browser, "accuracy")
    assert _order(browser) == ["prune-ratio0.5-criterion=l1", "svd-ratio0.5", "svd-ratio0.75",
                               "original", "prune-ratio0.5-criterion=bogus"]
    _click(browser, "accuracy")
    assert _order(browser) == ["original", "svd-ratio0.75", "svd-ratio0.5",
                               "prune-ratio0.5-criterion=l1", "prune-ratio0.5-criterion=bogus"]
    # numbers sort as numbers: speedups 1.0 (the original) < 1.3 < 1.6 < 1.8
    _click(browser, "speedup b64")
    assert _order(browser) == ["original", "svd-ratio0.75", "prune-ratio0.5-criterion=l1",
                               "svd-ratio0.5", "prune-ratio0.5-criterion=bogus"]
    # text columns sort as text
    _click(browser, "trial")
    assert _order(browser) == ["original", "prune-ratio0.5-criterion=bogus",
                               "prune-ratio0.5-criterion=l1", "svd-ratio0.5", "svd-ratio0.75"]

    # front rows look different from the others
    colour = browser.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#trials tbody tr'))"
        ".map(function (r) { return [r.dataset.key, getComputedStyle(r.cells[0])"
        ".backgroundColor]; }));")
    assert colour["svd-ratio0.5"] == colour["svd-ratio0.75"] != colour[
        "prune-ratio0.5-criterion=l1"]
