"""Screenshots of the MLflow UI for docs/images, taken with headless Chromium (Debian's ``chromium``, driven over
its DevTools protocol with aiohttp, which Ray installs) against ``mlflow ui`` on a pipeline run's store: the
experiment's runs in the model-training view, the train run's charts and system metrics, the evaluate run's page, and
a model version's page (the champion's by default).

    python infra/mlflow_screenshots.py --tracking-uri sqlite:////abs/mlflow.db --experiment ddpm-digits \\
        --model ddpm-digits --out docs/images
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

PORT = 5077


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}", timeout=10) as response:
        return json.load(response)


def wait_for(base: str, seconds: float = 60, path: str = "/health") -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}{path}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{base}{path} did not answer within {seconds:.0f} s")


def pages(base: str, experiment_name: str, model: str, version: str | None) -> dict[str, str]:
    """File name -> UI address of each page to capture."""
    experiment = get(base, f"experiments/get-by-name?experiment_name={experiment_name}")["experiment"]
    experiment_id = experiment["experiment_id"]
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/runs/search",
        data=json.dumps(
            {"experiment_ids": [experiment_id], "max_results": 50, "order_by": ["attributes.start_time DESC"]}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        runs = json.load(response)["runs"]
    latest: dict[str | None, str] = {}  # stage -> the id of its most recent run
    for run in runs:
        stage = next((tag["value"] for tag in run["data"]["tags"] if tag["key"] == "ddpm.stage"), None)
        latest.setdefault(stage, run["info"]["run_id"])
    if version is None:
        version = get(base, f"registered-models/alias?name={model}&alias=champion")["model_version"]["version"]
    ui, view = f"{base}/#/experiments/{experiment_id}", "?workflowType=machine_learning"
    return {
        "mlflow_runs_view.png": f"{ui}/runs{view}",
        "mlflow_train_charts.png": f"{ui}/runs/{latest['train']}/model-metrics{view}",
        "mlflow_system_metrics.png": f"{ui}/runs/{latest['train']}/system-metrics{view}",
        "mlflow_evaluate_run.png": f"{ui}/runs/{latest['evaluate']}{view}",
        "mlflow_model_version.png": f"{base}/#/models/{model}/versions/{version}{view}",
    }


class Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, wait in real time for the UI's charts to
    fetch their data and draw (``--screenshot`` alone captures before they do), capture."""

    def __init__(self, port: int = 9333) -> None:
        self.profile = tempfile.TemporaryDirectory()
        self.process = subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1920,1200",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={self.profile.name}",
                "about:blank",
            ],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{port}"
        wait_for(self.endpoint, path="/json/version")

    def capture(self, url: str, path: Path, settle_s: float = 12.0) -> None:
        asyncio.run(self._capture(url, path, settle_s))

    async def _capture(self, url: str, path: Path, settle_s: float) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.endpoint}/json") as response:
                page = next(target for target in await response.json() if target["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as socket:
                await command(socket, 1, "Page.navigate", {"url": url})
                await asyncio.sleep(settle_s)
                shot = await command(socket, 2, "Page.captureScreenshot", {"format": "png"})
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=30)
        self.profile.cleanup()


async def command(socket: aiohttp.ClientWebSocketResponse, number: int, method: str, params: dict) -> dict:
    """Send one DevTools command and return its result (events in between are skipped)."""
    await socket.send_json({"id": number, "method": method, "params": params})
    async for message in socket:
        reply = json.loads(message.data)
        if reply.get("id") == number:
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]
    raise RuntimeError(f"{method}: the browser closed the connection")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", help="the model version to show (default: the champion)")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    base = f"http://127.0.0.1:{PORT}"
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow), "ui", "--backend-store-uri", args.tracking_uri, "--port", str(PORT), "--workers", "1"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    browser = Browser()
    try:
        wait_for(base)
        for name, url in pages(base, args.experiment, args.model, args.version).items():
            browser.capture(url, args.out / name)
            print(f"{args.out / name}: {url}")
    finally:
        browser.close()
        os.killpg(server.pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
