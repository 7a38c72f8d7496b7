"""Where checkpoints live: local folders, ``file://``, ``gs://`` and ``s3://``, one code path.

Every storage operation paramscope makes (list a folder, read a small file, tell a file from a
folder, hand TensorStore the kvstore of an array) goes through a :class:`Tree` here, over
TensorStore's own key-value stores (``file``, ``gcs``, ``s3``), so a local path and a URL are
read by the same code. Nothing here writes.

A tree is listed once, recursively (object stores have no folders, and TensorStore lists
without a delimiter): every later question about its layout is answered from that listing, so
the number of requests for metadata does not grow with the number of arrays.

Credentials and endpoints follow each ecosystem's conventions, read from the environment:

- GCS: Application Default Credentials; with ``STORAGE_EMULATOR_HOST`` set, that emulator and
  no credential lookup (as google-cloud-storage does).
- S3: the AWS environment variables, profiles, web-identity and container credentials
  (unsigned requests when none is found, which public buckets accept),
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores, ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paramscope.errors import CheckpointNotFound, StorageError, UsageError

REMOTE_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")

# Requests in flight per store kind, and bounded retries with backoff: streaming is limited by
# bandwidth rather than latency, and a dead endpoint fails within seconds instead of minutes
# (TensorStore's default is 32 retries with delays growing to 32 s).
DEFAULT_CONCURRENCY = 64
DEFAULT_RETRIES = 5
CONCURRENCY_ENV = "PARAMSCOPE_REQUEST_CONCURRENCY"
RETRIES_ENV = "PARAMSCOPE_REQUEST_RETRIES"
# Seconds a request may wait for a connection, or go without receiving a byte, before it is
# retried: a store that accepts a connection and then says nothing fails in about
# (retries + 1) x this, rather than TensorStore's 60 s per attempt.
DEFAULT_TIMEOUT = 5
TIMEOUT_ENV = "PARAMSCOPE_REQUEST_TIMEOUT"
# TensorStore's HTTP transport reads these once, when it first makes a request; set explicitly,
# they win over PARAMSCOPE_REQUEST_TIMEOUT.
_CURL_TIMEOUTS = (
    "TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS",
    "TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS",
)
_CURL_LOW_SPEED = "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES"


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``gs://``, ``s3://``, ``file://``) rather than a local path.

    >>> is_url("gs://bucket/run"), is_url("checkpoints/run")
    (True, False)
    """
    return _URL.match(str(path)) is not None


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
        if value < 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a non-negative integer", hint=f"unset {name}") from None
    return value


