"""The NBD server: one opened image, served to any number of connections.

It sits on the block layer's :class:`~vdisk.block.Image` API (read, write,
write_zeroes, discard, flush, block_status) and never knows the image's format.
The protocol itself (message layouts, the handshake, the checks of a request) is
:mod:`vdisk.export.nbd.proto`, which does no I/O.

Threads
-------
* The main thread runs :meth:`NbdServer.serve_forever`: it waits (``select``) on
  the listening sockets and on a wake-up pipe, accepts connections and starts one
  thread per connection.  :meth:`NbdServer.stop` (thread- and signal-safe: it only
  writes a byte to the pipe) ends it.
* A connection's thread does the handshake, then serves requests one after the
  other.  It reads into one receive buffer (``RECV_BUFFER``, 2 MiB: one 1 MiB write,
  or many small requests a client pipelined -- fio at queue depth 16 sends them in
  bursts), takes every whole request out of it in turn and gathers the replies;
  they leave in one sendmsg when no whole request is left (just before the thread
  would block in recv, so a client waiting for a reply always gets it) or when
  ``REPLY_BATCH`` of them wait.  Measured against one recv per header, one per
  payload and one send per reply (scripts/bench-nbd, separate runs, so roughly):
  fio's 4 KiB random reads at depth 16 went from 50k to 72k IOPS on a vdk image
  and from 67k to 170k on a raw one.  Replies go out in request
  order; the protocol allows any order, but a second thread per connection would
  only add a hand-off, since requests are served one at a time anyway (next
  rule).  A write longer than the buffer is read straight from the socket; the
  largest allocation a request can cause is ``proto.MAX_PAYLOAD`` (32 MiB).

Concurrency rules (what may run at once; which lock guards what)
---------------------------------------------------------------
* ``NbdServer.lock`` (one ``threading.Lock``) guards the image and its whole
  chain: every Image call of every connection runs under it, from start to
  finish, and so do the final flush and close.  Drivers therefore never see two
  calls at once and need not be thread-safe.  Outside the lock, in parallel with
  one Image call: reading requests and write payloads from sockets, checking
  them, encoding replies and sending them.  The GIL is released in socket I/O and
  in the image's pread/pwrite.
* Several connections to one export (multi-conn) share the one opened Image and
  its caches: there is no per-connection cache.  A write is in the image before
  its reply is sent, and a flush flushes the image, so a flush on any connection
  covers every write any connection had a reply for: the server advertises
  ``NBD_FLAG_CAN_MULTI_CONN``.  Writes in flight on two connections at once land
  in whichever order they take the lock, as on a disk.
* FUA: the write and then a flush, under one hold of the lock.
* Shutdown (SIGTERM, SIGINT, :meth:`NbdServer.stop`): stop accepting, shut down
  the reading side of every connection (a request being served finishes and is
  answered; requests not yet read are not), wait for the connection threads,
  then, under the lock, mark the server closed (a thread that did not end in
  time gets ``NBD_ESHUTDOWN`` from then on), flush the image and let the caller
  close it.

Errors
------
A malformed request gets an error reply and the connection goes on, unless the
protocol does not let it go on (bad magic, a write payload over the maximum, an
oversized option): then the connection is closed and the reason logged as one
line.  Other connections are not affected.  An error of the image becomes the
error reply that fits it (``NBD_EIO`` for a corrupt cluster or a failing host
file, ``NBD_ENOSPC`` for a full one), with the message in the structured error
chunk when structured replies were negotiated, and is logged.

Write zeroes and trim
---------------------
WRITE_ZEROES is ``Image.write_zeroes`` (the formats record zeros without writing
them), with or without ``NBD_CMD_FLAG_NO_HOLE``: as in QEMU, no hole is punched
into data that stays allocated, but vdisk's copy-on-write formats cannot promise
that a later write of the range never needs new space anyway.  TRIM is
``Image.discard``; the range then reads as zeros (the protocol asks less).
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import selectors
import socket
import stat
import threading

from ...drivers.base import Status
from ...errors import (
    CorruptImage,
    HostIOError,
    NotSupported,
    OutOfBounds,
    ReadOnlyImage,
    UsageError,
    VdiskError,
)
from . import proto
from .handshake import Handshake

log = logging.getLogger("vdisk.export.nbd")

#: a connection must finish its handshake within this many seconds
HANDSHAKE_TIMEOUT = 30.0
#: connections served at once; more are accepted and closed at once (logged)
MAX_CONNECTIONS = 64
#: seconds shutdown waits for connection threads before closing their sockets
SHUTDOWN_GRACE = 10.0
#: a connection's receive buffer: several pipelined requests, or one 1 MiB write
RECV_BUFFER = (2 << 20) + 4096
#: replies gathered into one sendmsg at most (they are sent earlier when no whole
#: request is left in the receive buffer)
REPLY_BATCH = 16

_FLAGS_OF_STATUS = {
    Status.DATA: 0,
    Status.ZERO: proto.STATE_HOLE | proto.STATE_ZERO,
    Status.UNALLOCATED: proto.STATE_HOLE | proto.STATE_ZERO,
}


class NbdError(VdiskError):
    """The server could not be set up (a bad address, a socket path in use...)."""


# ---------------------------------------------------------------- addresses
def parse_address(spec: str) -> tuple:
    """``unix:PATH`` -> ("unix", PATH); ``tcp:HOST:PORT`` -> ("tcp", HOST, PORT).  HOST
    is required (an IPv6 address in brackets: ``tcp:[::1]:10809``); PORT 0 takes a
    free port."""
    kind, sep, rest = spec.partition(":")
    if kind == "unix" and sep:
        if not rest:
            raise UsageError(f"{spec}: unix: needs a socket path")
        return ("unix", rest)
    if kind == "tcp" and sep:
        host, sep2, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep2 or not host:
            raise UsageError(f"{spec}: expected tcp:HOST:PORT with an explicit HOST (e.g. tcp:127.0.0.1:10809)")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise UsageError(f"{spec}: {port!r} is not a TCP port (0-65535)")
        return ("tcp", host, int(port))
    raise UsageError(f"{spec}: expected unix:PATH or tcp:HOST:PORT")


def _bind_unix(path: str) -> socket.socket:
    path = os.path.abspath(path)
    n = len(os.fsencode(path))
    if n > 107:  # sun_path: 108 bytes with its NUL; qemu and nbd-client pass the path as it is
        raise NbdError(f"{path}: {n} bytes, longer than a Unix socket address holds (107), so no NBD client "
                       "could connect to it; give a shorter path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise NbdError(f"{path}: exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # a stale socket: nobody listens there
        except OSError as exc:
            raise NbdError(f"{path}: cannot check the socket there: {exc.strerror}") from None
        else:
            raise NbdError(f"{path}: a server listens there already")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # the socket gives the whole disk: owner only (before any thread starts)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise NbdError(f"{path}: cannot listen there: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NbdError(f"{host}: cannot resolve the address: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise NbdError(f"{host}:{port}: cannot listen there: {exc.strerror}") from None
    sock.listen(16)
    return sock


# ---------------------------------------------------------------- the server
class NbdServer:
    """Serve ``image`` (an opened :class:`vdisk.block.Image`) as one NBD export.

    ``read_only`` serves it read-only even if it is open for writing.  The caller
    opens and closes the image; :meth:`serve_forever` returns once stopped and the
    image is flushed."""

    def __init__(self, image, *, export_name: str = "", read_only: bool = False, description: str = "",
                 max_connections: int = MAX_CONNECTIONS):
        for what, text in (("export name", export_name), ("description", description)):
            if len(text.encode()) > proto.MAX_STRING or "\0" in text:
                raise UsageError(f"the {what} is longer than {proto.MAX_STRING} bytes or has a NUL")
        self.image = image
        self.read_only = read_only or image.read_only
        self.export = proto.Export(export_name, image.size, self.read_only, description)
        self.lock = threading.Lock()
        self.max_connections = max_connections
        self.listeners: list[tuple[socket.socket, tuple]] = []
        self.closed = False  # under lock: the image is flushed for the last time
        self._conns: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._conns_lock = threading.Lock()
        self._next_id = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        #: requests served (all connections), for benchmarks and tests
        self.requests = 0

    # ------------------------------------------------------------ listening
    def listen(self, spec: str) -> str:
        """Listen on ``unix:PATH`` or ``tcp:HOST:PORT``; returns the address as a
        client names it (a URI qemu-img takes)."""
        addr = parse_address(spec)
        if addr[0] == "unix":
            sock = _bind_unix(addr[1])
            path = os.path.abspath(addr[1])
            self.listeners.append((sock, ("unix", path)))
            return f"nbd+unix:///{self.export.name}?socket={path}"
        sock = _bind_tcp(addr[1], addr[2])
        host, port = sock.getsockname()[:2]
        self.listeners.append((sock, ("tcp", host, port)))
        shown = f"[{host}]" if ":" in host else host
        return f"nbd://{shown}:{port}/{self.export.name}"

    def connections(self) -> int:
        """How many clients are connected now."""
        with self._conns_lock:
            return len(self._conns)

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (safe from a signal handler or any thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ------------------------------------------------------------ main loop
    def serve_forever(self) -> None:
        if not self.listeners:
            raise UsageError("the server listens nowhere")
        sel = selectors.DefaultSelector()
        for sock, _ in self.listeners:
            sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        continue
                    self._accept(key.fileobj)
        finally:
            sel.close()
            try:
                self._shutdown()
            finally:
                self.close()

    def _accept(self, lsock: socket.socket) -> None:
        try:
            conn, peer = lsock.accept()
        except OSError as exc:
            if exc.errno not in (_errno.EAGAIN, _errno.ECONNABORTED, _errno.EINTR):
                log.warning("accept: %s", exc.strerror)
            return
        peer_name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        with self._conns_lock:
            if len(self._conns) >= self.max_connections:
                log.warning("%s: refused, %d connections are served already", peer_name, len(self._conns))
                conn.close()
                return
            self._next_id += 1
            cid = self._next_id
            t = threading.Thread(target=self._connection, args=(cid, conn, f"#{cid} ({peer_name})"),
                                 name=f"nbd-conn-{cid}", daemon=True)
            self._conns[cid] = (conn, t)
        t.start()

    def _shutdown(self) -> None:
        self._close_listeners()
        with self._conns_lock:
            conns = list(self._conns.values())
        for conn, _ in conns:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        for conn, t in conns:
            t.join(SHUTDOWN_GRACE)
            if t.is_alive():
                log.warning("%s: still busy after %g s; closing it", t.name, SHUTDOWN_GRACE)
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self.lock:
            self.closed = True
            if not self.image.read_only:
                self.image.flush()

    def _close_listeners(self) -> None:
        for sock, addr in self.listeners:
            sock.close()
            if addr[0] == "unix":
                try:
                    os.unlink(addr[1])
                except OSError:
                    pass
        self.listeners = []

    def close(self) -> None:
        """Release what :meth:`listen` and the constructor took (idempotent); for a
        server that never served, or after :meth:`serve_forever`."""
        self._close_listeners()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------ one connection
    def _connection(self, cid: int, conn: socket.socket, name: str) -> None:
        try:
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            neg = self._handshake(conn)
            if neg is not None:
                log.info("%s: serving export %r (structured replies %s, block status %s)", name,
                         neg.export.name, "on" if neg.structured else "off", "on" if neg.contexts else "off")
                self._transmission(conn, neg)
        except proto.ProtocolError as exc:
            log.warning("%s: %s; closing the connection", name, exc.message)
        except (ConnectionError, TimeoutError) as exc:
            log.info("%s: connection lost (%s)", name, exc)
        except OSError as exc:
            log.info("%s: connection lost (%s)", name, exc.strerror or exc)
        except Exception:  # a bug: this connection ends, the server goes on
            log.exception("%s: internal error; closing the connection", name)
        finally:
            try:
                conn.close()
            except OSError:
                pass
            with self._conns_lock:
                self._conns.pop(cid, None)
            log.info("%s: closed", name)

    def _handshake(self, conn: socket.socket) -> proto.Negotiated | None:
        hs = Handshake([self.export])
        conn.settimeout(HANDSHAKE_TIMEOUT)
        conn.sendall(hs.greeting())
        while hs.state not in ("transmission", "closed"):
            n = hs.bytes_needed()
            data = _recv_exact(conn, n)
            if data is None:
                return None  # the client went away during the handshake
            out = hs.receive(data)
            if out:
                conn.sendall(out)
        conn.settimeout(None)
        return hs.negotiated if hs.state == "transmission" else None

    def _transmission(self, conn: socket.socket, neg: proto.Negotiated) -> None:
        """Serve requests until the client disconnects.  Requests are parsed out of one
        receive buffer (a recv often brings several pipelined requests), and replies
        are gathered and sent in one sendmsg when the buffer has no whole request
        left (before the thread would block in recv) or REPLY_BATCH replies wait."""
        image = self.image
        lock = self.lock
        size = neg.export.size
        structured = neg.structured
        read_only = neg.export.read_only
        buf = bytearray(RECV_BUFFER)
        mv = memoryview(buf)
        start = end = 0
        pending: list = []
        unpack_from = proto.REQUEST.unpack_from
        recv_into = conn.recv_into
        read_header = proto.read_chunk_header
        simple = proto.simple_reply
        HDR = proto.REQUEST_SIZE
        REQ_MAGIC = proto.REQUEST_MAGIC
        READ, WRITE, MAX = proto.CMD_READ, proto.CMD_WRITE, proto.MAX_PAYLOAD
        batch = REPLY_BATCH
        count = 0

        def fill(n: int) -> bool:
            """At least ``n`` bytes (n <= RECV_BUFFER) at buf[start:end]; False on EOF.
            Sends the pending replies first: the client may wait for them."""
            nonlocal start, end
            if pending:
                _send_all(conn, pending)
                pending.clear()
            if start == end:
                start = end = 0
            elif start + n > RECV_BUFFER:
                buf[: end - start] = buf[start:end]  # a copy first: the ranges may overlap
                end -= start
                start = 0
            while end - start < n:
                got = recv_into(mv[end:], RECV_BUFFER - end)
                if got == 0:
                    return False
                end += got
            return True

        try:
            while True:
                if end - start < HDR and not fill(HDR):
                    if end != start:
                        raise proto.ProtocolError("the client closed the connection in the middle of a request")
                    return
                magic, flags, cmd, cookie, offset, length = unpack_from(buf, start)
                start += HDR
                if magic != REQ_MAGIC:
                    what = " (extended headers, never negotiated)" if magic == proto.EXTENDED_REQUEST_MAGIC else ""
                    raise proto.ProtocolError(f"bad request magic {magic:#x}{what}")
                count += 1
                data = None
                if cmd == WRITE:
                    if length > MAX:
                        raise proto.ProtocolError(f"write of {length} bytes, more than the maximum payload of {MAX}")
                    if length <= RECV_BUFFER:
                        if end - start < length and not fill(length):
                            raise proto.ProtocolError("the client closed the connection in the middle of a "
                                                      "write's payload")
                        data = bytes(mv[start : start + length])
                        start += length
                    else:
                        head = bytes(mv[start:end])
                        start = end = 0
                        data = head + _recv_payload(conn, length - len(head))
                # the fast paths: plain reads and writes within the export
                if cmd == READ and not flags and 0 < length <= MAX and offset + length <= size:
                    with lock:
                        if self.closed:
                            res = None
                        else:
                            try:
                                res = image.read(offset, length)
                            except VdiskError as exc:
                                res = exc
                    if type(res) is bytes:
                        pending.append(read_header(cookie, offset, length) if structured else simple(cookie))
                        pending.append(res)
                    else:
                        pending.append(self._failure(neg, cookie, "read", offset, res))
                elif cmd == WRITE and not flags and length and offset + length <= size and not read_only:
                    with lock:
                        if self.closed:
                            res = None
                        else:
                            try:
                                image.write(offset, data)
                                res = False
                            except VdiskError as exc:
                                res = exc
                    pending.append(simple(cookie) if res is False else
                                   self._failure(neg, cookie, "write", offset, res))
                elif cmd == proto.CMD_DISC:
                    return
                else:
                    pending.append(self._slow_request(neg, flags, cmd, cookie, offset, length, data))
                if len(pending) >= batch:
                    _send_all(conn, pending)
                    pending.clear()
        finally:
            if pending:
                try:
                    _send_all(conn, pending)
                except OSError:
                    pass
            with self._conns_lock:
                self.requests += count

    def _slow_request(self, neg: proto.Negotiated, flags: int, cmd: int, cookie: int, offset: int,
                      length: int, data: bytes | None):
        """Every request but a plain read or write (``data``: a write's payload); the
        reply, as bytes or a list of buffers."""
        bad = proto.check_request(neg, flags, cmd, offset, length)
        if bad is not None:
            return proto.error_reply(neg, cookie, bad[0], bad[1])
        name = proto.COMMAND_NAMES[cmd]
        fua = flags & proto.CMD_FLAG_FUA
        image = self.image
        reply = None
        with self.lock:
            if self.closed:
                return proto.error_reply(neg, cookie, proto.ESHUTDOWN, "the server is shutting down")
            try:
                if cmd == proto.CMD_READ:
                    data = image.read(offset, length) if length else b""
                elif cmd == proto.CMD_WRITE:
                    image.write(offset, data)
                elif cmd == proto.CMD_WRITE_ZEROES:
                    image.write_zeroes(offset, length)
                elif cmd == proto.CMD_TRIM:
                    try:
                        image.discard(offset, length)
                    except NotSupported:
                        pass  # trim is advice
                elif cmd == proto.CMD_FLUSH:
                    image.flush()
                elif cmd == proto.CMD_BLOCK_STATUS:
                    span = min(length, proto.STATUS_SPAN, neg.export.size - offset)
                    exts = image.block_status(offset, span)
                    descs = proto.descriptors(((e.length, _FLAGS_OF_STATUS[e.status]) for e in exts), span,
                                              bool(flags & proto.CMD_FLAG_REQ_ONE))
                    ids = sorted(neg.contexts)
                    reply = b"".join(proto.block_status_chunk(cookie, cid, descs, done=cid == ids[-1])
                                     for cid in ids)
                # CMD_CACHE: nothing to do (every read goes to the image anyway)
                if fua and cmd in (proto.CMD_WRITE, proto.CMD_WRITE_ZEROES, proto.CMD_TRIM):
                    image.flush()
            except VdiskError as exc:
                return self._failure(neg, cookie, name, offset, exc)
        if cmd == proto.CMD_READ:
            if neg.structured:
                if not length:
                    return proto.none_chunk(cookie)
                return proto.read_chunk_header(cookie, offset, length) + data
            return proto.simple_reply(cookie) + data
        if reply is not None:
            return reply
        return proto.ok_reply(neg, cookie)

    def _failure(self, neg: proto.Negotiated, cookie: int, what: str, offset: int, exc) -> bytes:
        """The error reply for a failed Image call (``exc`` None: the server is closing)."""
        if exc is None:
            return proto.error_reply(neg, cookie, proto.ESHUTDOWN, "the server is shutting down")
        if isinstance(exc, ReadOnlyImage):
            code = proto.EPERM
        elif isinstance(exc, OutOfBounds):
            code = proto.EINVAL
        elif isinstance(exc, HostIOError) and exc.errno in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
            code = proto.ENOSPC
        elif isinstance(exc, NotSupported):
            code = proto.ENOTSUP
        else:
            code = proto.EIO
        level = logging.ERROR if isinstance(exc, (CorruptImage, HostIOError)) else logging.WARNING
        log.log(level, "%s at %d: %s", what, offset, exc.message)
        return proto.error_reply(neg, cookie, code, exc.message)


# ---------------------------------------------------------------- socket helpers
def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None if the peer closed the connection first."""
    if n == 0:
        return b""
    data = conn.recv(n, socket.MSG_WAITALL)
    if len(data) == n:
        return data
    if not data:
        return None
    parts = [data]
    got = len(data)
    while got < n:
        more = conn.recv(n - got, socket.MSG_WAITALL)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _recv_payload(conn: socket.socket, length: int) -> bytes:
    data = _recv_exact(conn, length)
    if data is None:
        raise proto.ProtocolError("the client closed the connection in the middle of a write's payload")
    return data


def _send_all(conn: socket.socket, bufs: list) -> None:
    """Send every buffer of ``bufs``, in order, in one sendmsg when the socket takes it all."""
    sent = conn.sendmsg(bufs)
    total = 0
    for b in bufs:
        total += len(b)
    if sent < total:
        conn.sendall(b"".join(bufs)[sent:])
