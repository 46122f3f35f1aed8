"""Paths and URLs: the one place that knows a local path from `s3://`, `gs://`, `hf://`, `https://` or any other
URL fsspec knows.

Reading: `open_read` gives a seekable binary file; on a URL it fetches byte ranges on demand through fsspec's block
cache, at most `max_blocks` blocks of `block_size` bytes held per open file (a bounded read-ahead, never the whole
object). Writing: `committed(path)` yields a local temporary file to write; on success a local path gets it by
rename in the same folder, a URL by one upload of the complete file (a single PUT, or a multipart upload that the
store shows only once complete), so a partial file or object never looks complete. Credentials come from each
filesystem's own environment and config files (s3fs/botocore: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws/{credentials,config}, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible server; fsspec's
FSSPEC_S3_ENDPOINT_URL and other FSSPEC_<PROTOCOL>_<KEY> variables); `redact` keeps them out of logs, metadata and
errors. Failures are one line naming the URL: a missing object is a FileNotFoundError, a missing bucket, denied
access, a server that does not answer or a filesystem package not installed a `StorageError`.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Tuple, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.core import split_protocol

from .errors import RunError, UserError

__all__ = ["BLOCK_SIZE", "MAX_BLOCKS", "StorageError", "basename", "committed", "dirname", "exists", "info", "is_url",
           "isdir", "isfile", "join", "listdir", "location", "makedirs", "open_read", "read_bytes", "read_text",
           "redact", "remove", "resolve", "write_bytes", "write_text"]

PathLike = Union[str, os.PathLike]

BLOCK_SIZE = 2 << 20  # bytes per range request on a URL
MAX_BLOCKS = 16  # blocks an open URL file keeps: its read-ahead is bounded by BLOCK_SIZE * MAX_BLOCKS
LOCAL_PROTOCOLS = (None, "file", "local")
# A dead or unreachable server ends in one line after a few seconds, not a hang (s3fs: botocore's settings).
S3_CLIENT_DEFAULTS = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")
_SECRET_QUERY = re.compile(r"sig|signature|token|credential|secret|password|passwd|key|auth", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


class StorageError(RunError):
    """A URL that cannot be reached: missing bucket, denied access, a server that does not answer, no filesystem
    package. One line naming the (redacted) URL."""

    def __init__(self, message: str):
        # A DataLoader worker's error comes back as type(err)("Caught ... Original Traceback ..."): keep its last line
        lines = [ln for ln in str(message).splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].startswith("Caught ") and "Error: " in lines[-1]:
            message = lines[-1].split("Error: ", 1)[1]
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------- naming


def _text(path: PathLike) -> str:
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def is_url(path: PathLike) -> bool:
    """A URL of a filesystem other than the local one (`file://` is local)."""
    protocol, _ = split_protocol(_text(path))
    return protocol not in LOCAL_PROTOCOLS


def _local(path: PathLike) -> str:
    """A local path, `file://` stripped."""
    return split_protocol(_text(path))[1] if _text(path).startswith(("file://", "local://")) else _text(path)


def redact(url: PathLike) -> str:
    """The URL without credentials: no user:password@, no signature/token/key values in its query."""
    text = _text(url)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v) for k, v in parse_qsl(query, True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str) -> str:
    """Any message with its URLs redacted and the secret values of the environment masked."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), str(text))
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _split(url: str) -> Tuple[str, str]:
    """'s3://bucket/a/b' -> ('s3://', 'bucket/a/b')."""
    protocol, rest = split_protocol(url)
    return f"{protocol}://", rest


def location(path: PathLike) -> Union[Path, str]:
    """A local path as a Path (what local callers are given), a URL as its string."""
    return _text(path) if is_url(path) else Path(_local(path))


def join(base: PathLike, *parts: str) -> str:
    base = _text(base)
    if not is_url(base):
        return os.path.join(_local(base), *parts)
    head, rest = _split(base)
    return head + posixpath.join(rest, *parts)


def dirname(path: PathLike) -> str:
    path = _text(path)
    if not is_url(path):
        return os.path.dirname(_local(path))
    head, rest = _split(path)
    return head + posixpath.dirname(rest.rstrip("/"))


def basename(path: PathLike) -> str:
    path = _text(path)
    return posixpath.basename(_split(path)[1].rstrip("/")) if is_url(path) else os.path.basename(_local(path))


def resolve(folder: PathLike, path: str) -> str:
    """A CSV row's path: a URL as it is; `~` expanded; otherwise relative to `folder` (the CSV's own folder, local or
    a URL), normalised."""
    path = path.strip()
    if is_url(path):
        return path
    path = os.path.expanduser(_local(path))
    folder = _text(folder)
    if not is_url(folder) or os.path.isabs(path):
        return os.path.normpath(os.path.join(_local(folder), path))
    head, rest = _split(folder)
    return head + posixpath.normpath(posixpath.join(rest, path))


