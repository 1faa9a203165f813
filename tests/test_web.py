"""The web demo end to end in a real headless browser (Debian's chromium and chromedriver, driven by selenium)."""

import contextlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_pipeline

from diffscm import DiffSCMPipeline
from diffscm.cli import main
from diffscm.cli.serve import (
    CACHE_LIFETIME,
    MAX_PIXELS,
    MAX_UPLOAD,
    PAGE_CSS,
    REQUESTS_KEPT,
    CounterfactualDemo,
    build_app,
    drawn_digit,
    launch,
    model_names,
    read_back,
    values_table,
)
from diffscm.evaluation import DigitOracle
from diffscm.paths import shipped_checkpoint

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = Path(os.environ.get("DIFFSCM_SCREENSHOTS", "test-artifacts"))  # kept for a person to look at


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web") / "pipeline"
    tiny_pipeline(size=28, num_classes=10, num_inference_steps=2, guidance_scale=1.0).save_pretrained(folder)
    split = {"source": "mnist-bundled", "heldout_indices": [3, 10, 42]}
    (folder / "training.json").write_text(json.dumps({"split": split}))
    return {"tiny MNIST": str(folder)}


def test_demo_logic_makes_a_captioned_gallery_a_grid_and_a_read_back_table(tiny_model):
    demo = CounterfactualDemo(tiny_model, device="cpu")
    image, values = demo.example("tiny MNIST", 1)
    assert image.size == (28, 28) and set(values) == {"label"}
    gallery, grid, table = demo.counterfactuals("tiny MNIST", image, {"label": "3"})
    assert [caption for _, caption in gallery] == ["factual", "null intervention (reconstruction)", "do(label=3)"]
    assert all(picture.size == (168, 168) for picture, _ in gallery), "large enough to see"
    assert grid.size == (3 * 28 * 4, 14 + 28 * 4)
    row = next(line for line in table.splitlines() if line.startswith("| do(label=3) |"))
    asked, propagated, read = row.split("|")[2].split(" / ")
    assert asked.strip() == "3" and propagated.strip() == "3" and read.strip().isdigit(), "read back by the oracle"
    with pytest.raises(ValueError, match="fewer than 5"):
        demo.example("tiny MNIST", 4)


