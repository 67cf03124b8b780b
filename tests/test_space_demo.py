"""hub_spaces/sak-demo: the Gradio app served on 127.0.0.1 and driven in a real headless Chromium (selenium): a photo
upload gives every task's picture at the photo's aspect ratio, the semseg legend, the depth colour bar and the router
chart; a file that is not an image and a 16-bit depth PNG show the reason in the page.

`SAK_DEMO_MODEL=outputs/sak-toyrooms/final SAK_DEMO_SCREENSHOT=docs/space_demo.png` runs it on the default training
run's checkpoint and writes the README's screenshot."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from modeling_sak import SAKForMultiTask, SAKImageProcessor


ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "hub_spaces" / "sak-demo" / "app.py"
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMEDRIVER is None and not os.environ.get("CI"), reason="needs chromium-driver (apt-get install chromium-driver)"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app as a user starts it (`python hub_spaces/sak-demo/app.py --model ...`), on a free port."""
    model = os.environ.get("SAK_DEMO_MODEL")
    if not model:
        folder = tmp_path_factory.mktemp("demo-model")
        SAKForMultiTask(tiny_config()).eval().save_pretrained(folder)
        SAKImageProcessor(pad_size={"height": 64, "width": 96}).save_pretrained(folder)
        model = str(folder)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "2"}
    log = open(tmp_path_factory.mktemp("demo-log") / "app.log", "w+")
    server = subprocess.Popen(
        [sys.executable, str(APP), "--model", model, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                server.kill()
                pytest.fail(f"the demo did not start:\n{log.read()}")
            time.sleep(1)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def upload_and_predict(browser, url: str, path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    wait = WebDriverWait(browser, 120)
    field = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    field.send_keys(str(path))
    wait.until(lambda b: path.stem in b.find_element(By.ID, "upload").text)  # shown as "stem\n.suffix"
    browser.find_element(By.ID, "predict").click()


def shown_images(browser) -> dict[str, dict] | None:
    """Per output, the shown `<img>`'s natural and rendered size, once all four and the router chart are there."""
    sizes = browser.execute_script(
        """
        const out = {};
        for (const id of ["semseg", "depth", "normals", "edge", "routers"]) {
          const img = document.querySelector(`#${id} img`);
          if (!img || !img.complete || img.naturalWidth === 0) return null;
          const box = img.getBoundingClientRect();
          out[id] = {natural: [img.naturalWidth, img.naturalHeight], shown: [box.width, box.height]};
        }
        return out;
        """
    )
    return sizes


def test_a_photo_shows_every_task_at_its_aspect_ratio_with_legends_and_router_chart(app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from skimage import data

    photo = tmp_path / "coffee.jpg"
    size = (203, 150) if not os.environ.get("SAK_DEMO_MODEL") else (640, 480)  # width x height
    Image.fromarray(data.coffee()).resize(size).save(photo, quality=92)
    upload_and_predict(browser, app, photo)
    images = WebDriverWait(browser, 300).until(shown_images)
    ratio = size[0] / size[1]
    for task in ("semseg", "depth", "normals", "edge"):
        assert images[task]["natural"] == list(size), (task, images[task])
        width, height = images[task]["shown"]
        assert abs(width / height - ratio) < 0.02 * ratio, (task, images[task])
    legend = browser.find_element(By.ID, "semseg-legend").text
    assert "%" in legend and any(name in legend for name in ("wall", "floor", "bed", "LABEL_0", "0"))
    colorbar = browser.find_element(By.ID, "depth-colorbar").text
    assert colorbar.count(" m") == 3, colorbar
    assert f"{size[0]}x{size[1]} pixels" in browser.find_element(By.ID, "status").text
    target = Path(os.environ.get("SAK_DEMO_SCREENSHOT") or tmp_path / "space_demo.png")
    browser.save_screenshot(str(target))
    shot = Image.open(target)
    assert shot.size[0] >= 1000 and np.asarray(shot).std() > 10  # a rendered page, not a blank one


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.png", b"these are my notes, not a picture", "not an image this demo can read"),
        ("sync_depth.png", None, "I;16"),
    ],
)
def test_a_bad_file_shows_the_reason_in_the_page(app, browser, tmp_path, name, content, message):
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / name
    if content is None:  # a 16-bit depth map, as NYU's sync_depth_*.png
        Image.fromarray(np.full((40, 60), 2500, dtype=np.uint16)).save(path)
        assert Image.open(path).mode == "I;16"
    else:
        path.write_bytes(content)
    upload_and_predict(browser, app, path)
    WebDriverWait(browser, 120).until(lambda b: message in b.find_element("tag name", "body").text)
    assert "Traceback" not in browser.find_element("tag name", "body").text


def test_a_photo_over_the_size_limit_and_a_missing_upload_are_named(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sak_demo_app", APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    huge = tmp_path / "panorama.png"
    Image.new("RGB", (app.MAX_SIDE + 1, 10)).save(huge)
    with pytest.raises(
        ValueError, match=r"panorama.png is 2049x10 pixels; this demo takes up to 2048 pixels per side"
    ):
        app.open_photo(str(huge))
    with pytest.raises(ValueError, match="upload an image"):
        app.open_photo(None)
    with pytest.raises(SystemExit, match="accelerate launch train_accelerate.py"):
        app.DEFAULT_RUN = tmp_path / "no-run"
        os.environ.pop("SAK_MODEL", None)
        app.resolve_model(None)
