"""The ``clipservice`` command line: serve, worker, clip."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipservice import __version__, cli_clip
from clipservice.config import ConfigError, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipservice", description="Cut clips out of online videos with FFmpeg, over HTTP."
    )
    parser.add_argument("--version", action="version", version=f"clipservice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP API and the in-process job runner")
    serve.add_argument("--config", help="TOML config file (default: ./config.toml if present)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")

    worker = sub.add_parser("worker", help="cut clips for the distributed mode (needs queue.url)")
    worker.add_argument("--config", help="TOML config file (default: ./config.toml if present)")
    cli_clip.add_parser(sub)
    return parser


def _load(path: str | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"clipservice: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from clipservice.logging import configure_logging
    from clipservice.server import ListenError, serve

    settings = _load(args.config)
    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if overrides:
        try:
            settings = settings.replace(server=overrides)
        except ValueError as exc:
            print(f"clipservice: {exc}", file=sys.stderr)
            return 2
    configure_logging()
    try:
        asyncio.run(serve(settings))
    except ListenError as exc:
        print(f"clipservice: {exc}", file=sys.stderr)
        return 1
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio

    from clipservice.jobs.worker import run_worker
    from clipservice.logging import configure_logging

    settings = _load(args.config)
    if not settings.queue.url:
        print(
            "clipservice: the worker needs queue.url (the Redis URL the API nodes use)",
            file=sys.stderr,
        )
        return 2
    configure_logging()
    asyncio.run(
        run_worker(settings.replace(storage={"data_dir": settings.storage.data_dir.resolve()}))
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "worker":
        return _worker(args)
    if args.command == "clip":
        return cli_clip.run(args)
    return 2  # pragma: no cover - argparse already refused unknown commands
