"""The web UI in a real browser (Debian's headless Chromium driven by Selenium), on the tiny demo model:
use the demo images, edit a caption, write the dataset config, start a 20-step run, see the loss plot and
a sample image, press Stop, see the LoRA file listed, then the run on the Runs page. Screenshots are kept in the test's tmp folder
(the path is printed; `pytest -s` shows it)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO_ROOT

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,2400"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui_server(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(tmp_path / "ui.log", "w")
    process = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "ui.py"), "--port", str(port),
                                "--workspace", str(tmp_path / "workspace")], stdout=log, stderr=subprocess.STDOUT,
                               env=env, cwd=str(tmp_path))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert process.poll() is None and time.time() < deadline, (tmp_path / "ui.log").read_text()
            time.sleep(0.5)
    yield url, tmp_path / "workspace"
    process.terminate()
    process.wait(timeout=120)
    log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM and CHROMEDRIVER, "install Debian's chromium and chromium-driver (setup.sh does, as root)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


class Page:
    """Small waits and inputs over Gradio's DOM, found by the elem_id each component has."""

    def __init__(self, driver, shots):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.shots = driver, shots
        self.wait = lambda timeout=60: WebDriverWait(driver, timeout, poll_frequency=0.25)

    def find(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def until(self, condition, what, timeout=60):
        try:
            return self.wait(timeout).until(lambda _: condition())
        except Exception:
            self.screenshot("failed")
            raise AssertionError(f"timed out waiting for {what}; screenshots in {self.shots}")

    def click(self, css):
        element = self.until(lambda: next((e for e in self.find(css) if e.is_displayed()), None), css)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        element.click()

    def field(self, elem_id):
        return self.until(lambda: next(iter(self.find(f"#{elem_id} textarea, #{elem_id} input")), None), elem_id)

    def type(self, elem_id, text):
        from selenium.webdriver.common.keys import Keys

        element = self.field(elem_id)
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(str(text))
        element.send_keys(Keys.TAB)  # Gradio takes the value on change/blur

    def value(self, elem_id):
        return self.field(elem_id).get_attribute("value")

    def text(self, elem_id):
        return " ".join(e.text for e in self.find(f"#{elem_id}"))

    def tab(self, label):
        self.until(lambda: [b for b in self.find("button[role='tab']") if b.text.strip() == label], label)[0].click()

    def screenshot(self, name):
        path = os.path.join(self.shots, f"{name}.png")
        self.driver.save_screenshot(path)
        return path


def test_browser_demo_caption_edit_train_watch_stop(ui_server, browser, tmp_path):
    url, workspace = ui_server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    page = Page(browser, str(shots))
    browser.get(url)

    # Dataset page: the demo images, one caption edited, the dataset config written
    page.click("#use_demo")
    page.until(lambda: len(page.find("#gallery img")) == 6, "six thumbnails")
    page.click("#gallery img")
    page.until(lambda: page.value("selected_image").endswith(".png"), "the selected image")
    image = page.value("selected_image")
    caption_file = os.path.splitext(image)[0] + ".caption"
    assert page.value("caption") == open(caption_file).read().strip()
    page.type("caption", "a red circle, edited in the browser")
    page.click("#save_caption")
    page.until(lambda: open(caption_file).read() == "a red circle, edited in the browser\n", "the caption file")
    page.type("resolution", 128)  # slower steps, so Stop comes well before step 20
    page.click("#write_dataset")
    page.until(lambda: "image_dir" in page.text("dataset_toml"), "the dataset config")
    page.screenshot("1-dataset")
    assert "resolution = 128" in (workspace / "ds.toml").read_text()

    # Train page: the demo set the model and the CPU preset; 20 steps with samples every 4
    page.tab("Train")
    page.until(lambda: page.value("model").endswith("tiny_sd15"), "the demo model")
    page.type("steps", 20)
    page.type("learning_rate", "0.001")
    page.type("sample_prompts", "a red circle")
    page.type("sample_every", 4)
    page.type("run_name", "browser_lora")
    page.screenshot("2-train")
    page.click("#start")

    # Run page: live status, loss plot, a sample image; then Stop
    page.until(lambda: "step " in page.text("run_status"), "training steps", timeout=120)
    page.until(lambda: page.find("#run_samples img"), "a sample image", timeout=120)
    page.until(lambda: page.find("#run_loss_plot canvas, #run_loss_plot svg"), "the loss plot")
    page.screenshot("3-running")
    page.click("#stop")
    page.until(lambda: "browser_lora-step" in page.text("run_files"), "the LoRA file listed", timeout=120)
    page.until(lambda: "stopped at step" in page.text("run_status"), "the stopped status")
    page.screenshot("4-stopped")

    run_dir = workspace / "runs" / "browser_lora"
    saved = sorted(os.listdir(run_dir))
    lora = next(name for name in saved if name.startswith("browser_lora-step") and name.endswith(".safetensors"))
    step = int(lora[len("browser_lora-step"):-len(".safetensors")])
    assert 1 <= step < 20 and lora.replace(".safetensors", "-state") in saved
    assert "browser_lora.safetensors" not in saved  # stopped, not finished
    assert f"stopped at step {step}" in page.text("run_status")

    # Runs page: the run with its status, files and settings
    page.tab("Runs")
    page.until(lambda: "stopped at step" in page.text("runs_status"), "the run on the Runs page")
    assert lora in page.text("runs_files") and "max_train_steps = 20" in page.text("runs_settings")
    page.screenshot("5-runs")
