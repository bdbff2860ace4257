"""The dashboard (/ui) in a real headless browser: Debian's Chromium driven by Playwright.

A real API server and generation server run on loopback ports; jobs are submitted through the
API and run by the worker's own steps in a thread (the tiny local model: seconds). The page
must show the job appear and reach ``succeeded`` from its events stream, draw the per-layer chart (an RSAVQ job),
chart a sweep, and stream a completion. (The README's screenshots come from real jobs of the
bundled model: ``scripts/dashboard_screenshots.py``.)
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.service.conftest import auth
from tests.service.test_generation_api import _Server
from tests.timing import patience

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = patience(120) * 1000  # scaled to the machine: a busy one is slower, not red

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (make test installs Debian's chromium)"
)


def _run_worker_steps(settings: Any, job_ids: list[str]) -> threading.Thread:
    """The worker's quantize then evaluate steps for each job, in a thread (what Celery would call)."""
    from worker.runner import WorkerContext, claim_job, run_job

    def work() -> None:
        ctx = WorkerContext.from_settings(settings)
        for job_id in job_ids:
            claimed = claim_job(ctx, job_id)
            assert claimed is not None
            if run_job(ctx, claimed) == "evaluate":
                assert claim_job(ctx, claimed, "evaluate") == claimed
                run_job(ctx, claimed, "evaluate")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)  # the page renders (kept for a failure's report)


def test_the_dashboard_follows_a_job_charts_it_and_streams_a_completion(
    settings, keys, tiny_llama, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    from rsavq_core.settings import override
    from service.api.app import create_app
    from worker.generation.server import create_app as create_generation_app

    model, tokenizer = tiny_llama
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    local = settings.model_copy(update={"allow_local_models": True, "generation_token": SecretStr("ui-secret")})
    key = keys["alice"]
    evaluation = {"perplexity": True, "windows": 2}
    options = {"group_size": 16, "evaluation": evaluation}
    with (
        override(cache_dir=tmp_path / "cache"),
        _Server(create_generation_app(local, device="cpu", memory_gb=2)) as gen_url,
        _Server(create_app(local.model_copy(update={"generation_url": gen_url}))) as url,
        sync_playwright() as playwright,
    ):
        expect.set_options(timeout=TIMEOUT_MS)  # a job's steps take seconds; the default wait is 5 s
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/ui")
        page.fill("#key", key)
        page.click("#connect")
        expect(page.locator("#who")).to_have_text("connected")

        vq = {"calib_samples": 2, "calib_len": 16, "kmeans_iters": 2, "n_groups": 2, "block_finetune_steps": 2}
        body = {"model_id": str(folder), "bits": 2, "name": "tiny-rsavq2", "options": {**vq, "evaluation": evaluation}}
        job = httpx.post(f"{url}/v1/jobs", json=body, headers=auth(key)).raise_for_status().json()
        row = page.locator(f'tr[data-job="{job["id"]}"]')
        expect(row).to_be_visible()  # the page's refresh finds the job submitted elsewhere
        _run_worker_steps(local, [job["id"]])
        expect(row.locator("td.status")).to_have_text("succeeded")
        row.click()
        bars = page.locator("#layer-chart rect.layer-bar")
        expect(bars).to_have_count(14)  # the tiny model's linears
        assert all(float(h) > 0 for h in bars.evaluate_all("bars => bars.map(b => b.getAttribute('height'))"))
        expect(page.locator("#layer-chart polyline.layer-error")).to_have_count(1)  # VQ reports its error
        expect(page.locator("#job-metrics")).to_contain_text("perplexity")
        expect(page.locator("#download")).to_be_enabled()
        _shot(page, tmp_path, "dashboard-job.png")

        sweep_body = {"model_id": str(folder), "bits": [3, 4], "method": "rtn", "name": "tiny", "options": options}
        sweep = httpx.post(f"{url}/v1/sweeps", json=sweep_body, headers=auth(key)).raise_for_status().json()
        _run_worker_steps(local, [r["job_id"] for r in sweep["rows"]]).join(timeout=TIMEOUT_MS / 1000)
        page.click("#connect")  # reload the sweeps list
        expect(page.locator("#sweep-chart circle.sweep-point")).to_have_count(2)

        page.select_option("#models", job["id"])
        page.fill("#max-tokens", "8")
        page.click("#generate")
        expect(page.locator("#completion")).to_have_attribute("data-done", "true")
        assert page.locator("#completion").inner_text().startswith("The capital of France is")
        _shot(page, tmp_path, "dashboard-sweep-playground.png")
        browser.close()
