"""The MLflow UI as a user opens it, in a real browser: `mlflow ui` on the store of a small pipeline run, the system's
Chromium driven by Playwright (no browser download). From the printed "MLflow UI:" link a user reaches a model's FID
with its interval, its sample grid and its champion status in at most two clicks, and after the sidebar's one switch
to *Model training* (docs/mlflow.md) no navigation leaves that view.

Screenshots of each page go to the test's folder, and to ``$DDPM_UI_SCREENSHOTS`` when set (docs/images/mlflow/ is
made that way: ``DDPM_UI_SCREENSHOTS=docs/images/mlflow pytest tests/test_mlflow_ui.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
RUN_ID, MODEL = "quickstart", "ddpm-digits"  # the session's guided_run (tests/conftest.py): the defaults
# The 3.17 UI's first-visit overlays (its assistant panel, a tracing tip) cover the page: a returning user's state.
QUIET_UI = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    "localStorage.setItem('mlflow.detectIssues.guidanceShown_v1', 'true');"
)
GENAI_ONLY = ("Sessions", "Judges", "Evaluation runs", "Training runs")  # sidebar links of the GenAI view
TIMEOUT_MS = 60_000  # pages take 5-15 s to render on 2 busy cores


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def pipeline_run(guided_run) -> tuple[Path, str]:
    """A small run of every stage but tune (register on, sample grids during training): its store, and the
    "MLflow UI:" line it printed. The session's ``guided_run`` (tests/conftest.py), which the autoguidance and
    bad-input tests inspect too."""
    result = guided_run.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("MLflow UI:"))
    return guided_run.root.parent, line


@pytest.fixture(scope="module")
def ui(pipeline_run) -> Iterator[str]:
    """`mlflow ui` on the run's store; its base URL."""
    root, _ = pipeline_run
    port = free_port()
    log = open(root / "mlflow-ui.log", "w")  # noqa: SIM115 (open while the server runs)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as answer:
                if answer.status == 200:
                    break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (root / "mlflow-ui.log").read_text()[-3000:]
            time.sleep(1)
    try:
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: `make install` installs the system package"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        yield launched
        launched.close()


class Walk:
    """One browser page and where its screenshots go."""

    def __init__(self, page: Page, folders: list[Path]) -> None:
        self.page, self.folders = page, folders

    def shot(self, name: str) -> None:
        self.page.wait_for_timeout(1500)  # charts and images settle
        for folder in self.folders:
            path = folder / f"{name}.png"
            self.page.screenshot(path=str(path))
            small = Image.open(path).convert("RGB").quantize(colors=128)  # small PNGs for the docs
            small.save(path, optimize=True)

    def in_model_training_view(self, where: str) -> None:
        """The sidebar of the model-training view: the registry link, none of GenAI's."""
        expect(self.page.get_by_role("link", name="Model registry", exact=True), where).to_be_visible()
        shown = [name for name in GENAI_ONLY if self.page.get_by_role("link", name=name, exact=True).count()]
        assert not shown, f"{where}: GenAI links {shown} at {self.page.url}"

    def click_link(self, name: str) -> None:
        self.page.get_by_role("link", name=name, exact=True).first.click()


@pytest.fixture
def walk(browser, tmp_path) -> Iterator[Walk]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(QUIET_UI)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    folders = [tmp_path]
    if os.environ.get("DDPM_UI_SCREENSHOTS"):
        folders.append(Path(os.environ["DDPM_UI_SCREENSHOTS"]))
        folders[-1].mkdir(parents=True, exist_ok=True)
    yield Walk(page, folders)
    context.close()


def follow(page: Page, link: Locator) -> Page:
    """Click ``link``; the page it opens (links in descriptions open in a new tab)."""
    if link.get_attribute("target") != "_blank":
        link.click()
        return page
    with page.context.expect_page() as opened:
        link.click()
    opened.value.set_default_timeout(TIMEOUT_MS)
    return opened.value


def printed_link(line: str, base: str) -> str:
    """The run's "MLflow UI:" address, on the test's `mlflow ui` port."""
    address = re.search(r"http://\S+", line)
    assert address, line
    return re.sub(r"^http://[^/]+", base, address.group(0))


