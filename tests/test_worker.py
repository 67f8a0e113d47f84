"""vdisk.ops.worker: the copy engine's one worker thread, and what using it instead of
concurrent.futures saves every in-process convert."""

import os
import subprocess
import sys
import threading

import pytest
from conftest import vdisk_command
from vdisk.ops.worker import Worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jobs_run_in_order_in_one_other_thread_and_return_their_results():
    ran = []

    def job(i):
        ran.append((i, threading.current_thread().name))
        return i * i

    with Worker("t-worker") as w:
        jobs = [w.submit(job, i) for i in range(50)]
        assert [j.result() for j in jobs] == [i * i for i in range(50)]
    assert [i for i, _ in ran] == list(range(50))
    assert {name for _, name in ran} == {"t-worker"}
    assert all(j.done() for j in jobs)


def test_a_job_that_raises_raises_in_the_waiter_and_the_next_jobs_still_run():
    with Worker("t-worker") as w:
        bad = w.submit(lambda: 1 // 0)
        good = w.submit(lambda: "after")
        with pytest.raises(ZeroDivisionError):
            bad.result()
        assert good.result() == "after"


def test_a_cancelled_job_not_yet_started_is_skipped_and_leaving_waits_for_the_rest():
    gate = threading.Event()
    ran = []
    w = Worker("t-worker")
    with w:
        first = w.submit(lambda: (gate.wait(10), ran.append("first")))
        skipped = w.submit(ran.append, "skipped")
        last = w.submit(ran.append, "last")
        skipped.cancel()
        assert not first.done() and not last.done()
        gate.set()
    # leaving the block waited: every job has run or was skipped, the thread is gone
    assert ran == ["first", "last"]
    assert skipped.done() and skipped.result() is None
    assert not w._thread.is_alive()


def test_leaving_a_block_that_submitted_nothing_starts_no_thread():
    before = threading.active_count()
    with Worker("t-worker") as w:
        pass
    assert w._thread is None and threading.active_count() == before


def test_an_in_process_convert_imports_neither_logging_nor_concurrent_futures(tmp_path):
    """The start-up the worker (and the lazy imports of vdk's compression pool, ctypes
    and signal) saves: a convert to vdk and to qcow2, in-process, loads none of them
    but ctypes (hostmem's mallopt needs it); what it wrote reads back right."""
    src = tmp_path / "src.raw"
    data = os.urandom(3 << 20)
    src.write_bytes(data + bytes(1 << 20) + data[:1 << 20])
    probe = (
        "import sys\n"
        "from vdisk.cli import main\n"
        "sys.argv = ['vdisk'] + sys.argv[1:]\n"
        "try:\n"
        "    code = main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "assert not code, code\n"
        "bad = [m for m in ('logging', 'concurrent.futures', 'signal') if m in sys.modules]\n"
        "print(bad)\n"
    )
    for fmt in ("vdk", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        r = subprocess.run([sys.executable, "-c", probe, "convert", "-f", "raw", "-O", fmt, str(src), str(out)],
                           cwd=ROOT, env=dict(os.environ, VDISK_NO_COMMAND_SERVER="1"),
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
        r = subprocess.run(vdisk_command() + ["compare", "-q", str(src), str(out)], cwd=ROOT,
                           env=dict(os.environ, VDISK_NO_COMMAND_SERVER="1"), capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
