"""A pool on an S3-compatible object store: ``s3://BUCKET[/PREFIX]`` (formats/pool.md 13).

Object ``NAME`` of the pool is the key ``PREFIX/NAME`` of the bucket.  The client is
boto3, so the endpoint, the credentials and the region come from where the AWS tools
take them: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and ``~/.aws/config``/``credentials``.

The backend contract (:mod:`.backend`) on S3:

``put``
    Packs and index segments are written back: the call copies nothing, queues the
    upload on a small thread pool and returns; the object is readable at once from
    memory.  The bytes in flight are bounded (``WRITEBACK_BYTES``): a put past the
    bound waits for uploads to finish.  Every other object is put synchronously.
``barrier``
    Waits for every queued upload; if one failed (after its retries) the barrier
    raises HostIOError, and so does every later one: what it was to make durable may
    be lost, so the pool must not commit on top of it.
``put_if_absent``
    ``PutObject`` with ``If-None-Match: *``, after a barrier.  A 412 answer is "the
    name is taken" -- unless the object now there holds exactly our bytes, which is
    our own earlier attempt whose answer was lost and that the retry re-sent: then
    it is ours.  (Catalogs hold their commit time and writer, so two writers never
    put the same bytes.)
``get``/``get_range``
    Served from the bounded cache of immutable objects (:mod:`.cache`) when they can
    be; ``gen/`` objects, ``config`` and leases are never cached.  Ranged GETs (packs,
    index segments) go through a presigned URL on keep-alive connections
    (:mod:`.s3http`: none of botocore's per-request cost), boto3 repeating any that
    does not answer 206 or 200.
``pack_target``
    Packs are sealed at ``VDISK_S3_PACK_KB`` (default 256 KiB) instead of 4 MiB: some
    stores (SeaweedFS: its volume servers read a whole stored chunk to answer a range
    of it) answer a 4 KiB range of a 4 MiB object three times slower than one of a
    256 KiB object (BENCHMARKS.md, issue 16).

Every request has a connect and a read timeout and is retried with exponential
backoff by botocore's "standard" retry mode (5xx, throttling, timeouts, broken
connections); when the retries are spent the request fails with one HostIOError
naming the store, the operation, the object and the cause, logged once.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import parsedate_to_datetime

from ..errors import HostIOError, UsageError
from . import backend as be
from .cache import ObjectCache

log = logging.getLogger("vdisk.pool.s3")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9._-]+$")
#: objects written back (uploaded in the background until a barrier)
WRITEBACK_PREFIXES = ("packs/", "index/")
#: names whose content may change (catalog names can be re-used after pruning): never cached
UNCACHED_PREFIXES = ("gen/", "leases/", "locks/", "config")
PREFETCH_GAP = 512  # bytes between two wanted ranges fetched with them rather than asked for apart
PREFETCH_MAX = 8 << 20
PREFETCH_THREADS = 8


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise UsageError(f"{name}={os.environ.get(name)!r}: expected a number") from None


_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(connect_timeout: float, read_timeout: float, attempts: int):
    """One boto3 client per process and setting (making one loads the service model:
    a few hundred milliseconds), made anew when the AWS environment changes."""
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (connect_timeout, read_timeout, attempts, env)
    with _CLIENTS_LOCK:
        c = _CLIENTS.get(key)
        if c is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise UsageError("pools on object stores need boto3 (pip install 'vdisk[s3]')") from None

            cfg = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                         retries={"mode": "standard", "total_max_attempts": max(1, attempts)},
                         max_pool_connections=16)
            session = boto3.session.Session()
            c = _CLIENTS[key] = session.client("s3", region_name=session.region_name or "us-east-1", config=cfg)
        return c


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at its ends) of ``s3://BUCKET[/PREFIX]``."""
    if not url.startswith("s3://"):
        raise UsageError(f"{url}: not an s3:// URL")
    rest = url[5:].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"{url}: {bucket!r} is not a valid bucket name (3 to 63 lower-case letters, digits, . and -)")
    parts = [p for p in prefix.split("/") if p] if prefix else []
    for p in parts:
        if not _PREFIX_PART.match(p) or p in (".", ".."):
            raise UsageError(f"{url}: prefix part {p!r} is not allowed (letters, digits, . _ -)")
    return bucket, "/".join(parts)


