"""Screenshots of stage=serve's page (docs/page_search.png, docs/page_failures.png), taken in headless
Chromium driven by Selenium, as tests/test_search_page.py drives it:

    python tools/screenshot_page.py --run-dir RUN [--out docs] [--k 10]

RUN is a run directory with index/ (stage=index) and eval/failures.json (stage=eval). The service runs
in this process (uvicorn in a thread on a free port of 127.0.0.1); the search view shows the results
for the gallery's first image uploaded, the failures view the worst wrong top-1s. Needs Debian's
`chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`) and `pip install selenium`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Without these, headless Chromium on a machine whose network is closed stalls on its background
# services (updates, sync, QUIC probes); the sandbox needs privileges a container lacks.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]
WAIT_S = 60


def browser_missing() -> str | None:
    """Why no headless browser can run here (what to install), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for name, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(name) is None:
            return f"{name} is not on PATH (apt-get install -y {package})"
    return None


@contextmanager
def chromium():
    """A headless Chromium (fresh profile) under Selenium, closed on exit."""
    from selenium import webdriver

    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
        try:
            yield driver
        finally:
            driver.quit()


@contextmanager
def serving(app):
    """`app` served by uvicorn in a thread on a free port of 127.0.0.1; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + WAIT_S
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the service did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=WAIT_S)


def wait_for(driver, element_id: str, state: str = "done"):
    """Wait until the page's status element `element_id` says `state` (page.js sets data-state)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    node = driver.find_element(By.ID, element_id)
    WebDriverWait(driver, WAIT_S).until(lambda _: node.get_attribute("data-state") in (state, "error"))
    if node.get_attribute("data-state") == "error":
        raise AssertionError(f"the page says: {node.text}")
    return node


def images_loaded(driver) -> bool:
    """Whether every <img> of the page that has a source has loaded (decoded, non-empty)."""
    return driver.execute_script(
        "return [...document.images].filter(i => i.src).every(i => i.complete && i.naturalWidth > 0)")


def upload(driver, url: str, image: Path, k: int):
    """Open the page, set k, choose `image`: the results (their thumbnails loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "health").text)
    field = driver.find_element(By.ID, "k")
    field.clear()
    field.send_keys(str(k))
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait_for(driver, "search-status")
    WebDriverWait(driver, WAIT_S).until(images_loaded)
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def show_failures(driver):
    """Switch to the failures view: its rows (their images loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "tab-failures").click()
    wait_for(driver, "failures-status")
    WebDriverWait(driver, WAIT_S).until(images_loaded)
    return driver.find_elements(By.CSS_SELECTOR, "#failures tbody tr")


def gallery_image(gallery: Path, i: int, folder: Path) -> Path:
    """Gallery item i's image as a file in `folder`, as a user would upload it (its stored bytes)."""
    from pipeline.data.shards import ShardIndex
    from pipeline.search.images import media_type

    index = ShardIndex.load(gallery)
    data = index.image_bytes(i)
    path = folder / f"{index.keys[i]}.{media_type(data).split('/')[1]}"
    path.write_bytes(data)
    return path


def screenshots(driver, url: str, image: Path, out: Path, k: int = 10) -> list[Path]:
    """page_search.png (the results for `image`) and page_failures.png, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    upload(driver, url, image, k)
    driver.save_screenshot(str(out / "page_search.png"))
    show_failures(driver)
    driver.save_screenshot(str(out / "page_failures.png"))
    return [out / "page_search.png", out / "page_failures.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a run directory with index/ and eval/failures.json")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    if why := browser_missing():
        sys.exit(f"no headless browser: {why}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipeline.search.searcher import Searcher
    from pipeline.search.server import create_app

    searcher = Searcher(args.run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        query = gallery_image(searcher.gallery, 0, Path(tmp))
        with serving(create_app(searcher, k=args.k)) as url, chromium() as driver:
            for path in screenshots(driver, url, query, Path(args.out), args.k):
                print(path)


if __name__ == "__main__":
    main()
