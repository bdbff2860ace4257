"""The HTTP client of a running service: submit, status, metrics, wait, download, cancel."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsavq_core.errors import ConfigError, RSAVQError
from service.cli.flags import add_config_flags, knobs_from_args
from service.cli.progress import JobEvents

if TYPE_CHECKING:
    from service.client import Client


def _client(args: argparse.Namespace) -> Client:
    from service.client import Client

    return Client(args.server, args.key)


def cmd_submit(args: argparse.Namespace) -> dict[str, Any]:
    options = {**_options(args), **knobs_from_args(args, exclude=("bits",))}
    result: dict[str, Any] = _client(args).submit(args.model, args.bits, args.method, options, args.idempotency_key)
    return result


def cmd_sweep(args: argparse.Namespace) -> str:
    """Submit one job per budget; with --wait follow them to the end. Prints the sweep's table."""
    options = {**_options(args), **knobs_from_args(args, exclude=("bits",))}
    client = _client(args)
    sweep = client.sweep(args.model, args.bits, args.method, options, args.name, args.idempotency_key)
    if args.wait:
        for row in sweep["rows"]:
            client.wait(row["job_id"], poll=args.poll)
        sweep = client.get_sweep(sweep["id"])
    return sweep_table(sweep)


def sweep_table(sweep: dict[str, Any]) -> str:
    """The sweep's budgets side by side, as text."""

    def cell(value: Any, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        f"sweep {sweep['id']}  {sweep['model_id']}  {sweep['method']}  {sweep['status']}",
        f"{'bits':>5}  {'status':<10}  {'bpw':>7}  {'size MB':>8}  {'perplexity':>10}  {'zero-shot':>9}  job",
    ]
    for r in sweep["rows"]:
        size = None if r["artifact_bytes"] is None else r["artifact_bytes"] / 1e6
        lines.append(
            f"{r['bits']:>5g}  {r['status']:<10}  {cell(r['effective_bpw'], '7.4f')}  {cell(size, '8.1f')}  "
            f"{cell(r['perplexity'], '10.2f')}  {cell(r['zero_shot'], '9.3f')}  {r['job_id'] or '-'}"
        )
    return "\n".join(lines) + "\n"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--options is not valid JSON: {exc}") from exc
    if not isinstance(options, dict):
        raise ConfigError("--options must be a JSON object")
    return options


def cmd_wait(args: argparse.Namespace) -> dict[str, Any]:
    events = JobEvents(not args.quiet)
    try:
        job: dict[str, Any] = _client(args).wait(args.job_id, poll=args.poll, on_event=events)
    finally:
        events.close()
    if job["status"] != "succeeded":
        raise RSAVQError(f"job {job['id']} {job['status']}: {job.get('error') or ''}")
    return job


def cmd_dataset_upload(args: argparse.Namespace) -> dict[str, Any]:
    """Upload a text file as a dataset; JSONL when its name ends in .jsonl / .ndjson (or --jsonl)."""
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    jsonl = args.jsonl or path.suffix.lower() in (".jsonl", ".ndjson")
    content_type = "application/jsonl" if jsonl else "text/plain"
    return _client(args).upload_dataset(args.name or path.stem, path.read_bytes(), content_type)


def cmd_download(args: argparse.Namespace) -> str:
    out = Path(args.out or f"rsavq-{args.job_id}.tar")
    _client(args).download(args.job_id, out)
    if args.extract:
        from service.artifacts import extract

        return str(extract(out, out.with_suffix("")))
    return str(out)


def _remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="API URL (default $RSAVQ_SERVER or http://127.0.0.1:8000)")
    p.add_argument("--key", help="API key (default $RSAVQ_API_KEY)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("submit", help="submit a quantization job to a running service")
    s.add_argument("model")
    s.add_argument("--options", help='more options as JSON, e.g. \'{"evaluation": {"zero_shot": "all"}}\' (flags win)')
    s.add_argument("--idempotency-key", help="resubmitting with the same key returns the same job")
    add_config_flags(s)
    _remote_flags(s)
    s.set_defaults(func=cmd_submit)
    w = sub.add_parser("sweep", help="quantize one model at several bit budgets on a running service; prints a table")
    w.add_argument("model")
    w.add_argument("--name", help="names the jobs <name>-<bits>bit")
    w.add_argument("--options", help="more options as JSON, as for submit (flags win)")
    w.add_argument("--wait", action="store_true", help="follow every job to its end, then print the table")
    w.add_argument("--poll", type=float, default=1.0, help="seconds before reconnecting a broken event stream")
    w.add_argument("--idempotency-key", help="resubmitting with the same key returns the same sweep")
    add_config_flags(w, several_bits=True)
    _remote_flags(w)
    w.set_defaults(func=cmd_sweep)
    d = sub.add_parser(
        "dataset-upload",
        help="upload your own text (plain: documents at blank lines; .jsonl: a 'text' per line); prints its id",
    )
    d.add_argument("file")
    d.add_argument("--name", help="its name in reports (default: the file's stem)")
    d.add_argument("--jsonl", action="store_true", help="JSONL whatever the file's suffix")
    _remote_flags(d)
    d.set_defaults(func=cmd_dataset_upload)
    t = sub.add_parser("sweep-status", help="a sweep's budgets side by side: bpw, size, perplexity, zero-shot")
    t.add_argument("sweep_id")
    _remote_flags(t)
    t.set_defaults(func=lambda a: sweep_table(_client(a).get_sweep(a.sweep_id)))
    for name, func, text in (
        ("status", lambda a: _client(a).job(a.job_id), "a job's state, progress and per-layer reports"),
        ("wait", cmd_wait, "follow a job's progress until it ends"),
        ("download", cmd_download, "download (resumable) and verify a job's artifact"),
        ("cancel", lambda a: _client(a).cancel(a.job_id), "cancel a job"),
        ("metrics", lambda a: _client(a).metrics(a.job_id), "a job's metrics: perplexity, zero-shot, bpw, sizes"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id")
        _remote_flags(p)
        p.set_defaults(func=func)
    wait = sub.choices["wait"]
    wait.add_argument("--poll", type=float, default=1.0, help="seconds before reconnecting a broken event stream")
    wait.add_argument("--quiet", action="store_true", help="no progress bars")
    download = sub.choices["download"]
    download.add_argument("--out", help="file to write (default rsavq-<id>.tar)")
    download.add_argument("--extract", action="store_true", help="unpack the checkpoint folder")
