"""Ranged GETs of a pool's immutable objects without botocore's per-request cost.

Measured on a local SeaweedFS cluster (BENCHMARKS.md, issue 16): one 4 KiB ranged
``get_object`` through boto3 costs milliseconds of client CPU (building, signing and
parsing the request through botocore's event system) on top of the store's answer.
Packs and index segments are immutable and read by range far more often than
anything else, so their ranged GETs go through this path instead: a presigned URL
per object (made by boto3 itself, so the endpoint, addressing style, region and
credentials are exactly those of the client; made once and reused until half its
lifetime is over -- a Range header is not part of a presigned URL's signature) and
one keep-alive ``http.client`` connection per thread and endpoint (urllib3's pool,
used before, cost ~0.5 ms more per GET here: BENCHMARKS "Pool reads on S3").

It is only a fast path: any answer but a 206 or 200 (an expired URL, a redirect to
another region, a 5xx, a timeout, a broken connection) makes the caller repeat the
request through boto3, which retries, follows redirects and reports errors as every
other request does.  After ``GIVE_UP`` failures before a first success the fast
path turns itself off for the backend (a store it cannot talk to this way).
It is not used when a proxy is configured in the environment (botocore honours the
``*_PROXY`` variables, this path does not) or when ``VDISK_S3_FAST_GET=0``.

Thread-safe: the URL table has a lock; each thread has connections of its own.
"""

from __future__ import annotations

import http.client
import os
import threading
import time

URL_TTL = 3600  # seconds a presigned URL is valid; renewed after half of it
MAX_URLS = 8192  # presigned URLs kept (one per object read), then the table restarts
GIVE_UP = 8


def enabled() -> bool:
    if os.environ.get("VDISK_S3_FAST_GET", "1") == "0":
        return False
    return not any(os.environ.get(k) for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy",
                                               "ALL_PROXY", "all_proxy"))


class FastRanges:
    def __init__(self, client, bucket: str, connect_timeout: float, read_timeout: float):
        self.client = client
        self.bucket = bucket
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._ssl = None
        if str(client.meta.endpoint_url).startswith("https:"):
            import ssl

            from botocore.httpsession import get_cert_path

            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))
        self._local = threading.local()
        self._all: list = []  # every connection made, for close()
        self._urls: dict[str, tuple[tuple[str, str, str], float]] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self.on = True
        self.hits = 0
        self.fallbacks = 0

    def _conn(self, scheme: str, netloc: str, fresh: bool = False):
        """This thread's keep-alive connection to ``netloc`` (a new one if ``fresh``)."""
        conns = self._local.__dict__.setdefault("conns", {})
        c = conns.get((scheme, netloc))
        if c is not None and not fresh:
            return c, True
        if c is not None:
            c.close()
        if scheme == "https":
            c = http.client.HTTPSConnection(netloc, timeout=self.connect_timeout, context=self._ssl)
        else:
            c = http.client.HTTPConnection(netloc, timeout=self.connect_timeout)
        conns[(scheme, netloc)] = c
        with self._lock:
            self._all.append(c)
        return c, False

    def _get(self, target: tuple[str, str, str], rng: str):
        """(status, Content-Range, body) of one GET on this thread's connection; a
        connection reused from an earlier request that the server closed meanwhile is
        replaced once."""
        scheme, netloc, path = target
        c, reused = self._conn(scheme, netloc)
        while True:
            try:
                c.request("GET", path, headers={"Range": rng})
                if c.sock is not None:
                    c.sock.settimeout(self.read_timeout)
                r = c.getresponse()
                body = r.read()
                if r.will_close:
                    c.close()
                return r.status, r.getheader("Content-Range", ""), body
            except (OSError, http.client.HTTPException):
                c.close()
                if not reused:
                    raise
                c, reused = self._conn(scheme, netloc, fresh=True)

    def _url(self, key: str) -> tuple[str, str, str]:
        now = time.monotonic()
        with self._lock:
            u = self._urls.get(key)
        if u is not None and now - u[1] < URL_TTL / 2:
            return u[0]
        from urllib.parse import urlsplit

        url = urlsplit(self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                          ExpiresIn=URL_TTL))
        target = (url.scheme, url.netloc, f"{url.path}?{url.query}" if url.query else url.path)
        with self._lock:
            if len(self._urls) >= MAX_URLS:
                self._urls.clear()
            self._urls[key] = (target, now)
        return target

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of ``key`` from ``offset`` (fewer at its end), or None: the
        caller asks boto3 instead."""
        if not self.on:
            return None
        from botocore.exceptions import BotoCoreError

        try:
            status, cr, data = self._get(self._url(key), f"bytes={offset}-{offset + length - 1}")
            if status == 206:
                if not cr.startswith(f"bytes {offset}-") or len(data) > length:
                    data = None  # not the range asked for: let boto3 do it
            elif status == 200:
                data = data[offset:offset + length]
            else:
                data = None
                if status == 403:
                    with self._lock:
                        self._urls.pop(key, None)
        except (http.client.HTTPException, OSError, BotoCoreError, ValueError):  # boto3 repeats it, reports what fails
            data = None
        with self._lock:
            if data is None:
                self.fallbacks += 1
                self._failures += 1
                if self._failures >= GIVE_UP and not self.hits:
                    self.on = False
            else:
                self.hits += 1
                self._failures = 0
        return data

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()
