"""Layer applies in worker processes of the images process.

Applying a layer is mostly Python work per tar entry, and threads would take turns on
the GIL: two layers extracted "in parallel" by threads take as long as one after the
other. Worker processes extract layers of one pull side by side, one per core.

The workers come from a forkserver (a fresh interpreter that has imported only the
applier), never from a fork of the images process itself, whose ZeroMQ and actor
threads must not be copied. They die with the images process (a pidfd watch), are
started on the first pull, and stop after IDLE_SECONDS without work, so an idle
daemon holds no extra memory. A worker reads a stored blob, or a FIFO that the
layer's download feeds while it arrives.
"""

from __future__ import annotations

import io
import logging
import os
import select
import signal
import stat
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Sequence

from moord.actors import diff
from moord.messages.errors import DeadlineExceeded

log = logging.getLogger(__name__)

IDLE_SECONDS = 60.0
# A layer streamed through a FIFO that stays silent this long is abandoned (its pull
# then applies the stored blob instead).
STREAM_IDLE_SECONDS = 60.0


class PipeReader(io.RawIOBase):
    """The read end of a FIFO fed while a layer downloads: waits (bounded) for each piece."""

    def __init__(self, fd: int, idle: float) -> None:
        super().__init__()
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._idle_ms = int(idle * 1000)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        while True:
            if not self._poll.poll(self._idle_ms):
                raise DeadlineExceeded(f"no layer bytes arrived for {self._idle_ms // 1000} s")
            try:
                return os.readv(self._fd, [buffer])
            except BlockingIOError:
                continue


def _init_worker(owner: int) -> None:
    """Name the worker and tie its life to the images process `owner`.

    The worker's parent is the forkserver, so PDEATHSIG alone would not notice the images
    process dying; a worker also holds the forkserver's liveness pipe, so the forkserver
    would wait for it forever. A thread watching the owner's pidfd ends both."""
    from moord.linux.process import PR_SET_PDEATHSIG, prctl

    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        from setproctitle import setproctitle

        setproctitle("moord: images apply worker")
    except ImportError:  # titles are cosmetic
        pass
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(0)

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(0)  # the images process is gone: nothing will read our result

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def apply_blob_file(path: str, target: str, mode: str, parents: Sequence[str]) -> diff.ApplyResult:
    """Apply the layer at `path` (never through a symlink) onto directory `target`: a
    stored blob, or a FIFO its download feeds (read until the writer closes it). Either
    way the content store checks the compressed digest (at commit), so it is not
    computed here again."""
    # Non-blocking: opening a FIFO must not wait for a writer that may never come.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return diff.apply_layer(PipeReader(fd, STREAM_IDLE_SECONDS), target, mode=mode, parents=parents, source_verified=True, prefetch=True)  # type: ignore[arg-type]
        os.set_blocking(fd, True)
        return diff.apply_layer(fd, target, mode=mode, parents=parents, source_verified=True, prefetch=True)
    finally:
        os.close(fd)


class ApplyWorkers:
    """A pool of apply processes, created on demand and closed when idle."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._busy = 0
        self._last_used = time.monotonic()
        self._reaper: threading.Timer | None = None
        # One apply per worker at a time: a submitted apply starts at once, which a
        # streamed one needs (its download waits for the reader to open the FIFO).
        self._slots = threading.Semaphore(workers)

    def _get(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                import multiprocessing

                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["moord.actors.diff", "moord.actors.apply_workers"])
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),))
            self._busy += 1
            return self._pool

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last_used = time.monotonic()
            if self._busy == 0 and self._reaper is None:
                self._reaper = threading.Timer(IDLE_SECONDS, self._close_if_idle)
                self._reaper.daemon = True
                self._reaper.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            self._reaper = None
            if self._busy or self._pool is None:
                return
            if time.monotonic() - self._last_used < IDLE_SECONDS:
                self._reaper = threading.Timer(IDLE_SECONDS, self._close_if_idle)
                self._reaper.daemon = True
                self._reaper.start()
                return
            pool, self._pool = self._pool, None
        pool.shutdown(wait=True)

    def reserve(self) -> bool:
        """Take a worker for a later `apply(..., reserved=True)` if one is free now."""
        return self._slots.acquire(blocking=False)

    def unreserve(self) -> None:
        """Give back a reservation that was not used."""
        self._slots.release()

    def apply(self, path: str, target: str, mode: str, parents: Sequence[str] = (), reserved: bool = False) -> diff.ApplyResult:
        """Apply a layer file or FIFO in a worker; blocks until done. Typed errors come back typed."""
        from concurrent.futures.process import BrokenProcessPool

        from moord.messages.errors import Unavailable

        if not reserved:
            self._slots.acquire()
        try:
            pool = self._get()
        except BaseException:
            self._slots.release()
            raise
        try:
            return pool.submit(apply_blob_file, path, target, mode, list(parents)).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None  # the next apply starts fresh workers
            raise Unavailable("a layer apply worker died (killed?); try again") from None
        finally:
            self._release()
            self._slots.release()

    def close(self) -> None:
        """Stop the workers (at actor stop)."""
        with self._lock:
            pool, self._pool = self._pool, None
            if self._reaper is not None:
                self._reaper.cancel()
                self._reaper = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