def test_a_multi_parent_request_leaves_the_unticked_variables_to_their_mechanisms():
    pipe = DiffSCMPipeline.from_pretrained(
        shipped_checkpoint("diffscm-morphomnist-conditional"), num_inference_steps=3
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(torch.rand(1, 1, 28, 28) * 0, intervention={"thickness": 4.0},
               factual_values={"thickness": 2.0, "intensity": 120.0, "digit": 3}, output_type="pt")  # fmt: skip
    readings = read_back(out.images, DigitOracle.from_pretrained(shipped_checkpoint("morphomnist-oracle")).eval(),
                         pipe.causal_graph.image_parents)  # fmt: skip
    table = values_table(out, ["do(thickness=4)"], [{"thickness": 4.0}], readings, pipe.causal_graph, "")
    row = next(line for line in table.splitlines() if line.startswith("| do(thickness=4) |"))
    thickness, intensity = row.split("|")[2:4]
    assert thickness.strip().startswith("4.00 / 4.00 / ") and intensity.strip().startswith("- / ")
    assert float(intensity.split(" / ")[1]) > 200, "intensity followed thickness through its mechanism"


def test_an_image_bomb_is_refused_from_its_header_before_decoding(tiny_model, tmp_path):
    build_app(tiny_model, device="cpu")
    bomb = tmp_path / "bomb.png"
    PIL.Image.new("1", (MAX_PIXELS // 1000 + 1, 1001)).save(bomb)  # a few KB on disk, 16.8M pixels
    assert bomb.stat().st_size < 100_000
    with pytest.raises(PIL.Image.DecompressionBombError), PIL.Image.open(bomb) as opened:
        opened.load()


def test_serve_takes_models_and_validates_the_device_before_loading(tiny_model, monkeypatch):
    launched = {}
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kwargs: launched.update(kwargs))
    main(["serve", "--model", *tiny_model.values(), "--port", "7999"])
    assert launched == {"server_name": "127.0.0.1", "server_port": 7999, "max_file_size": MAX_UPLOAD, "css": PAGE_CSS,
                        "show_error": True}  # fmt: skip
    assert build_app(tiny_model, device="cpu").delete_cache == CACHE_LIFETIME, "uploads and results do not pile up"
    with pytest.raises(SystemExit, match="--device 'cuda:7': this machine has no such device"):
        main(["serve", "--model", *tiny_model.values(), "--device", "cuda:7"])


def test_the_server_loads_one_model_at_a_time(monkeypatch):
    """Gradio serves requests in threads, and diffusers loads inside accelerate's init_empty_weights, which swaps
    torch.nn.Module.register_parameter process-wide: overlapping loads once left it swapped (every module made after
    got meta parameters)."""
    inside, overlaps = [0], []

    def slow_load(path, device, dtype):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.1)
        inside[0] -= 1
        return SimpleNamespace(set_progress_bar_config=lambda **kwargs: None, path=path)

    monkeypatch.setattr("diffscm.hub.load_pipeline", slow_load)
    demo = CounterfactualDemo({name: f"folder-{name}" for name in "abcd"}, device="cpu")
    threads = [threading.Thread(target=demo.pipeline, args=(name,)) for name in "abcd" * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(overlaps) == 1 and len(overlaps) == 4, "each model loaded once, never two at a time"
    assert demo.pipeline("c").path == "folder-c"


def test_a_drawing_becomes_a_white_on_black_digit():
    canvas = np.full((40, 40, 4), 255, dtype=np.uint8)
    canvas[10:30, 18:22, :3] = 0  # a black stroke on white
    digit = drawn_digit({"composite": PIL.Image.fromarray(canvas)})
    assert digit.mode == "L" and np.asarray(digit)[20, 20] == 255 and np.asarray(digit)[0, 0] == 0
    assert drawn_digit({"composite": None}) is None


@contextlib.contextmanager
def page_in_a_browser(models: dict[str, str], tmp_path: Path):
    """The demo served on a free local port and opened in headless Chromium at a laptop's window size."""
    from selenium import webdriver

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = build_app(models, device="cpu")
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):  # fmt: skip
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.add_argument("--window-size=1400,1100")
    browser = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        browser.get(f"http://127.0.0.1:{port}")
        yield browser
    finally:
        browser.quit()
        app.close()


def press_and_read_the_page(browser, count: int, row: str, screenshot: str) -> tuple[list, str, list[int]]:
    """Press Counterfactuals and wait for `count` gallery images and the values table's `row`; returns the images,
    the table's text and the images' shown heights, and keeps a screenshot for a person to look at."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 180)
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "run"))).click()
    shown = wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) >= count and
                       b.find_elements(By.CSS_SELECTOR, "#gallery img"))  # fmt: skip
    wait.until(lambda b: row in b.find_element(By.ID, "values").text)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / screenshot))
    return shown, browser.find_element(By.ID, "values").text, [shown_height(browser, image) for image in shown]


def shown_height(browser, image) -> float:
    """The height in px at which an <img> draws its picture: its box scaled by `object-fit` (which may keep a 28 px
    digit at 28 px inside a large box)."""
    return browser.execute_script(
        "const i = arguments[0], fit = getComputedStyle(i).objectFit;"
        "const s = Math.min(i.clientWidth / i.naturalWidth, i.clientHeight / i.naturalHeight);"
        "return (fit === 'none' ? 1 : fit === 'scale-down' ? Math.min(1, s) : s) * i.naturalHeight;",
        image,
    )


BROWSER = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.mark.slow
@BROWSER
def test_upload_press_and_see_the_counterfactuals_in_a_browser(tiny_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    digit = tmp_path / "digit.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)).save(digit)
    with page_in_a_browser(tiny_model, tmp_path) as browser:
        wait = WebDriverWait(browser, 120)
        upload = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#factual input[type=file]"))
        upload.send_keys(str(digit))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#factual img"))
        shown, table, heights = press_and_read_the_page(browser, 12, "do(label=9)", "web-demo-mnist.png")
        with urllib.request.urlopen(shown[0].get_attribute("src")) as response:  # the image the page shows
            first = PIL.Image.open(io.BytesIO(response.read()))
    assert "Factual values (predicted from the image)" in table and "do(label=0)" in table and "read back" in table
    assert len(shown) == 12, "factual, null and the 10 counterfactuals of do(label = 0..9)"
    assert min(heights) >= 112, f"every image is shown at least 112 px high: {heights}"
    assert first.size == (168, 168)


@pytest.mark.slow
@BROWSER
def test_do_thickness_alone_in_a_browser_shows_intensity_following(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    models = {"Morpho-MNIST": str(shipped_checkpoint("diffscm-morphomnist-conditional"))}
    with page_in_a_browser(models, tmp_path) as browser:
        wait = WebDriverWait(browser, 120)
        ticked = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#variables input[type=checkbox]:checked"))
        assert [box.find_element(By.XPATH, "..").text for box in ticked] == ["thickness"], "do(thickness) alone"
        browser.find_element(By.ID, "pick").click()  # held-out digit 0, with its recorded factual values
        picked = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#factual img"))[0]
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picked))
        picked_height = shown_height(browser, picked)
        shown, table, heights = press_and_read_the_page(browser, 3, "do(thickness=4", "web-demo-morphomnist.png")
    assert picked_height >= 112, f"the picked 28 px digit is drawn large: {picked_height} px"
    assert len(shown) == 3 and min(heights) >= 112, f"factual, null, do(thickness=4), each large: {heights}"
    row = next(line for line in table.splitlines() if line.startswith("do(thickness=4"))
    thickness, intensity = re.findall(r"([-\d.]+) / ([\d.]+) / ([\d.]+)", row)[:2]
    assert thickness[:2] == ("4", "4.00") and intensity[0] == "-", "intensity follows thickness, not asked"
    assert all(float(value) > 0 for value in (thickness[2], intensity[1], intensity[2])), "propagated and read back"


def test_two_models_in_folders_of_one_name_are_both_served_and_grids_are_bounded(tiny_model):
    assert model_names(["runs/a/pipeline", "runs/b/pipeline", "other"]) == {
        "a/pipeline": "runs/a/pipeline", "b/pipeline": "runs/b/pipeline", "other": "other"}  # fmt: skip
    with pytest.raises(ValueError, match="twice"):
        model_names(["runs/a", "runs/a"])
    demo = CounterfactualDemo(tiny_model, device="cpu")
    picture = PIL.Image.new("RGB", (4, 4))
    kept = [demo.keep_files([(picture, "factual"), (picture, "null")], picture) for _ in range(REQUESTS_KEPT + 3)]
    gallery, grid = kept[-1]
    assert [caption for _, caption in gallery] == ["factual", "null"] and Path(grid).is_file()
    paths = [path for gallery, grid in kept for path in [grid, *(path for path, _ in gallery)]]
    # the same pictures twice are two files (parallel requests never share one), and only the last requests' are kept
    assert len(set(paths)) == 3 * (REQUESTS_KEPT + 3) and sum(Path(p).exists() for p in paths) == 3 * REQUESTS_KEPT
    folder = Path(demo.grids.name)
    demo.grids.cleanup()
    assert not folder.exists()


@pytest.mark.slow
@BROWSER
def test_an_example_clicked_after_a_picked_digit_is_abducted_with_its_own_values(tiny_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with page_in_a_browser(tiny_model, tmp_path) as browser:
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.ID, "pick")).click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#factual img"))
        browser.find_elements(By.CSS_SELECTOR, ".gallery-item, button.gallery")[0].click()  # the first example
        _, table, _ = press_and_read_the_page(browser, 12, "do(label=9)", "web-demo-example-after-pick.png")
    assert "Factual values (predicted from the image)" in table


def test_serve_takes_the_shared_pipeline_options_for_every_request(tiny_model, monkeypatch):
    """`diffscm serve --num-inference-steps 3 --dtype bfloat16 ...`: every request runs with them."""
    built = {}
    monkeypatch.setattr("diffscm.cli.serve.build_app", lambda *args: built.update(args=args) or build_app(*args))
    monkeypatch.setattr("gradio.Blocks.launch", lambda self, **kwargs: None)
    main(["serve", "--model", *tiny_model.values(), "--num-inference-steps", "3", "--integrator", "bdia",
          "--dtype", "bfloat16", "--device", "cpu"])  # fmt: skip
    models, device, dtype, options = built["args"]
    assert (device, dtype) == ("cpu", "bfloat16") and options["num_inference_steps"] == 3
    demo, name = CounterfactualDemo(models, device, dtype, options), next(iter(models))
    image, _ = demo.example(name, 0)
    demo.counterfactuals(name, image, {"label": "3"})
    pipe = demo.pipeline(name)
    assert pipe.num_timesteps == 3 and pipe.unet.dtype == torch.bfloat16


@pytest.mark.slow
def test_serve_leaves_no_file_behind_when_stopped_by_sigterm(tiny_model, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from gradio_client import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp, cache = tmp_path / "tmp", tmp_path / "gradio"
    temp.mkdir(), cache.mkdir()
    env = os.environ | {"TMPDIR": str(temp), "GRADIO_TEMP_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "diffscm.cli", "serve", "--model", tiny_model["tiny MNIST"], "--device", "cpu",
               "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(240):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # not up yet
                time.sleep(0.5)
        client.predict("pipeline", 1, api_name="/pick")  # a held-out digit, written to Gradio's cache
        assert any(path.is_file() for path in cache.rglob("*")), "the request left a file in the cache"
    finally:
        server.send_signal(signal.SIGTERM)
        stderr = server.communicate(timeout=60)[1]
    assert server.returncode is not None and not list(cache.iterdir()) and not list(temp.iterdir()), stderr[-2000:]
