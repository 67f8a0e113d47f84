"""One worker thread that runs jobs in the order they were given: what the copy
engine needs of ``concurrent.futures.ThreadPoolExecutor(max_workers=1)``.

Why not that executor: importing :mod:`concurrent.futures` imports :mod:`logging`
(with traceback, string and textwrap), 5-8 ms of every ``vdisk convert``'s start-up,
which issue 10 counts against qemu-img's 5 ms.  This is the part of it the copy
engine uses: ``submit``, a job's ``result`` / ``done`` / ``cancel``, and a ``with``
block that ends after the thread has run (or skipped) every job.
"""

from __future__ import annotations

import threading
from queue import SimpleQueue
from typing import Any, Callable


class Job:
    """A job given to a :class:`Worker`: its function and arguments, then its outcome."""

    __slots__ = ("_fn", "_args", "_finished", "_result", "_error", "_cancelled")

    def __init__(self, fn: Callable, args: tuple):
        self._fn, self._args = fn, args
        self._finished = threading.Lock()
        self._finished.acquire()  # released when the job has run or was skipped
        self._result: Any = None
        self._error: BaseException | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Skip the job if the thread has not started it (a started one runs to its end)."""
        self._cancelled = True

    def done(self) -> bool:
        return not self._finished.locked()

    def result(self) -> Any:
        """Wait for the job; its return value, or raise what it raised.  A cancelled
        job that was skipped returns None."""
        with self._finished:
            pass
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self) -> None:
        try:
            if not self._cancelled:
                self._result = self._fn(*self._args)
        except BaseException as exc:  # handed to whoever waits for the result
            self._error = exc
        finally:
            self._fn = self._args = None
            self._finished.release()


class Worker:
    """``with Worker(name) as w: job = w.submit(fn, *args)``.  Jobs run one at a time,
    in order, in one daemon thread started at the first ``submit``; leaving the block
    waits until the thread has run or skipped every job given to it."""

    def __init__(self, name: str):
        self._name = name
        self._jobs: SimpleQueue = SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable, *args) -> Job:
        job = Job(fn, args)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)
        return job

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job._run()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
