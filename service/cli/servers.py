"""The service's processes on this machine: serve, worker, generation-server, db, keys.

``serve`` runs the API in this process and starts its worker and generation server as children by
their command lines; ``worker`` and ``generation-server`` replace this process with theirs (so
signals reach them directly). Each gets its settings through the environment (``Settings.to_env``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

from pydantic import SecretStr

from rsavq_core.errors import ConfigError
from service.cli.flags import placement_flags, placement_settings
from service.settings import Settings

LOGGING_COMMANDS = ("serve", "worker", "generation-server")
GENERATION_MODULE = "worker.generation.server"


def _settings(args: argparse.Namespace, **values: Any) -> Settings:
    settings = Settings.from_env(getattr(args, "data_dir", None), **values)
    settings.ensure_dirs()
    return settings


def worker_command(concurrency: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--pool", "prefork",
        "--concurrency", str(concurrency), "--prefetch-multiplier", "1", "--loglevel", "INFO",
        "-n", f"rsavq-{os.getpid()}@%h",
    ]  # fmt: skip


def generation_command() -> list[str]:
    return [sys.executable, "-m", GENERATION_MODULE]


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM when `rsavq serve` dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _child(command: list[str], settings: Settings, log_name: str) -> subprocess.Popen[bytes]:
    """A process that lives and dies with `rsavq serve`, logging to the data dir."""
    log_file = open(settings.data_dir / log_name, "ab")  # lives as long as the child
    child = subprocess.Popen(
        command,
        env={**os.environ, **settings.to_env()},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    sys.stderr.write(f"rsavq: {' '.join(command[1:3])} pid {child.pid}, log {settings.data_dir / log_name}\n")
    return child


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.api.app import create_app
    from service.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url)
    children = []
    if not args.no_worker:
        children.append(_child(worker_command(), settings, "worker.log"))
    if not args.no_generation and settings.generation_url is None:
        if settings.generation_token is None:  # this API and its own generation server: a fresh secret
            settings = settings.model_copy(update={"generation_token": SecretStr(secrets.token_urlsafe(32))})
        port = args.generation_port or args.port + 1
        generation = settings.model_copy(update={"generation_host": "127.0.0.1", "generation_port": port})
        children.append(_child(generation_command(), generation, "generation.log"))
        settings = settings.model_copy(update={"generation_url": f"http://127.0.0.1:{port}"})
    sys.stderr.write(f"rsavq: API on http://{args.host}:{args.port} (docs at /docs), data in {settings.data_dir}\n")
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default action that
    # would end this process before ``finally`` stops the children.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        # A bounded graceful shutdown: open event streams or generations must not keep it alive.
        uvicorn.run(
            create_app(settings), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10
        )
    finally:
        stop_children(children)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _signal_group(child: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(child.pid, sig)  # each child leads its own session, so its group holds its children
    except ProcessLookupError:
        pass  # the whole group is gone already


def stop_children(children: list[subprocess.Popen[bytes]], grace_s: float = 10.0) -> None:
    """SIGTERM to each child, then SIGKILL to whatever is left of its process group after ``grace_s``.

    The first signal goes to the child alone: Celery's pool process, interrupted by a SIGTERM of
    its own, would record its job as crashed (measured: a half-done import failed it). The group
    afterwards: Celery's warm shutdown waits for the running job, which would outlive ``rsavq
    serve``. A job killed there is not lost: its lease runs out, the reaper re-queues it, and it
    resumes from its layer checkpoints.
    """
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:
        _signal_group(child, signal.SIGKILL)
        child.wait()


def cmd_generation_server(args: argparse.Namespace) -> None:
    given = {"generation_host": args.host, "generation_port": args.port, "generation_device": args.device,
             "generation_memory_gb": args.memory_gb}  # fmt: skip
    settings = _settings(args, **{k: v for k, v in given.items() if v is not None})
    if settings.generation_token is None:  # said here, not as the child's traceback
        raise ConfigError("set RSAVQ_GENERATION_TOKEN: the secret the API shows the generation server")
    os.execvpe(sys.executable, generation_command(), {**os.environ, **settings.to_env()})


def cmd_worker(args: argparse.Namespace) -> None:
    settings = _settings(args, **placement_settings(args))
    # Replaces this process: signals reach Celery.
    os.execvpe(sys.executable, worker_command(args.concurrency), {**os.environ, **settings.to_env()})


def cmd_db(args: argparse.Namespace) -> str:
    from service.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url, args.revision)
    return f"database at revision {args.revision}"


def cmd_keys(args: argparse.Namespace) -> str:
    from service.api.auth import create_key, revoke_key
    from service.db import session_factory
    from service.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url)  # a fresh data dir works without a separate `db upgrade`
    with session_factory(settings.database_url)() as session:
        if args.action == "create":
            key = create_key(session, args.name, args.tenant)
            return f"created API key {args.name!r} for tenant {args.tenant or args.name!r}; it is shown once:\n{key}"
        return f"revoked {revoke_key(session, args.name)} key(s) named {args.name!r}"


def _data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="database, broker and artifacts (default $RSAVQ_DATA_DIR or ./rsavq-data)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the API, one worker and the generation server on this machine")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    s.add_argument(
        "--no-generation", action="store_true",
        help="no generation server (or set RSAVQ_GENERATION_URL to one running elsewhere)",
    )  # fmt: skip
    s.add_argument("--generation-port", type=int, help="its port (default: the API's port + 1)")
    _data_dir(s)
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run a quantization worker (Celery, queue 'gpu')")
    w.add_argument("--concurrency", type=int, default=1, help="jobs at once (one per GPU)")
    placement_flags(w)
    _data_dir(w)
    w.set_defaults(func=cmd_worker)

    g = sub.add_parser("generation-server", help="run the generation server (GPU) behind /v1/completions")
    g.add_argument("--host", help="default $RSAVQ_GENERATION_HOST or 127.0.0.1")
    g.add_argument("--port", type=int, help="default $RSAVQ_GENERATION_PORT or 8001")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    g.add_argument("--memory-gb", type=float, help="cap on the loaded models' memory (LRU eviction)")
    _data_dir(g)
    g.set_defaults(func=cmd_generation_server)

    d = sub.add_parser("db", help="create or upgrade the database schema (Alembic)")
    d.add_argument("action", choices=["upgrade"])
    d.add_argument("--revision", default="head")
    _data_dir(d)
    d.set_defaults(func=cmd_db)

    k = sub.add_parser("keys", help="create or revoke API keys")
    k.add_argument("action", choices=["create", "revoke"])
    k.add_argument("name")
    k.add_argument("--tenant", help="tenant of a new key (default: its name)")
    _data_dir(k)
    k.set_defaults(func=cmd_keys)