# ---------------------------------------------------------------------------------------------------- filesystems


def _filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; instances are cached by fsspec (per process)."""
    protocol = split_protocol(url)[0]
    options: Dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        user = fsspec.config.conf.get("s3", {})
        options["config_kwargs"] = {**S3_CLIENT_DEFAULTS, **user.get("config_kwargs", {})}
        options.setdefault("use_listings_cache", user.get("use_listings_cache", False))  # resume lists fresh shards
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as err:
        raise StorageError(f"{redact(url)}: {_missing_package(protocol, err)}") from None
    except ValueError as err:  # an unknown protocol
        raise StorageError(f"{redact(url)}: {scrub(err)}") from None


def _missing_package(protocol: str, err: ImportError) -> str:
    known = fsspec.registry.known_implementations.get(protocol, {})
    module = known.get("class", "").split(".")[0] or getattr(err, "name", None) or "its fsspec filesystem"
    return f"reading {protocol}:// needs the {module} package (pip install {module})"


def _is_connection_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                         "ClientConnectorError", "ServerDisconnectedError", "FSTimeoutError", "TimeoutError",
                         "ConnectionError", "ProxyConnectionError"}) or isinstance(err, (ConnectionError, TimeoutError))


def _translate(err: BaseException, url: str, action: str) -> BaseException:
    """The one-line error of a failed operation on a URL (FileNotFoundError for a missing object)."""
    name = redact(url)
    text = scrub(err)
    if isinstance(err, FileNotFoundError):
        if "bucket" in text.lower():
            bucket = _split(url)[1].split("/", 1)[0]
            return StorageError(f"cannot {action} {name}: bucket {bucket} does not exist")
        return FileNotFoundError(f"{name} does not exist")
    if isinstance(err, PermissionError) or any(w in text for w in ("AccessDenied", "Forbidden", "403")):
        return StorageError(f"cannot {action} {name}: access denied (check the credentials in the environment or "
                            f"the filesystem's config files, and the bucket's policy)")
    if _is_connection_error(err):
        return StorageError(f"cannot {action} {name}: the server does not answer ({type(err).__name__}); check the "
                            f"endpoint and the network")
    if isinstance(err, ImportError):
        return StorageError(f"{name}: {_missing_package(split_protocol(url)[0], err)}")
    names = {c.__name__ for c in type(err).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return StorageError(f"cannot {action} {name}: no credentials found (set them in the environment or the "
                            f"filesystem's config files, e.g. AWS_ACCESS_KEY_ID / ~/.aws/credentials)")
    if isinstance(err, OSError) or names & {"BotoCoreError", "ClientError", "HfHubHTTPError", "HttpError"}:
        return StorageError(f"cannot {action} {name}: {type(err).__name__}: {' '.join(text.split())}")
    return err  # not a storage failure: a bug, with its traceback


@contextlib.contextmanager
def errors(url: PathLike, action: str) -> Iterator[None]:
    """Failures of an operation on `url` as one-line errors naming it (see `_translate`); local paths as they are."""
    url = _text(url)
    if not is_url(url):
        yield
        return
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001 - _translate re-raises what is not a storage failure
        translated = _translate(err, url, action)
        if translated is err:
            raise
        raise translated from None


# ---------------------------------------------------------------------------------------------------- reading


def exists(path: PathLike) -> bool:
    path = _text(path)
    if not is_url(path):
        return os.path.exists(_local(path))
    return _info_or_none(path) is not None


def _info_or_none(url: str) -> Dict[str, Any] | None:
    try:
        with errors(url, "read"):
            fs, p = _filesystem(url)
            return fs.info(p)
    except FileNotFoundError:
        return None


def isfile(path: PathLike) -> bool:
    path = _text(path)
    if not is_url(path):
        return os.path.isfile(_local(path))
    found = _info_or_none(path)
    return found is not None and found.get("type") == "file"


def isdir(path: PathLike) -> bool:
    path = _text(path)
    if not is_url(path):
        return os.path.isdir(_local(path))
    found = _info_or_none(path.rstrip("/"))
    return found is not None and found.get("type") == "directory"


def info(path: PathLike) -> Tuple[int, str]:
    """(size in bytes, version): the version changes when the file does (mtime locally, ETag or modification time
    on a URL). FileNotFoundError when there is none."""
    path = _text(path)
    if not is_url(path):
        st = os.stat(_local(path))
        return st.st_size, str(st.st_mtime_ns)
    found = _info_or_none(path)
    if found is None or found.get("type") == "directory":
        raise FileNotFoundError(f"{redact(path)} does not exist")
    version = found.get("ETag") or found.get("etag") or found.get("LastModified") or found.get("mtime") or ""
    return int(found.get("size") or 0), str(version)


def listdir(path: PathLike) -> List[str]:
    """Names of the entries directly in a folder (a prefix on object stores), sorted; [] when there is none."""
    path = _text(path)
    if not is_url(path):
        path = _local(path)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    try:
        with errors(path, "list"):
            fs, p = _filesystem(path)
            entries = fs.ls(p.rstrip("/"), detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries if str(e).rstrip("/") != p.rstrip("/"))


def open_read(path: PathLike, block_size: int | None = None, max_blocks: int | None = None) -> IO[bytes]:
    """A seekable binary file. On a URL: ranges fetched on demand, at most `max_blocks` blocks of `block_size`
    bytes kept (default MAX_BLOCKS of BLOCK_SIZE; module docstring); reads raise the same one-line errors."""
    path = _text(path)
    if not is_url(path):
        return open(_local(path), "rb")
    with errors(path, "read"):
        fs, p = _filesystem(path)
        handle = fs.open(p, "rb", block_size=int(block_size or BLOCK_SIZE), cache_type="blockcache",
                         cache_options={"maxblocks": int(max_blocks or MAX_BLOCKS)})
    return _Reading(handle, path)


class _Reading:
    """A URL file whose read/seek failures (the server gone mid-read) are one-line errors naming it."""

    def __init__(self, handle, url: str):
        self._handle, self.url = handle, url

    def read(self, size: int = -1) -> bytes:
        with errors(self.url, "read"):
            return self._handle.read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        with errors(self.url, "read"):
            return self._handle.seek(offset, whence)

    def __getattr__(self, name: str):  # tell, seekable, readable, size, closed, cache, ...
        return getattr(self._handle, name)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self._handle)


def read_bytes(path: PathLike) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


# ---------------------------------------------------------------------------------------------------- writing


def makedirs(path: PathLike) -> None:
    """A local folder and its parents; nothing on object stores (a key's prefix needs no folder)."""
    if not is_url(path):
        os.makedirs(_local(path), exist_ok=True)


def check_writable(path: PathLike, what: str) -> None:
    """A folder `path` can be written below: locally the nearest existing folder must be a writable folder; on a
    URL its bucket (or root) must exist. Nothing is created."""
    path = _text(path)
    if not is_url(path):
        local = Path(_local(path))
        existing = next((p for p in (local, *local.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            raise UserError(f"{what} {path}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{what} {path}: {existing} is not writable; choose another folder")
        return
    head, rest = _split(path)
    root = head + rest.split("/", 1)[0]
    with errors(root, "write to"):
        fs, p = _filesystem(root)
        found = fs.exists(p)
    if not found:
        raise StorageError(f"{what} {redact(path)}: bucket {rest.split('/', 1)[0]} does not exist")


def temporary_name(name: str) -> str:
    """`.NAME-STEM.XXXXXXXX.tmp.SUFFIX`: hidden, marked `.tmp`, with the suffix kept (muxers and PIL read the
    format from it)."""
    stem, suffix = os.path.splitext(name)
    return f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}"


def is_temporary(name: str) -> bool:
    """A name `committed` writes before the rename (or an older `NAME.tmp`)."""
    return name.endswith(".tmp") or (name.startswith(".") and ".tmp" in name)


@contextlib.contextmanager
def committed(path: PathLike) -> Iterator[str]:
    """Yields a local temporary file to write `path`'s content to; when the block ends without an error it becomes
    `path` at once (local: rename in the same folder; URL: one upload of the complete file). On an error nothing
    appears at `path` and the temporary file is removed."""
    path = _text(path)
    if not is_url(path):
        target = _local(path)
        folder = os.path.dirname(target) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, temporary_name(os.path.basename(target)))
        try:
            yield tmp
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    folder = tempfile.mkdtemp(prefix="opensora-vae-upload-")
    tmp = os.path.join(folder, temporary_name(basename(path)))
    try:
        yield tmp
        with errors(path, "write"):
            fs, p = _filesystem(path)
            fs.put_file(tmp, p)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_bytes(path: PathLike, data: bytes) -> None:
    with committed(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def remove(path: PathLike, missing_ok: bool = True) -> None:
    path = _text(path)
    if not is_url(path):
        try:
            os.unlink(_local(path))
        except FileNotFoundError:
            if not missing_ok:
                raise
        return
    try:
        with errors(path, "remove"):
            fs, p = _filesystem(path)
            fs.rm_file(p)
    except FileNotFoundError:
        if not missing_ok:
            raise
