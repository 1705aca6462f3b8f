"""Save a PNG of the MLflow UI's run comparison page, rendered by headless Chromium (for a report or a review).

    python scripts/mlflow_screenshot.py http://127.0.0.1:5000 --experiment 1 --runs RUN_A RUN_B --output compare.png

Chromium comes from the system (`apt-get install chromium` on Debian), or set REELFORGE_CHROMIUM to its executable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome", "google-chrome-stable",
            "chrome")


def find_chromium() -> str | None:
    """REELFORGE_CHROMIUM, else the first Chromium-family executable on PATH."""
    configured = os.environ.get("REELFORGE_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else shutil.which(configured)
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def compare_runs_url(tracking_url: str, experiment_ids: list[str], run_ids: list[str]) -> str:
    """The UI's own route for "Compare" (mlflow/server/js: getCompareRunPageRoute): JSON lists in the hash query."""
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids, separators=(",", ":")),
                                    "experiments": json.dumps(experiment_ids, separators=(",", ":"))})
    return f"{tracking_url.rstrip('/')}/#/compare-runs?{query}"


def _chromium(browser: str, profile: str, width: int, height: int, wait_seconds: float) -> list[str]:
    # --no-sandbox: Chromium's sandbox needs user namespaces that containers and root often lack; the page is our
    # own tracking server. The virtual-time budget lets the app's API calls finish before the capture.
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", f"--virtual-time-budget={int(wait_seconds * 1000)}"]


def screenshot(url: str, output: str | os.PathLike, width: int = 1600, height: int = 2000,
               wait_seconds: float = 20.0, browser: str | None = None, timeout: float = 180.0) -> Path:
    """Render `url` and write the PNG to `output`; raises RuntimeError when no browser is found or none is made."""
    browser = browser or find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found: install it (apt-get install chromium) or set REELFORGE_CHROMIUM")
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [*_chromium(browser, profile, width, height, wait_seconds), f"--screenshot={output}", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not output.is_file():
        raise RuntimeError(f"{browser} made no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    return output


def page_dom(url: str, wait_seconds: float = 20.0, browser: str | None = None, timeout: float = 180.0) -> str:
    """The page's DOM once rendered (what the screenshot shows, as text)."""
    browser = browser or find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found: install it (apt-get install chromium) or set REELFORGE_CHROMIUM")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        command = [*_chromium(browser, profile, 1600, 1200, wait_seconds), "--dump-dom", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{browser} could not render {url} (exit {result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tracking_url", help="the MLflow tracking server, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", nargs="+", required=True, metavar="ID", help="experiment id(s) of the runs")
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN_ID", help="the runs to compare")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=2000, help="tall enough for the params and metrics tables")
    parser.add_argument("--wait-seconds", type=float, default=20.0, help="time the page gets to load its data")
    args = parser.parse_args(argv)
    url = compare_runs_url(args.tracking_url, args.experiment, args.runs)
    try:
        path = screenshot(url, args.output, args.width, args.height, args.wait_seconds)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"mlflow_screenshot: error: {err}", file=sys.stderr)
        return 2
    print(f"{url}\n-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
