"""`recaption report`: statistics checked against a direct count, and the page checked in a
real headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""

import hashlib
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recaption.config import load_config
from recaption.pipeline import run
from recaption.report import write_report
from recaption.stats import DuplicateSample


@pytest.fixture(scope="module")
def corpus(ray_cluster, sample_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "corpus"
    cfg = load_config(
        "pipelines/default.yaml", [f"input.path={sample_shards}", f"output.path={out}"]
    )
    run(cfg, show_progress=False)
    write_report(out, sample=30)
    return out


def test_report_json_matches_a_direct_count(corpus):
    report = json.loads((corpus / "report" / "report.json").read_text())
    data = pq.read_table(corpus / "data").to_pylist()
    rejected = pq.read_table(corpus / "rejected").to_pylist()
    assert report["counts"] == {
        "samples": len(data) + len(rejected),
        "captioned": len(data),
        "rejected": len(rejected),
    }
    words = sorted(len(r["caption"].split()) for r in data)
    assert report["words"]["caption"]["mean"] == pytest.approx(sum(words) / len(words), abs=0.01)
    assert report["words"]["caption"]["median"] == words[(len(words) - 1) // 2]
    alt = [len((r["alt_text"] or "").split()) for r in data]
    assert report["words"]["alt_text"]["mean"] == pytest.approx(sum(alt) / len(alt), abs=0.01)
    assert report["rejections"]["by_reason"] == dict(Counter(r["reason"] for r in rejected))
    assert report["visible_text_share"] == pytest.approx(
        sum(bool(r["visible_text"]) for r in data) / len(data), abs=1e-4
    )
    by_caption: dict[str, set] = {}
    for r in data:
        by_caption.setdefault(r["caption"], set()).add(r["image_sha256"])
    repeated = sum(1 for r in data if len(by_caption[r["caption"]]) > 1)
    assert report["duplicate_captions"]["rate"] == pytest.approx(repeated / len(data), abs=1e-4)
    objects = Counter(o.lower() for r in data for o in r["objects"])
    item, n = report["top_objects"][0]
    assert n == objects[item] == max(objects.values())
    assert report["contact_sheet"] == {"shown": 30, "of": len(data)}
    assert len(list((corpus / "report" / "thumbs").glob("*.jpg"))) == 30
    assert sum(report["throughput"]["captions"].values()) == len(data)
    assert {"words.png", "rejections.png", "objects.png", "throughput.png"} <= {
        p.name for p in (corpus / "report").glob("*.png")
    }


def test_duplicate_rate_is_estimated_in_bounded_memory():
    rng = random.Random(0)
    sample = DuplicateSample(capacity=2000)
    for i in range(50_000):  # 30% of images share one of 500 stock captions
        caption = f"stock caption {rng.randrange(500)}" if rng.random() < 0.3 else f"unique {i}"
        sample.add(caption, hashlib.sha256(str(i).encode()).hexdigest())
    summary = sample.summary()
    assert len(sample.groups) <= 2000 and summary["sampled_share"] < 0.1
    assert summary["rate"] == pytest.approx(0.3, abs=0.05)


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver: `make browser` (as root) installs them",
)
def test_the_page_in_headless_chromium(corpus):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    report = json.loads((corpus / "report" / "report.json").read_text())
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get((corpus / "report" / "index.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        # every image (thumbnails and plots) loaded
        driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 30 + len(list((corpus / "report").glob("*.png")))
        every_loaded = (
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
        )
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(every_loaded))
        # the numbers on the page are report.json's
        stats = driver.find_elements(By.CSS_SELECTOR, "[data-stat]")
        assert len(stats) > 20
        for element in stats:
            value = report
            for part in element.get_attribute("data-stat").split("."):
                value = value[part]
            assert float(element.text.replace(",", "")) == pytest.approx(value, rel=1e-3)
        # the filter narrows the contact sheet to rows holding the word
        word = report["top_objects"][0][0].split()[0]
        driver.find_element(By.ID, "filter").send_keys(word)
        shown = [
            r
            for r in driver.find_elements(By.CSS_SELECTOR, "#sheet tr[data-text]")
            if r.is_displayed()
        ]
        assert 0 < len(shown) <= 30 and all(word in r.text.lower() for r in shown)
        assert driver.find_element(By.ID, "shown").text == f"{len(shown)} shown"
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
