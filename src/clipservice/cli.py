"""The ``clipservice`` command line: serve (and, as they land, worker and clip)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clipservice import __version__
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
    return parser


def _load(path: str | None) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"clipservice: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from clipservice.app import create_app
    from clipservice.logging import configure_logging

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
    web.run_app(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        shutdown_timeout=settings.server.shutdown_grace_s,
        access_log=None,
        print=lambda msg: print(msg, file=sys.stderr),
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    import asyncio

    from clipservice.jobs.distributed import run_worker
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
    return 2  # pragma: no cover - argparse already refused unknown commands
