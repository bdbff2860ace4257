"""/v1/completions, /v1/chat/completions and /v1/models through the official ``openai`` client.

A real API server and a real generation server run (uvicorn, on loopback ports) over a real
quantized model: the bundled SmolLM2 at 4-bit RTN, published into the artifact store as a
succeeded job. Answers are checked against the library generating from the same artifact.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam
from pydantic import SecretStr

from rsavq_core.config.quant_config import QuantConfig
from rsavq_core.runtime.generation import SamplingParams, complete
from service.api.auth import create_key
from service.artifacts import ArtifactStore
from service.db import Artifact, Job, session_factory
from service.jobs import RUNNING, SUCCEEDED
from service.settings import Settings
from tests.timing import patience

PROMPT = "The capital of France is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A uvicorn server in a thread, stopped on exit."""

    def __init__(self, app: Any) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rsavq_core.pipeline.quantize import quantize_model, save_result

    out = tmp_path_factory.mktemp("rtn4") / "ckpt"
    result = quantize_model("smollm2-135m", QuantConfig.for_method("rtn", bits=4))
    save_result(result, out)
    return out


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    from rsavq_core.runtime import load_quantized_model

    model, tokenizer, _ = load_quantized_model(checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[dict[str, Any]]:
    """API + generation server over one database holding a succeeded and a running job."""
    from service.api.app import create_app
    from service.migrate import upgrade
    from worker.generation.server import create_app as create_generation_app

    root = tmp_path_factory.mktemp("data")
    settings = Settings.from_env(root)
    settings = settings.model_copy(
        update=dict(
            database_url=f"sqlite:///{root / 'rsavq.db'}",
            broker_url=f"sqla+sqlite:///{root / 'broker.db'}",
            artifact_dir=root / "artifacts",
            generation_token=SecretStr("test-secret"),
        )
    )
    settings.ensure_dirs()
    upgrade(settings.database_url)
    sessions = session_factory(settings.database_url)
    done_id, running_id = uuid.uuid4().hex, uuid.uuid4().hex
    relative, size, sha = ArtifactStore(settings.artifact_dir).publish(done_id, checkpoint)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with sessions() as session:
        keys = {"alice": create_key(session, "alice"), "bob": create_key(session, "bob")}
        for job_id, status, name in ((done_id, SUCCEEDED, "smol-rtn4"), (running_id, RUNNING, "smol-later")):
            session.add(
                Job(
                    id=job_id,
                    tenant="alice",
                    model_id="smollm2-135m",
                    name=name,
                    method="rtn",
                    bits=4.0,
                    options={},
                    status=status,
                    stage=status,
                    request_hash="x",
                    finished_at=now,
                )
            )
        session.flush()  # the jobs first: the artifact row references one
        session.add(Artifact(job_id=done_id, path=relative, size=size, sha256=sha))
        session.commit()
    with _Server(create_generation_app(settings, device="cpu", memory_gb=4)) as gen_url:
        api_settings = settings.model_copy(update=dict(generation_url=gen_url, generation_default_max_tokens=5))
        with _Server(create_app(api_settings)) as api_url:
            yield {
                "url": api_url,
                "keys": keys,
                "done": done_id,
                "running": running_id,
                "unconfigured": create_app(settings),
                "generation_url": gen_url,
                "settings": api_settings,
            }


def _client(stack: dict[str, Any], who: str = "alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=stack["keys"][who], max_retries=0, timeout=120)


def test_completion_matches_the_library(stack: dict[str, Any], reference) -> None:
    model, tokenizer = reference
    ids = tokenizer(PROMPT)["input_ids"]
    expected = complete(model, tokenizer, ids, SamplingParams(max_tokens=8, temperature=0))
    out = _client(stack).completions.create(model=stack["done"], prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == stack["done"]
    assert out.choices[0].text == expected.text and expected.text.strip()
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), expected.completion_tokens)
    assert out.usage.total_tokens == len(ids) + expected.completion_tokens


def test_stream_concatenates_to_the_same_text(stack: dict[str, Any]) -> None:
    client = _client(stack)
    whole = client.completions.create(model="smol-rtn4", prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(
        client.completions.create(
            model="smol-rtn4",
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2, "deltas arrive one by one"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert whole.usage is not None
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_sequences_and_seeds(stack: dict[str, Any]) -> None:
    client = _client(stack)
    free = client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text.strip()[1:3]  # two characters that do occur in the greedy continuation
    cut = client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(
            model=stack["done"], prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=seed
        )
        .choices[0]
        .text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]


def test_chat_completion_stream_and_not(stack: dict[str, Any]) -> None:
    client = _client(stack)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=stack["done"], messages=messages, max_tokens=6, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None
    assert whole.choices[0].message.content and whole.usage.prompt_tokens > 5  # the chat template was applied
    chunks = list(
        client.chat.completions.create(model=stack["done"], messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_models_lists_only_the_tenants_succeeded_jobs(stack: dict[str, Any]) -> None:
    import httpx

    assert httpx.get(stack["url"] + "/health").json()["generation"] == "ok"
    assert [m.id for m in _client(stack).models.list()] == [stack["done"]]
    assert list(_client(stack, "bob").models.list()) == []


def test_clear_errors_in_openai_shape(stack: dict[str, Any]) -> None:
    client = _client(stack)
    with pytest.raises(openai.NotFoundError, match="no model"):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):  # another tenant's job is not visible
        _client(stack, "bob").completions.create(model=stack["done"], prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.ConflictError, match="running"):
        client.completions.create(model=stack["running"], prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=2, temperature=5)
    with pytest.raises(openai.UnprocessableEntityError, match="echo and logprobs are not supported with stream"):
        client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=2, logprobs=2, stream=True)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens 0 returns nothing"):
        client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs"):
        client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=1, logprobs=6)
    with pytest.raises(openai.UnprocessableEntityError, match="context"):  # within the cap, past the context
        client.completions.create(model=stack["done"], prompt=" ".join([PROMPT] * 1500), max_tokens=4000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_no_generation_server_is_a_503(stack: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    with TestClient(stack["unconfigured"]) as api:
        r = api.post(
            "/v1/completions",
            json={"model": stack["done"], "prompt": PROMPT},
            headers={"Authorization": f"Bearer {stack['keys']['alice']}"},
        )
    assert r.status_code == 503 and "RSAVQ_GENERATION_URL" in r.json()["error"]["message"]


def test_model_pool_evicts_least_recently_used(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from rsavq_core.errors import InsufficientMemoryError
    from worker.generation.model_pool import ModelPool

    store = ArtifactStore(tmp_path / "artifacts")
    published = {}
    for name in "abc":  # three artifacts of one model: a note makes their bytes (and digests) differ
        folder = tmp_path / name
        shutil.copytree(checkpoint, folder)
        (folder / "note.txt").write_text(name)
        relative, _, sha = store.publish(name, folder)
        published[name] = (relative, sha)
    a, b, c = (published[n] for n in "abc")
    probe = ModelPool(store, tmp_path / "cache", torch.device("cpu"), cap_bytes=float("inf"))
    one = probe.get(*a).nbytes
    pool = ModelPool(store, tmp_path / "cache", torch.device("cpu"), cap_bytes=2.5 * one)
    pool.get(*a)
    pool.get(*b)
    pool.get(*a)  # a is now the most recently used
    pool.get(*c)
    assert list(pool.models) == [a[1], c[1]], "b, the least recently used, is evicted"
    with pytest.raises(InsufficientMemoryError, match="cap"):
        ModelPool(store, tmp_path / "cache", torch.device("cpu"), cap_bytes=one / 2).get(*a)
    tokenizing = ModelPool(store, tmp_path / "cache", torch.device("cpu"), cap_bytes=float("inf"))
    monkeypatch.setattr("worker.generation.model_pool.MAX_TOKENIZERS", 2)
    for artifact in (a, b, a, c):  # tokenizer-only entries (/tokenize) are bounded too, LRU
        tokenizing.tokenizer(*artifact)
    assert list(tokenizing.tokenizers) == [a[1], c[1]] and not tokenizing.models


def test_the_pool_loads_only_an_artifact_with_the_digest_asked_for(tmp_path: Path, checkpoint: Path) -> None:
    import torch

    from service.errors import ArtifactDigestError
    from worker.generation.model_pool import ModelPool

    store = ArtifactStore(tmp_path / "artifacts")
    relative, _, sha = store.publish("job", checkpoint)
    pool = ModelPool(store, tmp_path / "cache", torch.device("cpu"), cap_bytes=float("inf"))
    with pytest.raises(ArtifactDigestError, match="does not have sha256"):
        pool.get(relative, "0" * 64)  # made up
    with pytest.raises(ArtifactDigestError, match="escapes the store"):
        pool.get("../../etc/passwd", sha)
    with pytest.raises(ArtifactDigestError, match="no artifact"):
        pool.get("other/other.tar", sha)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing unpacked
    assert pool.get(relative, sha).nbytes > 0


def test_a_client_that_hangs_up_does_not_block_the_next(stack: dict[str, Any]) -> None:
    """Closing a stream mid-way cancels that generation; the device is free for the next request."""
    client = _client(stack)
    stream = client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    started = time.monotonic()
    out = client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.usage is not None
    assert out.usage.completion_tokens == 3
    assert time.monotonic() - started < patience(30), "the abandoned generation (200 tokens) was not cancelled"


def test_several_prompts_and_token_id_prompts(stack: dict[str, Any], reference) -> None:
    _, tokenizer = reference
    client = _client(stack)
    ids = tokenizer(PROMPT)["input_ids"]
    out = client.completions.create(model=stack["done"], prompt=[PROMPT, "Water boils at"], max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    by_ids = client.completions.create(model=stack["done"], prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == out.choices[0].text
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(ids) + len(tokenizer("Water boils at")["input_ids"])
    with pytest.raises(openai.UnprocessableEntityError, match="token ids"):
        client.completions.create(model=stack["done"], prompt=[10**9], max_tokens=2)


def test_the_generation_server_answers_only_the_api(stack: dict[str, Any], tmp_path: Path) -> None:
    import httpx

    from rsavq_core.errors import ConfigError
    from service.settings import Settings
    from worker.generation.server import create_app as create_generation_app

    url = stack["generation_url"]
    assert httpx.get(url + "/health").status_code == 200
    body = {"artifact": "x/x.tar", "sha256": "0" * 64, "prompt": "hi"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic test-secret"}):
        refused = httpx.post(url + "/generate", json=body, headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(url + "/loaded").status_code == 401
    made_up = httpx.post(url + "/generate", json=body, headers={"Authorization": "Bearer test-secret"})
    assert made_up.status_code == 409  # past the secret: the digest check
    with pytest.raises(ConfigError, match="RSAVQ_GENERATION_TOKEN"):
        create_generation_app(Settings.from_env(tmp_path), device="cpu", memory_gb=1)


def test_generation_is_bounded_in_tokens_time_and_listeners(stack: dict[str, Any]) -> None:
    """A default and a cap for new tokens, a deadline, and a non-streamed request whose client
    leaves stops generating (the next request does not wait for it)."""
    import httpx

    from service.api.app import create_app

    client = _client(stack)
    chat = client.chat.completions.create(model=stack["done"], messages=[{"role": "user", "content": "Count"}])
    assert chat.usage is not None
    assert chat.usage.completion_tokens <= 5  # the configured default, not up to the context
    with pytest.raises(openai.UnprocessableEntityError, match="at most 4096"):
        client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=5000)
    headers = {"Authorization": f"Bearer {stack['keys']['alice']}"}
    body = {"model": stack["done"], "prompt": PROMPT, "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a long non-streamed completion
        httpx.post(stack["url"] + "/v1/completions", json=body, headers=headers, timeout=3)
    started = time.monotonic()
    out = client.completions.create(model=stack["done"], prompt=PROMPT, max_tokens=2, temperature=0)
    assert out.usage is not None
    assert out.usage.completion_tokens == 2
    assert time.monotonic() - started < patience(30), "the abandoned non-streamed generation was not cancelled"
    hurried = stack["settings"].model_copy(update={"generation_deadline_s": 1.0})
    with _Server(create_app(hurried)) as url:
        late = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert late.status_code == 504 and "deadline" in late.json()["error"]["message"]


def test_one_tenant_s_concurrent_completions_are_bounded(stack: dict[str, Any]) -> None:
    import httpx

    from service.api.app import create_app

    headers = {"Authorization": f"Bearer {stack['keys']['alice']}"}
    counting = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy decoding keeps counting: no early end of text
    long = {"model": stack["done"], "prompt": counting, "max_tokens": 400, "temperature": 0, "stream": True}
    short = {"model": stack["done"], "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    app = create_app(stack["settings"].model_copy(update={"tenant_max_generations": 1}))
    with _Server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json=long, headers=headers, timeout=60) as held:
            lines = held.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # the first completion is running
            refused = httpx.post(url + "/v1/completions", json=short, headers=headers, timeout=60)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
        time.sleep(1.0)  # the closed stream gives its slot back
        assert httpx.post(url + "/v1/completions", json=short, headers=headers, timeout=60).status_code == 200