def test_the_printed_link_opens_the_scores_view_and_every_page_stays_in_model_training(pipeline_run, ui, walk):
    _, line = pipeline_run
    link = printed_link(line, ui)
    assert "viewStateShareKey=ddpm-scores" in link and "workflowType=machine_learning" in link, line
    page = walk.page
    page.goto(link)
    # The saved view: the scores as columns, the stages of the pipeline run grouped in DAG order.
    expect(page.get_by_role("columnheader", name="fid", exact=True).first).to_be_visible()
    for column in ("fid_ci_low", "fid_ci_high", "kid", "precision"):
        assert page.get_by_role("columnheader", name=column, exact=True).count(), column
    expect(page.get_by_text(f"Group: {RUN_ID}").first).to_be_visible()
    walk.in_model_training_view("the printed link")
    # The one switch docs/mlflow.md asks for (the UI's own links carry no view: the browser must remember it). Shown
    # as chosen already (the link's parameter), it is remembered only when clicked from the other side.
    page.get_by_role("button", name="GenAI", exact=True).click()
    page.get_by_role("button", name="Model training", exact=True).click()
    page.goto(link)
    expect(page.get_by_role("columnheader", name="fid", exact=True).first).to_be_visible()
    assert page.evaluate("localStorage.getItem('mlflow.workflowType_v1')") == '"machine_learning"'
    walk.shot("01_runs_view")

    # Click 1: the evaluate run shows FID with its interval, and its protocol.
    walk.click_link(f"{RUN_ID}/evaluate")
    expect(page.get_by_role("tab", name="Overview")).to_be_visible()
    walk.in_model_training_view("the evaluate run")
    for metric in ("fid", "fid_ci_low", "fid_ci_high"):
        expect(page.get_by_text(metric, exact=True).first).to_be_visible()
    walk.shot("02_evaluate_run")
    # Click 2: its sample grid.
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("samples.png", exact=True).first.click()
    expect(page.get_by_role("img", name="samples.png")).to_be_visible()
    walk.in_model_training_view("the evaluate run's artifacts")
    walk.shot("03_evaluate_samples")

    # The parent run, the register run, its model version (champion status, one click to the scores), the model.
    page.get_by_role("tab", name="Overview").click()
    walk.click_link(RUN_ID)
    expect(page.get_by_role("link", name=f"{RUN_ID}/register", exact=True).first).to_be_visible()
    walk.in_model_training_view("the parent run")
    walk.click_link(f"{RUN_ID}/register")
    expect(page.get_by_role("tab", name="Overview")).to_be_visible()
    walk.in_model_training_view("the register run")
    walk.click_link(MODEL)
    page.wait_for_url(re.compile(r"#/models/[^/]+/versions/\d+"))
    expect(page.get_by_text("champion").first).to_be_visible()
    walk.in_model_training_view("the model version")
    walk.shot("04_model_version")
    scores = follow(page, page.get_by_role("link", name="evaluate run").first)  # its scores, in one click
    expect(scores.get_by_text("fid_ci_low", exact=True).first).to_be_visible()
    Walk(scores, []).in_model_training_view("the scores from the version page")
    if scores is not page:
        scores.close()
    walk.click_link(MODEL)
    expect(page.get_by_role("link", name="Version 1", exact=True)).to_be_visible()
    walk.in_model_training_view("the registered model")
    # the versions table shows a description's first line unrendered: it is plain text, the FID with its interval
    expect(page.get_by_text(re.compile(r"^FID [0-9.]+ \(95% interval")).first).to_be_visible()
    walk.shot("05_registered_model")

    # Training as it went: the train run's charts (loss, rate, learning rate, EMA decay, ...).
    page.goto(link)
    walk.click_link(f"{RUN_ID}/train")
    page.get_by_role("tab", name="Model metrics").click()
    expect(page.get_by_text("images_per_second").first).to_be_visible()
    walk.in_model_training_view("the train run's charts")
    walk.shot("06_train_charts")

    # Samples as training went: the train run's description leads to its sample grids' run (no params, so the image
    # card shows the grid, not text), whose card holds a grid per step; the composite has one row per grid.
    page.get_by_role("tab", name="Overview").click()
    grids = follow(page, page.get_by_role("link", name="sample grids run").first)
    expect(grids.get_by_role("tab", name="Model metrics")).to_be_visible()
    Walk(grids, []).in_model_training_view("the sample grids run")
    card_image = grids.locator("img[src*='get-artifact']").first
    expect(card_image).to_be_visible()
    assert card_image.evaluate("image => image.naturalWidth") >= 8 * 32, "the samples card shows no grid"
    expect(grids.get_by_text("No image logged at this step")).to_have_count(0)
    Walk(grids, walk.folders).shot("07_training_samples")
    grids.get_by_role("tab", name="Artifacts").click()
    grids.get_by_text("samples_over_training.png", exact=True).first.click()
    expect(grids.get_by_role("img", name="samples_over_training.png")).to_be_visible()
    Walk(grids, walk.folders).shot("08_samples_over_training")