def _set_timeouts() -> None:
    """Gives TensorStore's HTTP transport the request timeout, before its first request."""
    seconds = max(1, _int_env(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    for name in _CURL_TIMEOUTS:
        os.environ.setdefault(name, str(seconds))
    os.environ.setdefault(_CURL_LOW_SPEED, "1")  # below 1 byte/s for that long: stalled


def _endpoint_s3() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _gcs_emulator() -> str | None:
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


def _use_gcs_emulator() -> None:
    """Points TensorStore's gcs driver at ``STORAGE_EMULATOR_HOST``, without credentials.

    TensorStore has no endpoint field for gcs: it reads ``TENSORSTORE_GCS_HTTP_URL`` when a store
    opens, and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` makes it skip credential discovery, so real
    credentials are never sent to an emulator.
    """
    emulator = _gcs_emulator()
    if emulator is not None:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


INDEX_CACHE = "cache_pool#ocdbt_index"
INDEX_CACHE_BYTES = 32 << 20


def _context_spec() -> tuple[tuple[str, Any], ...]:
    limit = max(1, _int_env(CONCURRENCY_ENV, DEFAULT_CONCURRENCY))
    retries = {
        "max_retries": _int_env(RETRIES_ENV, DEFAULT_RETRIES),
        "initial_delay": "0.1s",
        "max_delay": "2s",
    }
    return (
        # OCDBT index nodes only (orbax.py names this pool in its OCDBT specs): array chunks go
        # through the default pool, which caches nothing, so the memory budget bounds decoded data.
        (INDEX_CACHE, {"total_bytes_limit": INDEX_CACHE_BYTES}),
        ("gcs_request_concurrency", {"limit": limit}),
        ("gcs_request_retries", retries),
        ("s3_request_concurrency", {"limit": limit}),
        ("s3_request_retries", retries),
        ("aws_credentials", _aws_credentials()),
    )


def _aws_credentials() -> dict[str, str]:
    """The AWS credential source, found the way the AWS SDKs look: keys in the environment, a
    profile (``AWS_PROFILE``, ``~/.aws/credentials`` or ``config``), web-identity or container
    credentials; with none of them, unsigned requests, which public buckets accept.

    Each source is named directly: TensorStore's ``default`` chain logs an error line per missing
    profile file on every store it opens. EC2 instance roles work through a profile with
    ``credential_source = Ec2InstanceMetadata``.
    """
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {"type": "environment"}
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    files = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials"),
        os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config"),
    ]
    if profile or any(os.path.isfile(f) for f in files):
        return {"type": "profile", "profile": profile or "default"}
    roles = (
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    if any(os.environ.get(name) for name in roles):
        return {"type": "default"}
    return {"type": "anonymous"}


# The variables the context is made from: a process (or a test) that changes them gets a new
# context on its next store, and every other call reuses the one it has.
_CONTEXT_ENV = (
    CONCURRENCY_ENV,
    RETRIES_ENV,
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "HOME",
)


def context():
    """The TensorStore context of this process: shared connection and concurrency pools.

    Every kvstore and array paramscope opens uses it, so the request limits hold for the whole
    process rather than per array.
    """
    from paramscope.io.session import SESSION

    def make():
        import tensorstore as ts

        return ts.Context(dict(_context_spec()))

    return SESSION.context(tuple(os.environ.get(name) for name in _CONTEXT_ENV), make)


def credentials_hint(scheme: str) -> str:
    """Which credential mechanism is in use, for the hint of an access error."""
    if scheme == "gs":
        if _gcs_emulator():
            return f"the GCS emulator at STORAGE_EMULATOR_HOST={os.environ['STORAGE_EMULATOR_HOST']}"
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            return "GCS credentials from GOOGLE_APPLICATION_CREDENTIALS"
        return "GCS Application Default Credentials (`gcloud auth application-default login`)"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        where = "AWS credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    elif os.environ.get("AWS_PROFILE"):
        where = f"AWS credentials of profile AWS_PROFILE={os.environ['AWS_PROFILE']}"
    elif _aws_credentials()["type"] == "default":
        where = "AWS web-identity or container credentials"
    else:
        where = "no AWS credentials (unsigned requests; set AWS_ACCESS_KEY_ID or AWS_PROFILE)"
    endpoint = _endpoint_s3()
    return where + (f" at endpoint {endpoint}" if endpoint else "")


FILES_BYTES = 32 << 20  # small files a tree keeps once read


def rel_path(*parts: str) -> str:
    """Keys of a tree joined by ``/``, empty parts (the tree's own folder) left out.

    >>> rel_path("", "3", "params", "_METADATA"), rel_path("")
    ('3/params/_METADATA', '')
    """
    return "/".join(p for p in parts if p)


class Tree:
    """A folder, local or in a bucket, listed once and read through one TensorStore kvstore.

    Paths inside the tree are relative keys joined by ``/`` (``""`` is the folder itself).
    """

    def __init__(self, location: str | os.PathLike):
        text = os.fspath(location)
        self._keys: frozenset[str] | None = None
        self._root_is_file: bool | None = None
        self._children: dict[str, set[str]] | None = None
        self._files: dict[str, bytes | None] = {}  # small files read, the most recent last
        self._files_bytes = 0
        # what formats made of the tree's files (parsed documents), kept as long as the tree
        self.derived: dict[str, Any] = {}
        match = _URL.match(text)
        if match is None or match.group("scheme").lower() == "file":
            local = match.group("rest") if match else text
            if match and not local.startswith("/"):
                raise UsageError(f"malformed URL {text!r}", hint="write file:///absolute/path")
            folder = os.path.abspath(local)
            self.scheme, self.bucket = "file", None
            self.display = folder
            self._base: dict[str, Any] = {"driver": "file", "path": folder.rstrip("/") + "/"}
            return
        scheme = match.group("scheme").lower()
        if scheme not in REMOTE_SCHEMES:
            raise UsageError(
                f"unsupported URL scheme {scheme}:// in {text!r}",
                hint="use a local path, file://, gs:// or s3://",
            )
        bucket, _, prefix = match.group("rest").partition("/")
        prefix = "/".join(p for p in prefix.split("/") if p)
        if not bucket:
            raise UsageError(f"no bucket in {text!r}", hint=f"write {scheme}://BUCKET/PATH")
        self.scheme, self.bucket = scheme, bucket
        self.display = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
        self._base = {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket, "path": prefix}
        if scheme == "s3":
            endpoint = _endpoint_s3()
            if endpoint:
                self._base["endpoint"] = endpoint
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                self._base["aws_region"] = region
            elif endpoint:
                # S3-compatible stores rarely answer the region lookup TensorStore would make
                self._base["aws_region"] = "us-east-1"
        else:
            _use_gcs_emulator()
        _set_timeouts()
        _BUCKETS.add((scheme, bucket))

    @property
    def remote(self) -> bool:
        return self.scheme != "file"

    # -- paths -----------------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        """How a key of the tree is shown to people: a local path or a URL."""
        return self.display if not rel else f"{self.display}/{rel}"

    def spec(self, rel: str = "") -> dict[str, Any]:
        """The TensorStore kvstore spec of a folder of the tree (its path ends with ``/``)."""
        prefix = self._base["path"]
        parts = [p for p in (prefix.rstrip("/"), rel.strip("/")) if p]
        path = "/".join(parts)
        if self.scheme == "file":
            path = "/" + path.lstrip("/")
            return {**self._base, "path": path + "/" if path != "/" else "/"}
        # a bucket's root is the empty prefix: "/" would be a folder named "" inside it
        return {**self._base, "path": path + "/" if path else ""}

    # -- listing ---------------------------------------------------------------------------------

    def keys(self) -> frozenset[str]:
        """Every file of the tree, as relative keys; listed once."""
        if self._keys is None:
            self._keys = frozenset(k for k in self._list(self.spec()) if k)
        return self._keys

    def _folders(self) -> dict[str, set[str]]:
        """Every folder that holds a file (at any depth), with the names of its subfolders; made
        once from the listing, so that layout questions do not scan every key each time."""
        if self._children is None:
            children: dict[str, set[str]] = {}
            for key in self.keys():
                end = key.rfind("/")
                children.setdefault("", set())
                while end > 0:  # from the deepest folder up, until one already linked to its parent
                    folder = key[:end]
                    start = folder.rfind("/")
                    children.setdefault(folder, set())
                    name, siblings = folder[start + 1 :], children.setdefault(folder[: max(start, 0)], set())
                    if name in siblings:
                        break
                    if name:
                        siblings.add(name)
                    end = start
            self._children = children
        return self._children

    def _list(self, spec: dict[str, Any], seen: frozenset[str] = frozenset()) -> list[str]:
        import tensorstore as ts

        try:
            store = ts.KvStore.open(spec, context=context()).result()
            keys = [bytes(k).decode("utf-8", "replace") for k in store.list().result()]
        except Exception as err:  # TensorStore raises ValueError/RuntimeError subclasses
            failure = Failure.of(err)
            if failure.os_error == 20 or "non-directory" in failure.text:  # ENOTDIR: a local file,
                return []  # nothing listed, as for a bucket's object
            raise self.error(err, self.display) from None
        if self.scheme == "file":
            keys = self._through_links(spec["path"], keys, seen)
        return keys

    def _through_links(self, folder: str, keys: list[str], seen: frozenset[str] = frozenset()) -> list[str]:
        """The listing with each symlinked folder (a step or item linked in from elsewhere) listed
        too, as if it were here: TensorStore lists such a link as one key. A link to a folder
        already being listed (a cycle) is not followed again."""
        seen = seen | {os.path.realpath(folder)}
        out = []
        for key in keys:
            full = os.path.join(folder, key)
            if "/" in key or not os.path.islink(full) or not os.path.isdir(full):
                out.append(key)
                continue
            target = os.path.realpath(full)
            if target in seen or any(target.startswith(s.rstrip("/") + "/") for s in seen if s != "/"):
                continue
            inner = self._list({**self._base, "path": target.rstrip("/") + "/"}, seen)
            out += [f"{key}/{k}" for k in inner if k]
        return out

    def is_file(self, rel: str) -> bool:
        return rel in self.keys()

    def is_dir(self, rel: str) -> bool:
        return rel.rstrip("/") in self._folders()

    def exists(self, rel: str) -> bool:
        return self.is_file(rel) or self.is_dir(rel)

    def subdirs(self, rel: str = "") -> list[str]:
        """Names of the folders directly inside ``rel`` (folders that hold at least one file)."""
        return sorted(self._folders().get(rel.rstrip("/"), ()))

    def is_empty_folder(self) -> bool:
        """Whether the tree is a local folder with no file in it. Buckets have no folders, only
        keys, so an empty prefix there is simply missing."""
        return not self.remote and not self.keys() and os.path.isdir(self.display)

    def root_is_file(self) -> bool:
        """Whether the tree's own path names a file rather than a folder: one request for no
        bytes (a HEAD in a bucket), so a multi-gigabyte file is not read to find out; made once
        per tree, as its listing is."""
        if not self.remote:
            return regular_file(self.display)
        if self._root_is_file is None:
            self._root_is_file = self._ask_root_is_file()
        return self._root_is_file

    def _ask_root_is_file(self) -> bool:
        import tensorstore as ts

        spec = self.spec()
        path = spec["path"].rstrip("/")
        parent, _, name = path.rpartition("/")
        if not name:
            return False
        parent_path = parent + "/" if parent or self.scheme == "file" else ""
        try:  # an empty byte range: whether the object exists, without reading it
            store = ts.KvStore.open({**spec, "path": parent_path}, context=context()).result()
            result = store.read(name, byte_range=slice(0, 0)).result()
        except Exception as err:
            raise self.error(err, self.display) from None
        return result.state == "value"

    # -- reading ---------------------------------------------------------------------------------

    def stamps(self, rels: Sequence[str]) -> tuple[bytes, ...]:
        """The storage generation of each file (its identity: inode and mtime on a disk, the
        object generation or ETag in a bucket), b"" for a missing one; requests for no bytes,
        made concurrently. A file replaced or deleted has another stamp."""
        import tensorstore as ts

        for rel in rels:
            refuse_special(self.spec(), rel)
        try:
            store = ts.KvStore.open(self.spec(), context=context()).result()
            futures = [store.read(rel, byte_range=slice(0, 0)) for rel in rels]
            results = [f.result() for f in futures]
        except Exception as err:
            raise self.error(err, self.display) from None
        return tuple(bytes(r.stamp.generation) if r.state == "value" else b"" for r in results)

    def read(self, rel: str) -> bytes | None:
        """A small file's bytes; None when it is missing."""
        return self.read_many([rel])[0]

    def read_many(self, rels: list[str]) -> list[bytes | None]:
        """Several files, read concurrently; None for each missing one. Each is read once per
        tree (the last :data:`FILES_BYTES` read are kept), as the tree's listing is made once:
        a command that opens several steps of one tree reads each step's metadata once."""
        wanted = [rel for rel in dict.fromkeys(rels) if rel not in self._files]
        fresh = dict(zip(wanted, self.read_from(self.spec(), *wanted, many=True))) if wanted else {}
        values = [fresh[rel] if rel in fresh else self._files[rel] for rel in rels]
        for rel, value in fresh.items():
            self._files[rel] = value
            self._files_bytes += len(value or b"")
        while self._files_bytes > FILES_BYTES and len(self._files) > 1:
            self._files_bytes -= len(self._files.pop(next(iter(self._files))) or b"")
        return values

    def read_from(self, spec: dict[str, Any], *keys: str, many: bool = False):
        import tensorstore as ts

        for key in keys:
            refuse_special(spec, key)
        try:
            store = ts.KvStore.open(spec, context=context()).result()
            futures = [store.read(key) for key in keys]
            results = [f.result() for f in futures]
        except Exception as err:
            raise self.error(err, self.display) from None
        values = [bytes(r.value) if r.state == "value" else None for r in results]
        return values if many else values[0]

    def read_range(self, rel: str, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of a file (a ranged request in a bucket); :class:`StorageError`
        when the file is missing or shorter."""
        return read_range(json.dumps(self.spec()), rel, start, stop)

    def read_range_or_none(self, rel: str, start: int, stop: int) -> bytes:
        """Up to ``stop - start`` bytes from ``start`` of a file; fewer (or none) where it is shorter
        or missing. For looking at how a file begins."""
        refuse_special(self.spec(), rel)
        try:
            store = _kvstore(json.dumps(self.spec()), context())
            result = store.read(rel, byte_range=slice(start, stop)).result()
        except Exception as err:
            failure = Failure.of(err)
            if failure.missing:
                return b""
            if not failure.past_end:  # only "no such bytes" is an answer here; the rest fails
                raise self.error(err, self.path(rel)) from None
            try:  # shorter than the range: read it whole (it is at most ``stop`` bytes)
                result = store.read(rel).result()
            except Exception as err:
                if Failure.of(err).missing:
                    return b""
                raise self.error(err, self.path(rel)) from None
            return bytes(result.value)[start:stop] if result.state == "value" else b""
        return bytes(result.value)[: stop - start] if result.state == "value" else b""

    def has_byte(self, rel: str, offset: int) -> bool:
        """Whether a file holds a byte at ``offset``: one 1-byte ranged request, how a file's end
        is checked in a bucket without the binary search :meth:`file_size` makes there."""
        refuse_special(self.spec(), rel)
        try:
            result = (
                _kvstore(json.dumps(self.spec()), context())
                .read(rel, byte_range=slice(offset, offset + 1))
                .result()
            )
        except Exception as err:
            if Failure.of(err).past_end:
                return False
            raise self.error(err, self.path(rel)) from None
        return result.state == "value" and len(bytes(result.value)) == 1

    def file_size(self, rel: str) -> int | None:
        """A file's size: from the file system, or in a bucket (TensorStore's listings and reads
        carry no sizes) by a binary search of 1-byte ranged requests for its end; None when it
        is missing."""
        if not self.remote:
            path = os.path.join(self.display, rel)
            return os.stat(path).st_size if regular_file(path) else None
        if not self.has_byte(rel, 0):
            return None  # missing (or empty, which no format here can be)
        lo, hi = 1, 1
        while self.has_byte(rel, hi):  # the first power of two past the end
            lo, hi = hi + 1, hi * 2
        while lo < hi:  # the first offset with no byte
            mid = (lo + hi) // 2
            if self.has_byte(rel, mid):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def size(self, rel: str = "") -> int | None:
        """Bytes of the files under ``rel``; None where the store cannot tell without reading them.

        TensorStore's listing carries no sizes, so for buckets the size is unknown; for local
        folders it comes from the file system.
        """
        if self.remote:
            return None
        prefix = rel.rstrip("/") + "/" if rel else ""
        total = 0
        for key in self.keys():
            if key.startswith(prefix) or key == rel:
                try:
                    total += os.lstat(os.path.join(self.display, key)).st_size
                except OSError:
                    pass
        return total

    # -- errors ----------------------------------------------------------------------------------

    def error(self, err: BaseException, where: str) -> Exception:
        """A one-line paramscope error for a failed storage request."""
        return _error(Failure.of(err), where, self.scheme, self.bucket)


# absl status codes, which TensorStore's messages begin with
_STATUS_CODES = frozenset(
    "CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    "DATA_LOSS UNAUTHENTICATED".split()
)
_BODY = re.compile(r"\[http_response_body='((?:[^'\\]|\\.)*)'\]")
_HTTP_STATUS = re.compile(r"\[http_response_code='(\d{3})'\]|HTTP response code: (\d{3})\b")
_CURL_CODE = re.compile(r"\[curl_code='(\d+)'\]")
_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_STORE_CODE = re.compile(r"<Code>(\w+)</Code>|\"reason\": *\"(\w+)\"")
_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "forbidden")


@dataclass(frozen=True)
class Failure:
    """What a TensorStore error says, read from its structure: the absl status code it begins
    with, the HTTP status and the store's own error code (S3 ``<Code>``, GCS ``reason``) of the
    answer, whether no answer came (a curl error: no connection, a timeout), the OS error."""

    text: str
    code: str | None
    http: int | None
    store_code: str | None
    no_answer: bool
    os_error: int | None

    @classmethod
    def of(cls, err: BaseException) -> Failure:
        text = str(err) or type(err).__name__
        first = text.split(":", 1)[0]
        body = _BODY.search(text)
        rest = _BODY.sub("", text)  # an answer's body says anything: only its error code is read
        http = _HTTP_STATUS.search(rest)
        store = _STORE_CODE.search(body.group(1)) if body else None
        os_error = _OS_ERROR.search(rest)
        return cls(
            text=text,
            code=first if first in _STATUS_CODES else None,
            http=int(http.group(1) or http.group(2)) if http else None,
            store_code=(store.group(1) or store.group(2)) if store else None,
            no_answer=_CURL_CODE.search(rest) is not None or "CURL error" in rest,
            os_error=int(os_error.group(1)) if os_error else None,
        )

    @property
    def denied(self) -> bool:
        return (
            self.code in ("PERMISSION_DENIED", "UNAUTHENTICATED")
            or self.http in (401, 403)
            or self.store_code in _DENIED_CODES
            or self.os_error in (1, 13)  # EPERM, EACCES
        )

    @property
    def missing(self) -> bool:
        """A "not found" answer: no such key (or no such byte range, see :attr:`past_end`)."""
        return (self.code == "NOT_FOUND" or self.http == 404) and not self.no_answer

    @property
    def past_end(self) -> bool:
        """A range that starts or ends past the end of the value (HTTP 416)."""
        return (self.code == "OUT_OF_RANGE" or self.http == 416) and not self.no_answer

    @property
    def unreachable(self) -> bool:
        """No answer came: the connection failed, or the store stopped sending."""
        return self.no_answer or (self.http is None and self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))

    @property
    def summary(self) -> str:
        return _BODY.sub("", self.text).splitlines()[0][:200].rstrip()


# The buckets this process opened: a failure whose request is not known (an array's read) is
# named by the one bucket there is, where there is one.
_BUCKETS: set[tuple[str, str]] = set()


def _endpoint(scheme: str | None, bucket: str | None) -> str:
    """The store a request went to, as people configured it."""
    configured = _endpoint_s3() if scheme == "s3" else _gcs_emulator() if scheme == "gs" else None
    if configured:
        return configured + (f" ({scheme}://{bucket})" if bucket else "")
    if scheme in REMOTE_SCHEMES:
        return f"{scheme}://{bucket}" if bucket else f"the {scheme}:// store"
    return "the store"


def _error(failure: Failure, where: str, scheme: str | None, bucket: str | None) -> Exception:
    remote = scheme in REMOTE_SCHEMES
    text = failure.text
    if failure.store_code == "NoSuchBucket" or (failure.missing and remote and "bucket" in text.lower()):
        return CheckpointNotFound(
            f"bucket {bucket!r} does not exist ({where})", hint="check the bucket's name"
        )
    fault = _fault(failure, where, scheme, bucket)
    if fault is not None:
        return fault
    return StorageError(f"cannot read {where}: {failure.summary}", hint="check the path")


def _fault(failure: Failure, where: str, scheme: str | None, bucket: str | None) -> StorageError | None:
    """The error for a failure of the store itself (denied, unreachable, failing), whatever was
    being read; None for anything else (a missing or damaged file)."""
    answered_by_http = failure.no_answer or failure.http is not None
    if scheme is None and answered_by_http and len(_BUCKETS) == 1:
        scheme, bucket = next(iter(_BUCKETS))
    remote = scheme in REMOTE_SCHEMES or scheme is None and answered_by_http
    if failure.denied:
        if not remote:
            return StorageError(f"{where} cannot be read (permission denied)", hint="check the permissions")
        return StorageError(
            f"access denied to {where}",
            hint=f"credentials in use: {credentials_hint(scheme)}" if scheme else "check the credentials",
        )
    if remote and failure.unreachable:
        return StorageError(
            f"cannot reach {_endpoint(scheme, bucket)}: {failure.summary}",
            hint=f"check the network and the endpoint; a slow store: raise {TIMEOUT_ENV} "
            f"(seconds without an answer, default {DEFAULT_TIMEOUT}) or {RETRIES_ENV}",
        )
    if remote and failure.http is not None and (failure.http >= 500 or failure.http == 429):
        kind = f" {failure.store_code}" if failure.store_code else ""
        return StorageError(
            f"cannot read {where}: the store answered HTTP {failure.http}{kind} after retries",
            hint="the store is failing or throttling; try again later",
        )
    return None


def store_fault(err: BaseException, spec: dict[str, Any] | str | None = None) -> StorageError | None:
    """The error for ``err`` where the store itself failed (access denied, unreachable, failing
    after its retries) rather than a file being missing or damaged; None otherwise. ``spec``:
    the kvstore (spec or JSON) the request went to, to name it."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            spec = None
    while isinstance(spec, dict) and isinstance(spec.get("base"), dict):
        spec = spec["base"]
    driver = spec.get("driver") if isinstance(spec, dict) else None
    scheme = {"gcs": "gs", "s3": "s3", "file": "file"}.get(driver or "")
    bucket = spec.get("bucket") if isinstance(spec, dict) else None
    where = f"{scheme}://{bucket}/{spec.get('path', '')}".rstrip("/") if bucket else "the checkpoint's files"
    return _fault(Failure.of(err), where, scheme, bucket)


_READ_FAILURES = (  # what TensorStore's messages mean for someone holding a damaged checkpoint
    ("Requested byte range", "a data file is shorter than its index says (truncated)"),
    ("Truncated Zstd", "a data file is missing or truncated"),
    ("ZSTD_decompressStream", "a data file is corrupted (decompression failed)"),
    ("is missing", "a chunk the writer stored is missing"),
    ("NOT_FOUND", "a file of the database is missing"),
    ("DATA_LOSS", "a data file is corrupted"),
)
_LOCAL_FILE = re.compile(r'local file "([^"]*[^/"])"')
_CHUNK = re.compile(r"chunk (\{[0-9, ]*\})")


def short_error(err: BaseException) -> str:
    """One line for a TensorStore error: what it means, its status code, and the file."""
    text = str(err)
    if not text:
        return type(err).__name__
    code = text.split(":", 1)[0]
    for marker, meaning in _READ_FAILURES:
        if marker in text:
            found, chunk = _LOCAL_FILE.search(text), _CHUNK.search(text)
            where = ", ".join(
                part for part in (chunk and f"chunk {chunk.group(1)}", found and found.group(1)) if part
            )
            return f"{meaning} [{code}]" + (f" ({where})" if where else "")
    return text.splitlines()[0][:300]


def _kvstore(spec: str, ctx):
    from paramscope.io.session import SESSION

    return SESSION.kvstore(spec, ctx)


def read_range(spec: str, key: str, start: int, stop: int) -> bytes:
    """Bytes ``[start, stop)`` of ``key`` in the kvstore of JSON ``spec``, in one request."""
    if stop <= start:
        return b""
    refuse_special(_local_base(spec), key)
    try:
        result = _kvstore(spec, context()).read(key, byte_range=slice(start, stop)).result()
    except Exception as err:
        fault = store_fault(err, spec)
        if fault is not None:
            raise fault from None
        raise StorageError(
            f"cannot read bytes {start}-{stop} of {key}: {short_error(err)}",
            hint="the file is shorter than its header says, or the store failed",
        ) from None
    if result.state != "value":
        raise StorageError(f"{key} is missing", hint="the checkpoint's files changed while it was read")
    value = bytes(result.value)
    if len(value) != stop - start:
        raise StorageError(
            f"{key} ends at byte {start + len(value)}, before {stop}", hint="the file is truncated"
        )
    return value


def regular_file(path: str) -> bool:
    """Whether a local path is a regular file (symlinks followed); False for folders and missing
    paths. A FIFO, socket or device raises :class:`StorageError` naming it: opening one to read
    would wait for a writer (or read without end), so it is refused before it is opened."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    if stat.S_ISREG(mode):
        return True
    if stat.S_ISDIR(mode):
        return False
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise StorageError(
        f"{path} is {kind}, not a regular file", hint="checkpoint files are read from regular files only"
    )


def refuse_special(spec: dict[str, Any] | None, key: str) -> None:
    """Refuses to read ``key`` of a local kvstore where it is not a regular file (see
    :func:`regular_file`); files that are missing are left to the read to report."""
    if spec and spec.get("driver") == "file" and key:
        regular_file(spec["path"].rstrip("/") + "/" + key)


@functools.lru_cache(maxsize=64)
def _local_base(spec: str) -> dict[str, Any] | None:
    """The kvstore spec of JSON ``spec`` when it is a local folder; None for a bucket."""
    parsed = json.loads(spec)
    return parsed if isinstance(parsed, dict) and parsed.get("driver") == "file" else None


def load_json(raw: str | bytes) -> Any:
    """JSON from a file of a checkpoint: ValueError for anything that is not JSON, nesting too
    deep for the parser included (``[[[[...``, which json.loads answers with RecursionError)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None


def inside(target: str, folder: str) -> bool:
    """Whether the local file ``target`` lies inside ``folder`` (a path or URL), symlinks resolved.

    paramscope never writes into a checkpoint; a folder in a bucket holds no local file.

    >>> inside("/ckpt/baseline.json", "/ckpt"), inside("/elsewhere.json", "s3://bucket/ckpt")
    (True, False)
    """
    tree = Tree(folder)
    if tree.remote or is_url(target) and not str(target).startswith("file://"):
        return False
    resolved = os.path.realpath(Tree(target).display)
    for root in (os.path.realpath(tree.display), *_linked_folders(tree.display)):
        if resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def _linked_folders(folder: str, depth: int = 3) -> list[str]:
    """Where the symlinked folders in the top ``depth`` levels of ``folder`` (linked steps and
    items, which paramscope reads as if they were there) really are."""
    found: list[str] = []
    level = [folder]
    for _ in range(depth):
        below = []
        for path in level:
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for entry in entries:
                try:
                    if not entry.is_dir():
                        continue
                    if entry.is_symlink():
                        found.append(os.path.realpath(entry.path))
                    below.append(entry.path)
                except OSError:
                    continue
        level = below
    return found
