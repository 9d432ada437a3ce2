"""stage=serve's page in a real browser (headless Chromium driven by Selenium), its endpoints and bad input.

One run for the module: the session's digits run (stage=all, so eval/failures.json is there) copied, with
a flat index; the service runs in this process (uvicorn in a thread on a free port of 127.0.0.1). The
browser and the screenshots go through tools/screenshot_page.py, so the tool is tested too. Without
Chromium, chromedriver or selenium the browser tests skip and say which is missing."""
import http.client
import importlib.util
import json
import logging
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from conftest import REPO, SMALL, run_pipeline
from PIL import Image

from pipeline.config import load_config
from pipeline.data.shards import ShardIndex
from pipeline.run_context import RunContext
from pipeline.search.searcher import Searcher
from pipeline.search.server import MAX_K, create_app
from pipeline.stages import serve

spec = importlib.util.spec_from_file_location("screenshot_page", REPO / "tools" / "screenshot_page.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

K = 6
MISSING = tool.browser_missing()
needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"no headless browser: {MISSING}")
MAX_BYTES = 100_000  # a body over it gets 413


@pytest.fixture(scope="module")
def run(digits_run, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("page") / "run"
    shutil.copytree(digits_run, run_dir, ignore=shutil.ignore_patterns(".lock", "tb"))
    run_pipeline("stage=index", f"run_dir={run_dir}", *SMALL, "index.kind=flat")
    return run_dir


@pytest.fixture(scope="module")
def searcher(run) -> Searcher:
    return Searcher(run)


@pytest.fixture(scope="module")
def url(searcher) -> str:
    with tool.serving(create_app(searcher, k=K, max_bytes=MAX_BYTES)) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    with tool.chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def gallery(searcher) -> ShardIndex:
    return ShardIndex.load(searcher.gallery)


def exact_top(run: Path, row: int, k: int) -> list[str]:
    """The gallery keys nearest to gallery item `row`, by numpy over the index's stored vectors."""
    vectors = np.load(run / "index" / "vectors.npy")
    with np.load(run / "index" / "items.npz") as items:
        keys = items["keys"]
    return [str(keys[j]) for j in np.argsort(-(vectors @ vectors[row]), kind="stable")[:k]]


def request(url: str, method: str, path: str, body: bytes | None = None, content_type: str | None = None):
    """(status, headers, body) of one request whose path goes out exactly as written (no normalising)."""
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


# --- in the browser ------------------------------------------------------------------------------


@needs_browser
def test_an_uploaded_gallery_image_comes_first_and_a_click_searches_from_a_result(browser, url, run, gallery, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    row = 5
    results = tool.upload(browser, url, tool.gallery_image(gallery.folder, row, tmp_path), K)
    assert browser.title == "Retrieval search" and "896 items, flat index" in browser.find_element(By.ID, "health").text
    keys = [r.get_attribute("data-key") for r in results]
    assert len(keys) == K and keys == exact_top(run, row, K) and keys[0] == gallery.keys[row]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .result img")) == K  # thumbnails, loaded (upload waits)

    results[2].click()  # search again, from the third result
    WebDriverWait(browser, tool.WAIT_S).until(lambda d: d.find_element(By.ID, "query").get_attribute("data-key") == keys[2])
    tool.wait_for(browser, "search-status")
    WebDriverWait(browser, tool.WAIT_S).until(tool.images_loaded)
    again = [r.get_attribute("data-key") for r in browser.find_elements(By.CSS_SELECTOR, "#results .result")]
    assert again == exact_top(run, gallery.keys.index(keys[2]), K) and again[0] == keys[2]
    same = [r.get_attribute("data-label") == str(gallery.labels[gallery.keys.index(keys[2])]) for r in
            browser.find_elements(By.CSS_SELECTOR, "#results .result")]
    framed = [("same" in r.get_attribute("class")) for r in browser.find_elements(By.CSS_SELECTOR, "#results .result")]
    assert framed == same  # green for the query's class, red otherwise


@needs_browser
def test_the_failures_view_shows_wrong_top1s_worst_first(browser, url, run):
    from selenium.webdriver.common.by import By

    rows = tool.show_failures(browser)
    listing = json.loads((run / "eval" / "failures.json").read_text())
    assert listing["wrong"] > 0 and len(rows) == min(20, len(listing["failures"]))
    for row, failure in zip(rows[:3], listing["failures"]):
        query, wrong = (row.find_element(By.CSS_SELECTOR, f"figure.{kind}") for kind in ("query", "wrong"))
        assert (query.get_attribute("data-key"), wrong.get_attribute("data-key")) == (failure["query"]["key"],
                                                                                      failure["top1"]["key"])
        assert query.get_attribute("data-label") != wrong.get_attribute("data-label")
        if failure["first_correct"]:
            right = row.find_element(By.CSS_SELECTOR, "figure.right")
            assert right.get_attribute("data-label") == query.get_attribute("data-label")
            assert f"rank {failure['first_correct']['rank']}" in right.text
    rows[0].find_element(By.CSS_SELECTOR, "figure.query").click()  # the query is a gallery item: search from it
    tool.wait_for(browser, "search-status")
    assert browser.find_element(By.ID, "query").get_attribute("data-key") == listing["failures"][0]["query"]["key"]


@needs_browser
def test_the_screenshot_tool_saves_both_views(browser, url, gallery, tmp_path):
    shots = tool.screenshots(browser, url, tool.gallery_image(gallery.folder, 0, tmp_path), tmp_path / "docs", K)
    assert [p.name for p in shots] == ["page_search.png", "page_failures.png"]
    for path in shots:
        with Image.open(path) as image:
            assert image.size[0] >= 800 and len(set(image.convert("L").getdata())) > 10  # drawn, not blank


# --- the endpoints, without a browser -------------------------------------------------------------


def test_the_page_images_and_search_by_key(url, run, gallery):
    status, headers, html = request(url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'src="page.js"' in html
    assert "default-src 'self'" in headers["content-security-policy"]
    for name, media in (("page.js", "text/javascript"), ("page.css", "text/css")):
        status, headers, _ = request(url, "GET", f"/{name}")
        assert status == 200 and headers["content-type"].startswith(media)
    key = gallery.keys[7]
    status, headers, data = request(url, "GET", f"/image/{quote(key)}")
    assert status == 200 and headers["content-type"] == "image/png" and data == gallery.image_bytes(7)
    train = ShardIndex.load(run / "shards" / "train")  # the run's other splits, by name: the failures view's
    assert request(url, "GET", f"/image/{train.keys[0]}?split=train")[2] == train.image_bytes(0)
    assert request(url, "GET", f"/image/{train.keys[0]}")[0] == 404  # not in the index's gallery
    status, _, body = request(url, "GET", f"/search/by_key?key={quote(key)}&k={K}")
    answer = json.loads(body)
    assert status == 200 and answer["query"]["key"] == key and answer["query"]["label"] == int(gallery.labels[7])
    assert [r["key"] for r in answer["results"]] == exact_top(run, 7, K)
    status, _, body = request(url, "POST", f"/search?k={K}", gallery.image_bytes(7), "image/png")  # the same, uploaded
    uploaded = json.loads(body)["results"]
    assert [r["key"] for r in uploaded] == [r["key"] for r in answer["results"]]
    np.testing.assert_allclose([r["score"] for r in uploaded], [r["score"] for r in answer["results"]], atol=1e-5)


def test_bad_requests_get_their_status_and_the_service_keeps_serving(url, gallery):
    key, good = gallery.keys[3], gallery.image_bytes(3)
    bad = [("POST", f"/search?k={MAX_K + 1}", good, "image/png", 400, f"k={MAX_K + 1}"),
           ("POST", "/search?k=0", good, "image/png", 400, "k=0"),
           ("POST", "/search?k=ten", good, "image/png", 400, "k"),
           ("POST", "/search", b"\0" * (MAX_BYTES + 1), "image/png", 413, f"over {MAX_BYTES} bytes"),
           ("POST", "/search", b"hello, world", "image/png", 400, "not an image"),
           ("POST", "/search", good, "text/plain", 415, "Content-Type"),
           ("GET", f"/search/by_key?key={key}&k={MAX_K + 1}", None, None, 400, f"k={MAX_K + 1}"),
           ("GET", "/search/by_key", None, None, 400, "key"),
           ("GET", "/search/by_key?key=nope", None, None, 404, "'nope' is not in the index"),
           ("GET", "/image/nope", None, None, 404, "no image 'nope'"),
           ("GET", "/failures?limit=1000", None, None, 400, "limit"),
           # nothing outside the index and the run's shards: traversal attempts, other files of the run
           ("GET", "/image/../config.yaml", None, None, 404, ""),
           ("GET", "/image/..%2F..%2Fconfig.yaml", None, None, 404, ""),
           ("GET", "/image/%2e%2e/%2e%2e/index/vectors.npy", None, None, 404, ""),
           ("GET", f"/image/{key}?split=..", None, None, 404, ""),
           ("GET", f"/image/{key}?split=../shards/test", None, None, 404, ""),
           ("GET", f"/image/{key}?split=%2Fetc", None, None, 404, ""),
           ("GET", "/../../etc/passwd", None, None, 404, ""),
           ("GET", "/config.yaml", None, None, 404, ""),
           ("GET", "/index/vectors.npy", None, None, 404, ""),
           ("GET", "/page/../../run.py", None, None, 404, "")]
    for method, path, body, content_type, status, says in bad:
        got, _, answer = request(url, method, path, body, content_type)
        assert got == status, (path, answer[:200])
        message = json.loads(answer)
        assert set(message) == {"error"} and "\n" not in message["error"] and says in message["error"], path
        got, _, answer = request(url, "POST", f"/search?k={K}", good, "image/png")  # still serving
        assert got == 200 and json.loads(answer)["results"][0]["key"] == key, path


# --- where it listens ----------------------------------------------------------------------------


def test_serve_listens_on_loopback_unless_told_and_warns_when_told(run, monkeypatch, caplog):
    listened = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, host, port, **_: listened.append(host))
    assert load_config([]).serve.host == "127.0.0.1"
    for host in ("127.0.0.1", "0.0.0.0"):
        cfg = load_config([f"run_dir={run}", *SMALL, f"serve.host={host}", "serve.port=0"])
        with caplog.at_level(logging.INFO):
            serve.run(cfg, RunContext.resolve(cfg))
    assert listened == ["127.0.0.1", "0.0.0.0"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("serve.host=0.0.0.0 is not this machine's loopback")
    assert [serve.is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost")] == [True] * 4
    assert [serve.is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org")] == [False] * 4
