"""Screenshot of the explorer for the README.

    .venv/bin/python analyses/screenshot_explorer.py --runs runs --out docs/explorer.png [--page Compare]

Starts ``circuitq app`` on a free local port, opens it in Debian's headless chromium through
playwright (no browser download), waits for the first heatmap and saves a PNG.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default="docs/explorer.png")
    p.add_argument("--page", default="Explore", choices=["Explore", "Compare", "Export"])
    p.add_argument("--height", type=int, default=1100)
    a = p.parse_args()
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "circuitq", "app", "--runs", a.runs, "--port", str(port),
                               "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                               "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1500, "height": a.height})
            for _ in range(60):
                try:
                    page.goto(f"http://127.0.0.1:{port}", timeout=5000)
                    break
                except Exception:  # noqa: BLE001 - server still starting
                    time.sleep(1)
            if a.page != "Explore":
                page.get_by_text(a.page, exact=True).first.click()
            page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=180000)
            time.sleep(2)
            page.screenshot(path=a.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
