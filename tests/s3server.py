"""A real S3 API on localhost for tests and the storage bench: moto's server (HTTP, in a thread of this process), with
fake credentials and its endpoint in the environment, as a job on a cluster would get them (AWS_* variables)."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Dict, Iterator

SECRET = "fake-secret-key-never-printed"  # tests check that no message or file holds it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1:`port`. `stop()` makes it stop answering; `start()` again serves what was stored
    (moto keeps its buckets in this process)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on stderr
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self) -> Dict[str, str]:
        """What a job needs to reach it: fake credentials, the endpoint, no config files of the machine."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@contextlib.contextmanager
def s3_server(monkeypatch) -> Iterator[S3Server]:
    """A started server with its environment set through `monkeypatch` (subprocesses inherit it); fsspec's cached
    filesystems are dropped so that none keeps another endpoint."""
    import s3fs

    server = S3Server().start()
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield server
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
