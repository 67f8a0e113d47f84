"""``vdisk serve --nbd`` against QEMU's own NBD clients (qemu-img, qemu-io) and a raw
socket: data, trim and write-zeroes, block status, several clients, read-only and
snapshot exports, malformed input, shutdown.  Servers listen on unix sockets or
127.0.0.1 only and are stopped at teardown, also when a test fails."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest
from conftest import vdisk_command

import vdisk
from vdisk.export.fuse import control
from vdisk.export.nbd import proto

pytestmark = pytest.mark.usefixtures("require_qemu")

SIZE = 16 << 20


class Server:
    """A running ``vdisk serve``; ``uri`` is what it printed."""

    def __init__(self, image, *args, sockdir):
        self.sock = os.path.join(sockdir, f"s{len(os.listdir(sockdir))}.sock")
        self.argv = vdisk_command() + ["serve", "--nbd", f"unix:{self.sock}", *map(str, args), str(image)]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if not line.startswith("serving "):
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"`{' '.join(self.argv)}` did not start: {line}{out}{err}", pytrace=False)
        self.line = line.strip()
        self.uri = self.line.rsplit(" at ", 1)[1]
        assert os.path.exists(self.sock)

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr = self.proc.stderr.read()
        return self.proc.returncode


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="nbd", dir="/tmp")  # unix socket paths are short
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve(sockdir):
    servers = []

    def start(image, *args):
        s = Server(image, *args, sockdir=sockdir)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def qemu(*args, expect=0, timeout=60):
    r = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if expect is not None and r.returncode != expect:
        pytest.fail(f"`{' '.join(map(str, args))}` exited {r.returncode}\n{r.stdout}\n{r.stderr}", pytrace=False)
    return r


def qemu_io(uri, *cmds, expect=0, read_only=False):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    r = qemu(*args, uri, expect=expect)
    assert "failed" not in r.stdout + r.stderr or expect != 0, r.stdout + r.stderr
    return r


def data_ranges(uri) -> list[tuple[int, int]]:
    """(start, end) of the ranges ``qemu-img map`` over NBD calls data, merged."""
    out = json.loads(qemu("qemu-img", "map", "--output", "json", "-f", "raw", uri).stdout)
    ranges: list[list[int]] = []
    for e in out:
        if e["data"]:
            if ranges and ranges[-1][1] == e["start"]:
                ranges[-1][1] += e["length"]
            else:
                ranges.append([e["start"], e["start"] + e["length"]])
    return [tuple(r) for r in ranges]


def check_clean(run_vdisk, path):
    run_vdisk("check", path)


# ---------------------------------------------------------------- data through qemu-io
@pytest.mark.parametrize("fmt", ["vdk", "qcow2"])
def test_qemu_io_write_read_discard_write_zeroes(image_dir, serve, run_vdisk, fmt):
    img = image_dir / f"d.{fmt}"
    vdisk.create(img, SIZE, format=fmt)
    s = serve(img)
    assert f"({fmt}, read-write, {SIZE} bytes)" in s.line
    info = qemu("qemu-img", "info", "--output", "json", s.uri).stdout
    assert json.loads(info)["virtual-size"] == SIZE
    qemu_io(s.uri, "write -P 0xab 0 64k", "read -P 0xab 0 64k",
            "write -P 0xcd 1M 192k", "write -z 1M 64k", "discard 1088k 64k", "flush",
            "read -P 0 1M 128k", "read -P 0xcd 1152k 64k", "write -f -P 0x11 4m 4k")  # -f: FUA
    assert s.stop() == 0
    check_clean(run_vdisk, img)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, 65536) == b"\xab" * 65536
        assert im.read(1 << 20, 128 << 10) == bytes(128 << 10)
        assert im.read(1152 << 10, 64 << 10) == b"\xcd" * (64 << 10)
        assert im.read(4 << 20, 4096) == b"\x11" * 4096


def test_unaligned_requests(image_dir, serve, run_vdisk):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    # qemu's client sends what the server's minimum block size (1) allows
    qemu_io(s.uri, "write -P 0x5a 1000 3333", "read -P 0x5a 1000 3333", "read -P 0 0 1000",
            "read -P 0 4333 100")
    assert s.stop() == 0
    with vdisk.open(img, read_only=True) as im:
        assert im.read(999, 3335) == b"\0" + b"\x5a" * 3333 + b"\0"


# ---------------------------------------------------------------- block status
def test_map_over_nbd_shows_the_images_allocation(image_dir, serve):
    img = image_dir / "d.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", img, SIZE)
    qemu("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -P 2 4M 64k", "-c", "write -z 8M 1M",
         "-c", "write -P 3 15M 1M", img)
    direct = json.loads(qemu("qemu-img", "map", "--output", "json", "-f", "qcow2", img).stdout)
    want = [(e["start"], e["start"] + e["length"]) for e in direct if e["data"]]
    s = serve(img)
    assert data_ranges(s.uri) == want == [(0, 128 << 10), (4 << 20, (4 << 20) + (64 << 10)), (15 << 20, 16 << 20)]
    # the zeroed megabyte is a hole that reads as zeros
    out = json.loads(qemu("qemu-img", "map", "--output", "json", "-f", "raw", s.uri).stdout)
    at8m = next(e for e in out if e["start"] <= 8 << 20 < e["start"] + e["length"])
    assert at8m["zero"] and not at8m["data"]
    # and after a discard over NBD the range is a hole again
    qemu_io(s.uri, "discard 4M 64k")
    assert data_ranges(s.uri) == [(0, 128 << 10), (15 << 20, 16 << 20)]


def test_linked_clone_served_with_its_backing_data(image_dir, serve, run_vdisk):
    base = image_dir / "base.vdk"
    vdisk.create(base, SIZE)
    with vdisk.open(base) as im:
        im.write(0, b"\x42" * (1 << 20))
        im.snapshot_create("golden")
    run_vdisk("clone", f"{base}@golden", image_dir / "clone.vdk")
    s = serve(image_dir / "clone.vdk")
    qemu_io(s.uri, "read -P 0x42 0 1M", "write -P 0x77 64k 64k", "read -P 0x77 64k 64k", "read -P 0x42 128k 64k")
    # backing data counts as data for block status (it is what the disk holds)
    assert data_ranges(s.uri) == [(0, 1 << 20)]
    assert s.stop() == 0
    check_clean(run_vdisk, image_dir / "clone.vdk")
    with vdisk.open(base, read_only=True) as im:
        assert im.read(64 << 10, 65536) == b"\x42" * 65536  # the base is untouched
    with vdisk.open(image_dir / "clone.vdk", read_only=True) as im:
        assert im.read(64 << 10, 65536) == b"\x77" * 65536


# ---------------------------------------------------------------- qemu-img convert / compare
def test_convert_from_and_into_the_export(image_dir, serve, run_vdisk):
    src = image_dir / "src.raw"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
        f.seek(11 << 20)
        f.write(b"tail" * 1000)
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    qemu("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri)
    qemu("qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri)
    out = image_dir / "out.qcow2"
    qemu("qemu-img", "convert", "-f", "raw", "-O", "qcow2", s.uri, out)
    qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2", s.uri, out)
    assert s.stop() == 0
    check_clean(run_vdisk, img)
    qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, out)
    with vdisk.open(img, read_only=True) as im, open(src, "rb") as f:
        assert im.read(0, SIZE) == f.read()


# ---------------------------------------------------------------- several clients
def test_two_clients_at_once(image_dir, serve, run_vdisk):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    procs = [subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {0x10 + i} {i * 4}M 4M", "-c",
                               f"read -P {0x10 + i} {i * 4}M 4M", s.uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    # a third client holds a connection open meanwhile and still gets answers
    c = RawClient(s.sock)
    c.go()
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and "failed" not in out, out
    c.send(proto.request(proto.CMD_READ, 1, 4 << 20, 4096))
    assert c.read_reply(4096) == (0, bytes([0x11]) * 4096)
    c.close()
    assert s.stop() == 0
    check_clean(run_vdisk, img)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, 4 << 20) == b"\x10" * (4 << 20)
        assert im.read(4 << 20, 4 << 20) == b"\x11" * (4 << 20)


# ---------------------------------------------------------------- read-only exports
def test_read_only_export_refuses_writes(image_dir, serve):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    with vdisk.open(img) as im:
        im.write(0, b"\x99" * 4096)
    s = serve(img, "-r", "--export-name", "ro")
    assert "read-only" in s.line and s.uri.startswith("nbd+unix:///ro?socket=")
    qemu_io(s.uri, "read -P 0x99 0 4k", read_only=True)
    # qemu sees NBD_FLAG_READ_ONLY and refuses to open the disk for writing
    r = qemu("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", s.uri, expect=1)
    assert "Permission denied" in r.stderr
    c = RawClient(s.sock)
    c.go("ro")
    c.send(proto.request(proto.CMD_WRITE, 5, 0, 4) + b"abcd")
    assert c.read_reply()[0] == proto.EPERM
    c.close()
    s.stop()
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, 4096) == b"\x99" * 4096


def test_snapshot_export(image_dir, serve):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    with vdisk.open(img) as im:
        im.write(0, b"\x01" * 4096)
        im.snapshot_create("s1")
        im.write(0, b"\x02" * 4096)
    s = serve(f"{img}@s1")
    assert "read-only" in s.line
    qemu_io(s.uri, "read -P 1 0 4k", read_only=True)
    # the image itself stays writable meanwhile
    with vdisk.open(img) as im:
        im.write(4096, b"\x03" * 4096)
    qemu_io(s.uri, "read -P 0 4k 4k", read_only=True)


def test_unknown_export_name_is_refused(image_dir, serve):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img, "--export-name", "disk")
    r = qemu("qemu-img", "info", f"nbd+unix:///other?socket={s.sock}", expect=1)
    assert "other" in r.stderr
    qemu("qemu-img", "info", f"nbd+unix:///disk?socket={s.sock}")
    qemu("qemu-img", "info", f"nbd+unix:///?socket={s.sock}")  # the default export


# ---------------------------------------------------------------- malformed input
class RawClient:
    """A minimal NBD client on a raw socket (structured replies, base:allocation)."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(path)

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            more = self.s.recv(n - len(buf))
            if not more:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += more
        return buf

    def send(self, data):
        self.s.sendall(data)

    def option(self, opt, data=b""):
        self.send(proto.client_option(opt, data))
        replies = []
        while True:
            magic, o, rtype, n = proto.OPTION_REPLY.unpack(self.recv(20))
            assert magic == proto.OPTION_REPLY_MAGIC and o == opt
            replies.append((rtype, self.recv(n)))
            if rtype != proto.REP_INFO and rtype != proto.REP_META_CONTEXT and rtype != proto.REP_SERVER:
                return replies

    def go(self, name=""):
        self.recv(18)
        self.send(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
        assert self.option(proto.OPT_STRUCTURED_REPLY)[-1][0] == proto.REP_ACK
        assert self.option(proto.OPT_SET_META_CONTEXT, proto.meta_context_data(name, ("base:allocation",))
                           )[-1][0] == proto.REP_ACK
        assert self.option(proto.OPT_GO, proto.info_request_data(name, (proto.INFO_BLOCK_SIZE,)))[-1][0] == \
            proto.REP_ACK

    def read_reply(self, n=0):
        """(error, data) of the next reply (structured chunks up to the DONE one)."""
        data, error = b"", 0
        while True:
            head = self.recv(4)
            if head == struct.pack(">I", proto.SIMPLE_REPLY_MAGIC):  # no data: a write's, flush's ...
                _, error, _ = proto.SIMPLE_REPLY.unpack(head + self.recv(12))
                return error, data
            magic, flags, rtype, _cookie, length = proto.CHUNK.unpack(head + self.recv(16))
            assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
            payload = self.recv(length)
            if rtype == proto.REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
                data += payload
            elif rtype & 0x8000:
                error = struct.unpack(">I", payload[:4])[0]
            if flags & proto.REPLY_FLAG_DONE:
                return error, data

    def closed(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.s.close()


def test_malformed_requests_get_errors_or_a_close_and_the_server_goes_on(image_dir, serve, run_vdisk):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    # 1. garbage instead of client flags: closed
    c = RawClient(s.sock)
    c.recv(18)
    c.send(b"\xff" * 64)
    assert c.closed()
    # 2. an option far over the length limit: closed, without the server reading it
    c = RawClient(s.sock)
    c.recv(18)
    c.send(struct.pack(">I", 1) + proto.OPTION_HEADER.pack(proto.IHAVEOPT, proto.OPT_GO, 1 << 31))
    assert c.closed()
    # 3. in transmission: bad requests get error replies, and the connection goes on
    c = RawClient(s.sock)
    c.go()
    c.send(proto.request(42, 1))
    assert c.read_reply()[0] == proto.EINVAL
    c.send(proto.request(proto.CMD_READ, 2, SIZE - 512, 1024))
    assert c.read_reply()[0] == proto.EINVAL
    c.send(proto.request(proto.CMD_WRITE, 3, SIZE, 4) + b"abcd")  # past the end: payload read, refused
    assert c.read_reply()[0] == proto.ENOSPC
    c.send(proto.request(proto.CMD_READ, 4, 0, 4096, flags=1 << 12))  # unknown flag
    assert c.read_reply()[0] == proto.EINVAL
    c.send(proto.request(proto.CMD_BLOCK_STATUS, 5, 0, SIZE))
    err, payload = c.read_reply()
    assert err == 0 and struct.unpack(">III", payload) == (1, SIZE, proto.STATE_HOLE | proto.STATE_ZERO)
    c.send(proto.request(proto.CMD_WRITE, 6, 0, 4) + b"abcd")
    assert c.read_reply() == (0, b"")  # a write's reply is a simple one ...
    c.send(proto.request(proto.CMD_READ, 7, 0, 4))
    assert c.read_reply() == (0, b"abcd")
    # 4. a write bigger than the maximum payload: closed (its payload is not read)
    c.send(proto.request(proto.CMD_WRITE, 8, 0, proto.MAX_PAYLOAD + 1))
    assert c.closed()
    # 5. a bad request magic: closed
    c = RawClient(s.sock)
    c.go()
    c.send(b"\0" * 28)
    assert c.closed()
    # 6. a client that goes away mid-request
    c = RawClient(s.sock)
    c.go()
    c.send(proto.request(proto.CMD_WRITE, 9, 0, 4096) + b"x" * 100)
    c.close()
    # the server still serves everyone else
    qemu_io(s.uri, "read -P 0x61 0 1", "write -P 0xee 8k 4k")
    assert s.stop() == 0
    assert "Traceback" not in s.stderr
    check_clean(run_vdisk, img)


def test_block_status_req_one_and_structured_read_of_a_hole(image_dir, serve):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    with vdisk.open(img) as im:
        im.write(1 << 20, b"\x07" * 65536)
    s = serve(img)
    c = RawClient(s.sock)
    c.go()
    c.send(proto.request(proto.CMD_BLOCK_STATUS, 1, 0, SIZE, flags=proto.CMD_FLAG_REQ_ONE))
    assert struct.unpack(">III", c.read_reply()[1]) == (1, 1 << 20, proto.STATE_HOLE | proto.STATE_ZERO)
    c.send(proto.request(proto.CMD_BLOCK_STATUS, 2, 1 << 20, 4096))
    ctx, n, flags = struct.unpack(">III", c.read_reply()[1][:12])
    assert (ctx, flags) == (1, 0) and n >= 4096
    c.send(proto.request(proto.CMD_READ, 3, (1 << 20) - 2, 4, flags=proto.CMD_FLAG_DF))
    assert c.read_reply() == (0, b"\0\0\x07\x07")
    c.send(proto.request(proto.CMD_FLUSH, 4))
    assert c.read_reply() == (0, b"")
    c.send(proto.request(proto.CMD_DISC, 5))
    assert c.closed()


# ---------------------------------------------------------------- lifecycle and the CLI
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_flushes_and_cleans_up(image_dir, serve, run_vdisk, sockdir, sig):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    pidfile = os.path.join(sockdir, "pid")
    s = serve(img, "--pid-file", pidfile)
    with open(pidfile) as f:
        assert int(f.read()) == s.proc.pid
    c = RawClient(s.sock)
    c.go()
    c.send(proto.request(proto.CMD_WRITE, 1, 8192, 5) + b"hello")
    assert c.read_reply() == (0, b"")
    # the client stays connected: the server still stops, flushing first
    assert s.stop(sig) == 0
    assert "Traceback" not in s.stderr
    assert c.closed()
    assert not os.path.exists(s.sock) and not os.path.exists(pidfile)
    check_clean(run_vdisk, img)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(8192, 5) == b"hello"


def test_tcp_on_loopback(image_dir, run_vdisk):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    p = subprocess.Popen(vdisk_command() + ["serve", "--nbd", "tcp:127.0.0.1:0", str(img)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        uri = line.strip().rsplit(" at ", 1)[1]
        assert uri.startswith("nbd://127.0.0.1:") and not uri.startswith("nbd://127.0.0.1:0/")
        qemu_io(uri, "write -P 0x3c 0 64k", "read -P 0x3c 0 64k")
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    assert p.returncode == 0
    with vdisk.open(img, read_only=True) as im:
        assert im.read(0, 65536) == b"\x3c" * 65536


def test_cli_errors(image_dir, run_vdisk, sockdir):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    r = run_vdisk("serve", "--nbd", "tcp::10809", img, expect=1)
    assert "explicit HOST" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    plain = os.path.join(sockdir, "file")
    open(plain, "w").close()
    r = run_vdisk("serve", "--nbd", f"unix:{plain}", img, expect=1)
    assert "not a socket" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_vdisk("serve", "--nbd", f"unix:{sockdir}/x.sock", image_dir / "missing.vdk", expect=1)
    assert "no such file" in r.stderr
    r = run_vdisk("serve", "--nbd", f"unix:{sockdir}/x.sock", "-U", img, expect=1)
    assert "only with -r" in r.stderr
    r = run_vdisk("serve", "--nbd", f"unix:{sockdir}/x.sock", "--export-name", "n" * 5000, img, expect=1)
    assert "export name is longer than 4096 bytes" in r.stderr
    assert not os.path.exists(f"{sockdir}/x.sock")
    long = os.path.join(sockdir, "l" * 120 + ".sock")  # no client could reach it: refused, one line
    r = run_vdisk("serve", "--nbd", f"unix:{long}", img, expect=1)
    assert "longer than a Unix socket address holds" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_second_writer_is_refused_while_served(image_dir, serve, run_vdisk, sockdir):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    serve(img)
    r = run_vdisk("serve", "--nbd", f"unix:{sockdir}/other.sock", img, expect=1)
    assert "in use" in r.stderr
    # QEMU's tools are kept out too (the same OFD locks)
    r = qemu("qemu-io", "-f", "raw", "-c", "write 0 4k", img, expect=1)
    assert "lock" in r.stderr.lower()


def test_snapshot_commands_on_a_served_image_are_done_by_the_server(image_dir, serve, run_vdisk):
    """The server holds the write lock; snapshot create, list, rename, delete, revert and
    a linked clone's hold reach it over its control socket, as with a mount."""
    img, clone = image_dir / "d.vdk", image_dir / "c.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    qemu_io(s.uri, "write -P 0x5a 0 64k")
    run_vdisk("snapshot", "create", img, "s1")
    rows = json.loads(run_vdisk("snapshot", "list", "--output", "json", img).stdout)
    assert [r["name"] for r in rows] == ["s1"]
    run_vdisk("clone", f"{img}@s1", clone)  # records its hold on s1 through the server
    run_vdisk("snapshot", "rename", img, "s1", "gold")
    qemu_io(s.uri, "write -P 0x11 0 64k")
    run_vdisk("snapshot", "create", img, "s2")
    qemu_io(s.uri, "write -P 0x22 0 64k")
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(s.sock)
        assert client.recv(8) == b"NBDMAGIC"  # the server has it as a connection now
        r = run_vdisk("snapshot", "revert", img, "s2", expect=1)
        assert "connected" in r.stderr and "Traceback" not in r.stderr
    finally:
        client.close()
    deadline = time.monotonic() + 20
    while run_vdisk("snapshot", "revert", img, "s2", expect=None).returncode != 0:
        assert time.monotonic() < deadline, "the server still counts the closed connection"
        time.sleep(0.1)
    qemu_io(s.uri, "read -P 0x11 0 64k")
    run_vdisk("snapshot", "delete", img, "gold")  # held by the clone: kept hidden for it
    rows = json.loads(run_vdisk("snapshot", "list", "--output", "json", img).stdout)
    assert [r["name"] for r in rows] == ["s2"]
    assert s.stop() == 0
    check_clean(run_vdisk, img)
    with vdisk.open(clone, read_only=True) as c:
        assert c.read(0, 65536) == b"\x5a" * 65536
    assert not os.path.exists(control.socket_path(str(img)))  # removed on the way out


def test_qemu_nbd_lists_the_export(image_dir, serve):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img, "-r", "--export-name", "disk", "--description", "the test disk")
    out = qemu("qemu-nbd", "-L", "-k", s.sock).stdout  # NBD_OPT_LIST, INFO and LIST_META_CONTEXT
    assert "export: 'disk'" in out and "description: the test disk" in out
    assert f"size:  {SIZE}" in out and "readonly" in out and "multi" in out
    assert "base:allocation" in out and "max block: 33554432" in out


def test_connections_over_the_limit_are_closed_and_the_server_goes_on(image_dir, serve):
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img, "--max-connections", "1")
    first = RawClient(s.sock)
    first.go()
    second = RawClient(s.sock)
    assert second.closed()  # refused before the greeting
    first.send(proto.request(proto.CMD_READ, 1, 0, 512))
    assert first.read_reply() == (0, bytes(512))
    first.send(proto.request(proto.CMD_DISC, 2))
    assert first.closed()
    for _ in range(100):  # the first connection's thread ends soon after its close
        r = qemu("qemu-img", "info", s.uri, expect=None)
        if r.returncode == 0:
            break
        time.sleep(0.05)
    assert r.returncode == 0, r.stderr


def test_pipelined_requests_big_and_small(image_dir, serve, run_vdisk):
    """Many requests in one send, writes larger than the server's receive buffer among
    them: every reply comes, in order, with the right data."""
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    c = RawClient(s.sock)
    c.go()
    big = os.urandom(5 << 20)  # > the 2 MiB receive buffer
    msgs = [proto.request(proto.CMD_WRITE, 1, 0, 4096) + b"a" * 4096,
            proto.request(proto.CMD_WRITE, 2, 1 << 20, len(big)) + big,
            proto.request(proto.CMD_WRITE, 3, 8192, 100) + b"b" * 100,
            proto.request(proto.CMD_READ, 4, 0, 4096),
            proto.request(proto.CMD_WRITE, 5, 12 << 20, (2 << 20) - 100) + b"c" * ((2 << 20) - 100),
            proto.request(proto.CMD_WRITE, 6, 12 << 20, 10, flags=proto.CMD_FLAG_FUA) + b"d" * 10,
            proto.request(proto.CMD_READ, 7, 1 << 20, len(big)),
            proto.request(proto.CMD_READ, 8, 8192, 100)]
    c.send(b"".join(msgs))
    assert c.read_reply() == (0, b"")
    assert c.read_reply() == (0, b"")
    assert c.read_reply() == (0, b"")
    assert c.read_reply() == (0, b"a" * 4096)
    assert c.read_reply() == (0, b"")
    assert c.read_reply() == (0, b"")
    assert c.read_reply() == (0, big)
    assert c.read_reply() == (0, b"b" * 100)
    c.close()
    assert s.stop() == 0
    check_clean(run_vdisk, img)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(12 << 20, 12) == b"d" * 10 + b"cc"


def test_qemu_system_attaches_the_export_as_a_drive(image_dir, serve, run_vdisk):
    """The system emulator's block layer on `-drive file=nbd+unix://...` (no guest OS:
    the monitor's qemu-io command writes and reads through the drive)."""
    img = image_dir / "d.vdk"
    vdisk.create(img, SIZE)
    s = serve(img)
    script = ('qemu-io d0 "write -P 0x6b 1M 64k"\nqemu-io d0 "read -P 0x6b 1M 64k"\n'
              'qemu-io d0 "flush"\ninfo block\nquit\n')
    r = subprocess.run(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
                        "-monitor", "stdio", "-drive", f"file={s.uri},format=raw,if=none,id=d0"],
                       input=script, capture_output=True, text=True, timeout=60, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "read 65536/65536 bytes at offset 1048576" in out and "verification failed" not in out, out
    assert "nbd+unix://" in out
    assert s.stop() == 0
    check_clean(run_vdisk, img)
    with vdisk.open(img, read_only=True) as im:
        assert im.read(1 << 20, 65536) == b"\x6b" * 65536
