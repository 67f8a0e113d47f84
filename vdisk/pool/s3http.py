"""Ranged GETs of a pool's immutable objects without botocore's per-request cost.

Measured on a local SeaweedFS cluster (BENCHMARKS.md, issue 16): one 4 KiB ranged
``get_object`` through boto3 costs milliseconds of client CPU (building, signing and
parsing the request through botocore's event system) on top of the store's answer.
Packs and index segments are immutable and read by range far more often than
anything else, so their ranged GETs go through this path instead: a presigned URL
per object (made by boto3 itself, so the endpoint, addressing style, region and
credentials are exactly those of the client; made once and reused until half its
lifetime is over -- a Range header is not part of a presigned URL's signature) and
a pool of keep-alive connections (urllib3, which botocore uses too).

It is only a fast path: any answer but a 206 or 200 (an expired URL, a redirect to
another region, a 5xx, a timeout, a broken connection) makes the caller repeat the
request through boto3, which retries, follows redirects and reports errors as every
other request does.  After ``GIVE_UP`` failures before a first success the fast
path turns itself off for the backend (a store it cannot talk to this way).
It is not used when a proxy is configured in the environment (botocore honours the
``*_PROXY`` variables, urllib3 does not) or when ``VDISK_S3_FAST_GET=0``.

Thread-safe: the URL table has a lock; urllib3's pool is thread-safe.
"""

from __future__ import annotations

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
    def __init__(self, client, bucket: str, connect_timeout: float, read_timeout: float, maxsize: int = 16):
        import urllib3

        self.client = client
        self.bucket = bucket
        kw: dict = {}
        if str(client.meta.endpoint_url).startswith("https:"):
            from botocore.httpsession import get_cert_path

            kw = {"cert_reqs": "CERT_REQUIRED", "ca_certs": os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)}
        self.http = urllib3.PoolManager(num_pools=4, maxsize=maxsize, block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), **kw)
        self._urls: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._failures = 0
        self.on = True
        self.hits = 0
        self.fallbacks = 0

    def _url(self, key: str) -> str:
        now = time.monotonic()
        with self._lock:
            u = self._urls.get(key)
        if u is not None and now - u[1] < URL_TTL / 2:
            return u[0]
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                 ExpiresIn=URL_TTL)
        with self._lock:
            if len(self._urls) >= MAX_URLS:
                self._urls.clear()
            self._urls[key] = (url, now)
        return url

    def get_range(self, key: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes of ``key`` from ``offset`` (fewer at its end), or None: the
        caller asks boto3 instead."""
        if not self.on:
            return None
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        try:
            r = self.http.request("GET", self._url(key), headers={"Range": f"bytes={offset}-{offset + length - 1}"},
                                  preload_content=True, decode_content=False, redirect=False)
            status, data = r.status, r.data
            if status == 206:
                cr = r.headers.get("Content-Range", "")
                if not cr.startswith(f"bytes {offset}-") or len(data) > length:
                    data = None  # not the range asked for: let boto3 do it
            elif status == 200:
                data = data[offset:offset + length]
            else:
                data = None
                if status == 403:
                    with self._lock:
                        self._urls.pop(key, None)
        except (HTTPError, OSError, BotoCoreError, ValueError):  # boto3 repeats it and reports what fails
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
        self.http.clear()
