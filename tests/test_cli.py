"""The command line: --help, --version, bad flags, and a real `serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from clipservice import __version__
from tests.conftest import free_port


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clipservice", *args], capture_output=True, text=True, timeout=60
    )


def test_version_and_help() -> None:
    """--version prints the version; --help lists the commands."""
    assert _run("--version").stdout.strip() == f"clipservice {__version__}"
    out = _run("--help")
    assert out.returncode == 0 and "serve" in out.stdout


def test_bad_flag_exits_2() -> None:
    """Unknown flags and commands exit 2 with a message."""
    for args in (("--bogus",), ("serve", "--port", "x"), ("frobnicate",), ()):
        proc = _run(*args)
        assert proc.returncode == 2, args
        assert proc.stderr


def test_serve_starts_and_answers(tmp_path: Path) -> None:
    """`clipservice serve` on built-in defaults answers /healthz and stops on SIGTERM."""
    port = free_port()
    env = {**os.environ, "CLIPSERVICE_STORAGE__DATA_DIR": str(tmp_path / "data")}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipservice", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert (tmp_path / "data" / "jobs").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0
