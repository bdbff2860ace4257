"""The README's dashboard screenshots, from real jobs of the bundled model through ``rsavq serve``.

Starts the service (SQLite + embedded broker, one worker, the generation server), submits the
bundled model at 3 bits with the fast preset and a two-budget RTN sweep (3 and 4 bits, group 64),
waits for them, then drives the dashboard (``/ui``) in Debian's Chromium with Playwright: the job
with its per-layer chart and metrics (``docs/dashboard-job.png``), the sweep's chart and a greedy
completion in the playground (``docs/dashboard-sweep-playground.png``). About 15 minutes on 2 CPU
cores from an empty cache.

    python scripts/dashboard_screenshots.py [--data-dir runs/screenshots] [--port 8741]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from pathlib import Path

from service.cli.local import create_key, fail_leftover_jobs, start_server, stop_server
from service.client import Client

DOCS = Path(__file__).resolve().parents[1] / "docs"
TIMEOUT_MS = 600_000  # the page's waits; the jobs are finished before the page is opened


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="runs/screenshots")
    parser.add_argument("--port", type=int, default=8741)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.stderr.write("no Chromium here: sh scripts/ensure_browser.sh installs Debian's\n")
        return 1
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    fail_leftover_jobs(data_dir)
    server = start_server(data_dir, args.port)
    try:
        key = create_key(data_dir, "screenshots")
        url = f"http://127.0.0.1:{args.port}"
        client = Client(url, key)
        evaluation = {"evaluation": {"perplexity": True}}
        job = client.submit(args.model, 3, "rsavq", {"preset": "fast", **evaluation}, idempotency_key=uuid.uuid4().hex)
        options = {"group_size": 64, **evaluation}
        sweep = client.sweep(args.model, [3, 4], "rtn", options, name="smol-rtn", idempotency_key=uuid.uuid4().hex)
        for job_id in [job["id"], *(r["job_id"] for r in sweep["rows"])]:
            done = client.wait(job_id, poll=5.0)
            sys.stdout.write(f"job {job_id}: {done['status']}\n")
            if done["status"] != "succeeded":
                sys.stderr.write(f"{done['error']}\n")
                return 1
        shoot(url, key, job["id"], chromium)
    finally:
        stop_server(server)
    return 0


def shoot(url: str, key: str, job_id: str, chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        expect.set_options(timeout=TIMEOUT_MS)
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/ui")
        page.fill("#key", key)
        page.click("#connect")
        expect(page.locator("#who")).to_have_text("connected")
        page.locator(f'tr[data-job="{job_id}"]').click()
        expect(page.locator("#layer-chart polyline.layer-error")).to_have_count(1)
        expect(page.locator("#job-metrics")).to_contain_text("perplexity")
        page.screenshot(path=str(DOCS / "dashboard-job.png"), full_page=True)
        expect(page.locator("#sweep-chart circle.sweep-point")).to_have_count(2)
        page.select_option("#models", job_id)
        page.fill("#max-tokens", "12")
        page.click("#generate")
        expect(page.locator("#completion")).to_have_attribute("data-done", "true")
        page.screenshot(path=str(DOCS / "dashboard-sweep-playground.png"), full_page=True)
        browser.close()
    sys.stdout.write(f"wrote {DOCS / 'dashboard-job.png'} and {DOCS / 'dashboard-sweep-playground.png'}\n")


if __name__ == "__main__":
    raise SystemExit(main())
