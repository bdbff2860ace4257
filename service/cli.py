"""The ``rsavq`` entry point: service commands here, everything else from ``rsavq_core.cli``.

rsavq serve [--host H] [--port P] [--data-dir D]   API + one worker + the generation server,
                                                     SQLite + embedded broker
rsavq worker [--data-dir D]                          a Celery worker on the gpu queue
rsavq generation-server [--port P] [--data-dir D]    the GPU process behind /v1/completions
rsavq db upgrade [--data-dir D]                      alembic upgrade head
rsavq keys create NAME | revoke NAME [--data-dir D]  API keys (the new key is the last line)
rsavq submit MODEL --bits B | status ID | wait ID | download ID | cancel ID   the HTTP client
rsavq quantize | eval | generate | ablation          the library on its own (rsavq_core.cli)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from rsavq_core.cli import run_parsed
from rsavq_core.errors import RSAVQError

SERVICE_COMMANDS = ("serve", "worker", "db", "keys", "submit", "status", "wait", "download", "cancel", "metrics")
log = logging.getLogger("rsavq")


def _settings(args: argparse.Namespace) -> Any:
    from service.settings import Settings

    settings = Settings.from_env(getattr(args, "data_dir", None))
    settings.ensure_dirs()
    return settings


def worker_command(concurrency: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        "gpu",
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        "INFO",
        "-n",
        f"rsavq-{os.getpid()}@%h",
    ]


def _die_with_parent() -> None:
    """Linux: the embedded worker gets SIGTERM when `rsavq serve` dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _child(command: list[str], settings: Any, log_name: str) -> subprocess.Popen[bytes]:
    """A process that lives and dies with `rsavq serve`, logging to the data dir."""
    log_file = open(settings.data_dir / log_name, "ab")  # noqa: SIM115 - lives as long as the child
    child = subprocess.Popen(
        command,
        env={**os.environ, **settings.to_env()},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    sys.stderr.write(f"rsavq: {command[2]} pid {child.pid}, log {settings.data_dir / log_name}\n")
    return child


def generation_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "worker.generation_server", "--host", host, "--port", str(port)]


def cmd_serve(args: argparse.Namespace) -> str:
    import dataclasses

    import uvicorn

    from service.app import create_app
    from service.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url)
    children = []
    if not args.no_worker:
        children.append(_child(worker_command(), settings, "worker.log"))
    if not args.no_generation and settings.generation_url is None:
        port = args.generation_port or args.port + 1
        children.append(_child(generation_command(port), settings, "generation.log"))
        settings = dataclasses.replace(settings, generation_url=f"http://127.0.0.1:{port}")
    sys.stderr.write(f"rsavq: API on http://{args.host}:{args.port} (docs at /docs), data in {settings.data_dir}\n")
    try:
        # A bounded graceful shutdown: open event streams or generations must not keep it alive.
        uvicorn.run(
            create_app(settings), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10
        )
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    return ""


def cmd_generation_server(args: argparse.Namespace) -> str:
    settings = _settings(args)
    os.environ.update(settings.to_env())
    from worker.generation_server import main as serve_generation

    argv = ["--host", args.host, "--port", str(args.port)]
    if args.device:
        argv += ["--device", args.device]
    if args.memory_gb is not None:
        argv += ["--memory-gb", str(args.memory_gb)]
    serve_generation(argv)
    return ""


def cmd_worker(args: argparse.Namespace) -> str:
    settings = _settings(args)
    os.environ.update(settings.to_env())
    os.execvp(sys.executable, worker_command(args.concurrency))  # replaces this process: signals reach Celery


def cmd_db(args: argparse.Namespace) -> str:
    from service.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url, args.revision)
    return f"database at revision {args.revision}"


def cmd_keys(args: argparse.Namespace) -> str:
    from service.auth import create_key, revoke_key
    from service.db import session_factory
    from service.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.database_url)  # a fresh data dir works without a separate `db upgrade`
    with session_factory(settings.database_url)() as session:
        if args.action == "create":
            key = create_key(session, args.name, args.tenant)
            return f"created API key {args.name!r} for tenant {args.tenant or args.name!r}; it is shown once:\n{key}"
        return f"revoked {revoke_key(session, args.name)} key(s) named {args.name!r}"


def _client(args: argparse.Namespace) -> Any:
    from service.client import Client

    return Client(args.server, args.key)