class S3Backend(be.Backend):
    """See the module docstring.  Thread-safe: boto3 clients are."""

    def __init__(self, url: str, *, client=None, cache_bytes: int | None = None):
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.attempts = int(_env_float("VDISK_S3_ATTEMPTS", 5))
        self.connect_timeout = _env_float("VDISK_S3_CONNECT_TIMEOUT", 5)
        self.read_timeout = _env_float("VDISK_S3_READ_TIMEOUT", 20)
        self._client = client
        mb = _env_float("VDISK_S3_CACHE_MB", 256)
        self.cache = ObjectCache(int(mb * 1024 * 1024) if cache_bytes is None else cache_bytes)
        self.writeback_bytes = int(_env_float("VDISK_S3_WRITEBACK_MB", 64) * 1024 * 1024)
        self._uploads: dict[str, tuple[bytes, Future]] = {}
        self._in_flight = 0
        self._cond = threading.Condition()
        self._failed: HostIOError | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._sizes: dict[str, int] = {}  # of immutable objects, as the last listing gave them
        #: bytes received from the store (bodies of gets), and requests made
        self.bytes_fetched = 0
        self.gets = 0
        self._stats_lock = threading.Lock()
        self.bytes_put = 0
        from ..codec.pool import TARGET_PACK

        kb = _env_float("VDISK_S3_PACK_KB", 256)
        self.pack_target = max(64 << 10, min(TARGET_PACK, int(kb * 1024)))
        self._fast = None  # made with the client (s3http.FastRanges), or False: not used

    # ------------------------------------------------------------------ client
    @property
    def client(self):
        if self._client is None:
            self._client = _shared_client(self.connect_timeout, self.read_timeout, self.attempts)
        return self._client

    def key(self, name: str) -> str:
        be._check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _error(self, op: str, name: str, exc: Exception) -> Exception:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchBucket":
                return be.ObjectMissing(f"{self.url}: object {name} is missing")
            if code == "NoSuchBucket":
                msg = f"{self.url}: the bucket {self.bucket} does not exist"
            elif code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                msg = f"{self.url}: {op} {name}: access denied by the store ({code}); check the credentials"
            else:
                msg = (f"{self.url}: {op} {name} failed: {code or status} "
                       f"{exc.response.get('Error', {}).get('Message', '')}".rstrip()
                       + f" (after up to {self.attempts} attempts)")
        elif isinstance(exc, NoCredentialsError):
            msg = (f"{self.url}: no credentials for the object store (set AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
        else:
            msg = f"{self.url}: {op} {name} failed: {exc} (after up to {self.attempts} attempts)"
        if logging.getLogger().handlers:  # a mount's log; a command prints the error itself, once
            log.error("%s", msg)
        return HostIOError(msg, errno.EIO)

    def _call(self, op: str, name: str, fn, **kw):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kw)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(op, name, exc) from None

    # ------------------------------------------------------------------ writes
    def _put_now(self, name: str, data: bytes, **kw) -> None:
        self._call("put", name, self.client.put_object, Key=self.key(name), Body=data, **kw)
        self.bytes_put += len(data)

    def put(self, name: str, data: bytes) -> None:
        self._writable()
        data = bytes(data)
        if not name.startswith(WRITEBACK_PREFIXES):
            self._put_now(name, data)
            return
        with self._cond:
            while self._in_flight and self._in_flight + len(data) > self.writeback_bytes:
                self._cond.wait()
            self._in_flight += len(data)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vdisk-s3-put")
            fut = self._executor.submit(self._upload, name, data)
            self._uploads[name] = (data, fut)

    def _upload(self, name: str, data: bytes) -> None:
        try:
            self._put_now(name, data)
            self.cache.put(name, 0, data, whole=True)
        except HostIOError as exc:
            with self._cond:
                if self._failed is None:
                    self._failed = exc
            raise
        finally:
            with self._cond:
                self._in_flight -= len(data)
                self._uploads.pop(name, None)
                self._cond.notify_all()

    def _writable(self) -> None:
        if self._failed is not None:
            raise HostIOError(f"{self.url}: an earlier upload failed ({self._failed}); no change is made until "
                              "the pool is reopened", errno.EIO)

    def barrier(self) -> None:
        with self._cond:
            futs = [f for _, f in self._uploads.values()]
        for f in futs:
            try:
                f.result()
            except HostIOError:
                pass
        self._writable()

    def put_if_absent(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        self.barrier()
        data = bytes(data)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(name), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                try:
                    return self.get(name) == data  # our own attempt, whose answer was lost
                except be.ObjectMissing:
                    return False  # deleted since: taken and gone, still not ours
            raise self._error("conditional put", name, exc) from None
        except BotoCoreError as exc:
            raise self._error("conditional put", name, exc) from None
        self.bytes_put += len(data)
        return True

    def delete(self, name: str) -> None:
        self._writable()
        self.cache.drop(name)
        self._sizes.pop(name, None)
        self._call("delete", name, self.client.delete_object, Key=self.key(name))

    # ------------------------------------------------------------------ reads
    def _pending(self, name: str) -> bytes | None:
        with self._cond:
            u = self._uploads.get(name)
        return u[0] if u else None

    def get(self, name: str) -> bytes:
        p = self._pending(name)
        if p is not None:
            return p
        cacheable = not name.startswith(UNCACHED_PREFIXES)
        if cacheable:
            hit = self.cache.get_whole(name)
            if hit is not None:
                return hit
        r = self._call("get", name, self.client.get_object, Key=self.key(name))
        data = self._read_body(r, name)
        if cacheable:
            self.cache.put(name, 0, data, whole=True)
        return data

    def _read_body(self, r, name: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            data = r["Body"].read()
        except (BotoCoreError, OSError) as exc:
            raise self._error("get", name, exc) from None
        with self._stats_lock:
            self.bytes_fetched += len(data)
            self.gets += 1
        return data

    def get_with_age(self, name: str) -> tuple[bytes, float]:
        """The object and its age in seconds by the store's clock (its Date answer
        header minus the object's Last-Modified): for leases, which must not depend
        on the clocks of the hosts agreeing."""
        r = self._call("get", name, self.client.get_object, Key=self.key(name))
        data = self._read_body(r, name)
        try:
            now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            age = (now - r["LastModified"]).total_seconds()
        except (KeyError, TypeError, ValueError):
            age = 0.0
        return data, age

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        p = self._pending(name)
        if p is not None:
            return p[offset:offset + length]
        hit = self.cache.get(name, offset, length)
        if hit is not None:
            return hit
        data = self._fetch_range(name, offset, length)
        self.cache.put(name, offset, data)
        return data

    def _fast_ranges(self):
        f = self._fast
        if f is None:
            from . import s3http

            f = False
            if s3http.enabled():
                try:
                    f = s3http.FastRanges(self.client, self.bucket, self.connect_timeout, self.read_timeout)
                except (ImportError, AttributeError, TypeError, ValueError):  # boto3 does every request
                    f = False
            self._fast = f
        return f

    def _fetch_range(self, name: str, offset: int, length: int) -> bytes:
        """One ranged GET from the store (no cache)."""
        fast = self._fast_ranges()
        if fast:
            data = fast.get_range(self.key(name), offset, length)
            if data is not None:
                with self._stats_lock:
                    self.bytes_fetched += len(data)
                    self.gets += 1
                return data
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                       Range=f"bytes={offset}-{offset + length - 1}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # wholly past the end
            raise self._error("get", name, exc) from None
        except Exception as exc:
            from botocore.exceptions import BotoCoreError

            if isinstance(exc, BotoCoreError):
                raise self._error("get", name, exc) from None
            raise
        return self._read_body(r, name)[:length]

    def prefetch(self, ranges: list[tuple[str, int, int]]) -> None:
        """Fetch the byte ranges ``(name, offset, length)`` into the cache: those of one
        object that touch or nearly touch (``PREFETCH_GAP``) in one request, at most
        ``PREFETCH_MAX`` bytes each, several requests at once.  Errors are left to the
        reads that follow (which retry, and report)."""
        by_name: dict[str, list[tuple[int, int]]] = {}
        for name, off, n in ranges:
            if n > 0 and self._pending(name) is None and self.cache.get(name, off, n, count=False) is None:
                by_name.setdefault(name, []).append((off, off + n))
        jobs = []
        for name, spans in by_name.items():
            spans.sort()
            cur_s, cur_e = spans[0]
            for s_, e_ in spans[1:]:
                if s_ <= cur_e + PREFETCH_GAP and e_ - cur_s <= PREFETCH_MAX:
                    cur_e = max(cur_e, e_)
                else:
                    jobs.append((name, cur_s, cur_e - cur_s))
                    cur_s, cur_e = s_, e_
            jobs.append((name, cur_s, cur_e - cur_s))
        if len(jobs) == 1:
            self._fetch_quietly(*jobs[0])
            return
        if self._readers is None:
            self._readers = ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="vdisk-s3-get")
        list(self._readers.map(lambda j: self._fetch_quietly(*j), jobs))

    def _fetch_quietly(self, name: str, offset: int, length: int) -> None:
        try:
            self.get_range(name, offset, length)
        except (HostIOError, be.ObjectMissing):
            pass

    def size(self, name: str) -> int:
        p = self._pending(name)
        if p is not None:
            return len(p)
        n = self._sizes.get(name, -1)
        if n >= 0:
            return n
        r = self._call("stat", name, self.client.head_object, Key=self.key(name))
        return int(r["ContentLength"])

    def _list_pages(self, prefix: str):
        """Each answer of listing ``prefix`` (1000 keys a page), with the key prefix
        of this pool to strip from each object's Key."""
        base = f"{self.prefix}/" if self.prefix else ""
        token = None
        while True:
            kw = {"Prefix": base + prefix, "MaxKeys": 1000}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("list", prefix or "/", self.client.list_objects_v2, **kw)
            yield r, base
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")
            if not token:
                return

    def list(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for r, base in self._list_pages(prefix):
            for o in r.get("Contents", []) or []:
                n = o["Key"][len(base):]
                if be._NAME.match(n):
                    out.append(n)
                    if not n.startswith(UNCACHED_PREFIXES):  # immutable: its size too
                        self._sizes[n] = int(o.get("Size", -1))
        with self._cond:
            out += [n for n in self._uploads if n.startswith(prefix)]
        return sorted(set(out))

    def list_with_age(self, prefix: str) -> list[tuple[str, float]]:
        """(name, age in seconds) of the objects under ``prefix``, by the store's clock:
        the Date header of each list answer minus each object's LastModified (for the
        ``gc`` lock, :mod:`.objlock`, which must not depend on host clocks agreeing)."""
        out: list[tuple[str, float]] = []
        for r, base in self._list_pages(prefix):
            try:
                now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
            except (KeyError, TypeError, ValueError):
                now = None
            for o in r.get("Contents", []) or []:
                n = o["Key"][len(base):]
                if not be._NAME.match(n):
                    continue
                try:
                    age = (now - o["LastModified"]).total_seconds() if now is not None else 0.0
                except (KeyError, TypeError, ValueError):
                    age = 0.0  # unknown: taken as fresh (it expires once the store says so)
                out.append((n, age))
        return sorted(out)

    # ------------------------------------------------------------------ pool-level
    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (``pool create``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error("open", "the bucket", exc) from None
        except BotoCoreError as exc:
            raise self._error("open", "the bucket", exc) from None
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error("create", "the bucket", exc) from None
        except BotoCoreError as exc:
            raise self._error("create", "the bucket", exc) from None

    def close(self) -> None:
        """Waits for the uploads still queued (a failure is the pool's to report, at
        its last commit, and is logged)."""
        try:
            self.barrier()
        except HostIOError:
            pass
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._readers is not None:
                self._readers.shutdown(wait=True)
                self._readers = None
            if self._fast:
                self._fast.close()
            self._fast = None
