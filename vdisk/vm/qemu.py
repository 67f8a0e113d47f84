"""Running a guest built by :mod:`vdisk.vm.guest` under QEMU, and talking to it.

:class:`Guest` starts ``qemu-system-x86_64 -accel tcg`` (KVM is not available on
the machines this runs on) with the guest's kernel and initramfs, and one disk: a
file QEMU opens as a virtio drive -- normally ``MOUNTPOINT/disk`` of a ``vdisk
mount`` as raw, so that every request of the guest goes through vdisk (benchmarks
also hand QEMU a qcow2 file for its own driver: ``disk_format``).  The
kernel's console goes to ``console.log`` in the run directory; the guest's agent
(``/sbin/vdisk-init``) listens on the second serial port, which QEMU connects to a
unix socket in the run directory.  :meth:`Guest.run` sends one shell command line
and returns its output and exit status.

Every wait is bounded; :meth:`Guest.kill` (also on ``__exit__``) stops QEMU
whatever state it is in, so a test cleans up even when the guest hangs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from ..errors import VdiskError

QEMU = "qemu-system-x86_64"


class GuestError(VdiskError):
    """The guest did not boot, did not answer, or a command failed."""


class Guest:
    def __init__(self, build_dir: str, disk: str, run_dir: str, *, memory_mb: int = 512,
                 cache: str = "none", extra_append: str = "", disk_format: str = "raw"):
        self.build_dir = build_dir
        self.disk = disk
        self.run_dir = run_dir
        self.memory_mb = memory_mb
        self.cache = cache
        self.disk_format = disk_format
        self.extra_append = extra_append
        self.console_log = os.path.join(run_dir, "console.log")
        self.agent_path = os.path.join(run_dir, "agent.sock")
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self.boot_seconds: float | None = None

    def command(self) -> list[str]:
        b = self.build_dir
        append = f"console=ttyS0 panic=-1 loglevel=4 {self.extra_append}".strip()
        return [
            QEMU, "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-smp", "1", "-m", str(self.memory_mb),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", os.path.join(b, "vmlinuz"), "-initrd", os.path.join(b, "initrd.img"), "-append", append,
            "-drive", f"file={self.disk},format={self.disk_format},if=virtio,cache={self.cache},aio=threads",
            "-serial", f"file:{self.console_log}",
            "-chardev", f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-device", "isa-serial,chardev=agent",
            "-nic", "none",
        ]

    def start(self, boot_timeout: float = 240.0) -> None:
        """Start QEMU and wait until the guest's agent says it is ready."""
        t0 = time.monotonic()
        try:
            with open(os.path.join(self.run_dir, "qemu.stderr"), "wb") as err:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=err, start_new_session=True)
        except FileNotFoundError:
            raise GuestError(f"{QEMU} is missing (run scripts/setup.sh: Debian package qemu-system-x86)") from None
        deadline = t0 + boot_timeout
        while self._sock is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise GuestError(f"QEMU did not open its agent socket in {boot_timeout:g} s")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.agent_path)
                self._sock = s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                time.sleep(0.05)
        self._read_until(b"@@READY\n", deadline, "the guest's agent to start")
        self.boot_seconds = time.monotonic() - t0

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise GuestError(f"QEMU exited with status {self.proc.returncode}; console: {self.console_tail()}")

    def console_tail(self, n: int = 5) -> str:
        try:
            with open(self.console_log, "rb") as f:
                lines = f.read().decode(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no console output)"
        return " / ".join(lines[-n:]) or "(no console output)"

    def _read_until(self, marker: bytes, deadline: float, what: str) -> bytes:
        assert self._sock is not None
        while marker not in self._buf:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"timed out waiting for {what}; console: {self.console_tail()}")
            self._sock.settimeout(min(left, 1.0))
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"the guest's agent hung up while waiting for {what}")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def run(self, line: str, timeout: float = 120.0, check: bool = True) -> tuple[int, str]:
        """Run one shell command line in the guest; (status, output)."""
        if "\n" in line:
            raise ValueError("one line per command")
        assert self._sock is not None
        self._sock.sendall(line.encode() + b"\n")
        out = self._read_until(b"@@RC ", time.monotonic() + timeout, f"`{line[:60]}`")
        rest = self._read_until(b"\n", time.monotonic() + 10, "the status line")
        status = int(rest.strip() or b"255")
        text = out.decode(errors="replace").replace("\r", "")
        if check and status != 0:
            raise GuestError(f"guest command `{line[:80]}` exited {status}: {text.strip()[-300:]}")
        return status, text

    def poweroff(self, timeout: float = 120.0) -> int:
        """Remount the root read-only (so it is clean on the disk) and power off; QEMU's
        exit status."""
        self.run("sync && mount -o remount,ro / && sync", timeout=timeout)
        assert self._sock is not None
        self._sock.sendall(b"echo o > /proc/sysrq-trigger\n")
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"the guest did not power off in {timeout:g} s") from None

    def kill(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> Guest:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