def cmd_submit(args: argparse.Namespace) -> dict[str, Any]:
    options = json.loads(args.options) if args.options else {}
    job = _client(args).submit(args.model, args.bits, args.method, options, args.idempotency_key)
    return job


def cmd_wait(args: argparse.Namespace) -> dict[str, Any]:
    from service.client import print_progress

    job = _client(args).wait(args.job_id, poll=args.poll, on_progress=None if args.quiet else print_progress)
    if not args.quiet:
        sys.stderr.write("\n")
    if job["status"] != "succeeded":
        raise RSAVQError(f"job {job['id']} {job['status']}: {job.get('error') or ''}")
    return job


def cmd_download(args: argparse.Namespace) -> str:
    client = _client(args)
    out = Path(args.out or f"rsavq-{args.job_id}.tar")
    client.download(args.job_id, out)
    if args.extract:
        from service.artifacts import extract

        return str(extract(out, out.with_suffix("")))
    return str(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rsavq", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", help="database, broker and artifacts (default $RSAVQ_DATA_DIR or ./rsavq-data)")

    s = sub.add_parser("serve", help="run the API and one worker on this machine")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    s.add_argument(
        "--no-generation",
        action="store_true",
        help="no generation server (or set RSAVQ_GENERATION_URL to one running elsewhere)",
    )
    s.add_argument("--generation-port", type=int, help="its port (default: the API's port + 1)")
    data_dir(s)
    s.set_defaults(func=cmd_serve)
    g = sub.add_parser("generation-server", help="run the generation server (GPU) behind /v1/completions")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8001)
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    g.add_argument("--memory-gb", type=float, help="cap on the loaded models' memory (LRU eviction)")
    data_dir(g)
    g.set_defaults(func=cmd_generation_server)
    w = sub.add_parser("worker", help="run a quantization worker (Celery, queue 'gpu')")
    w.add_argument("--concurrency", type=int, default=1, help="jobs at once (one per GPU)")
    data_dir(w)
    w.set_defaults(func=cmd_worker)
    d = sub.add_parser("db", help="database schema")
    d.add_argument("action", choices=["upgrade"])
    d.add_argument("--revision", default="head")
    data_dir(d)
    d.set_defaults(func=cmd_db)
    k = sub.add_parser("keys", help="create or revoke API keys")
    k.add_argument("action", choices=["create", "revoke"])
    k.add_argument("name")
    k.add_argument("--tenant", help="tenant of a new key (default: its name)")
    data_dir(k)
    k.set_defaults(func=cmd_keys)

    def remote(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", help="API URL (default $RSAVQ_SERVER or http://127.0.0.1:8000)")
        p.add_argument("--key", help="API key (default $RSAVQ_API_KEY)")

    c = sub.add_parser("submit", help="submit a quantization job")
    c.add_argument("model")
    c.add_argument("--bits", type=float, required=True)
    c.add_argument("--method", default="rsavq")
    c.add_argument("--options", help='JSON, e.g. \'{"calib_samples": 8, "evaluation": {"zero_shot": "all"}}\'')
    c.add_argument("--idempotency-key")
    c.set_defaults(func=cmd_submit)
    for name, func, text in (
        ("status", lambda a: _client(a).job(a.job_id), "a job's state"),
        ("metrics", lambda a: _client(a).metrics(a.job_id), "a job's metrics"),
        ("cancel", lambda a: _client(a).cancel(a.job_id), "cancel a job"),
        ("wait", cmd_wait, "wait for a job, with a progress bar"),
        ("download", cmd_download, "download (resumable) and verify a job's artifact"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        p.set_defaults(func=func)
        remote(p)
    remote(c)
    sub.choices["wait"].add_argument("--poll", type=float, default=1.0)
    sub.choices["wait"].add_argument("--quiet", action="store_true")
    sub.choices["download"].add_argument("--out", help="file to write (default rsavq-<id>.tar)")
    sub.choices["download"].add_argument("--extract", action="store_true", help="unpack the checkpoint folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SERVICE_COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            sys.stdout.write(__doc__ or "")
        from rsavq_core.cli import main as core_main

        return core_main(argv)
    args = build_parser().parse_args(argv)
    # servers log what they do; client commands print results, not library chatter
    return run_parsed(args, verbose=args.command in ("serve", "worker"))


if __name__ == "__main__":
    raise SystemExit(main())
