"""One queue, one worker thread that owns the device.

The API, the web page and the notebook's :func:`fastsd.webui.generate` all submit jobs
here; the worker runs them one at a time on its :class:`~fastsd.webui.engine.Engine`.
The queue is bounded: :meth:`Worker.submit` raises :class:`QueueFull` beyond it (the API
answers 503). :meth:`Worker.progress` says where the running job is (fraction, step, ETA,
a cheap preview); :meth:`interrupt` and :meth:`skip` stop it.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from fastsd.errors import FastSDError
from fastsd.webui import infotext
from fastsd.webui.engine import Control, Engine, preview_image

log = logging.getLogger("fastsd")

DEFAULT_MAX_QUEUE = 64


class QueueFull(FastSDError):
    """More jobs are waiting than the server accepts; the client should retry later."""


@dataclass
class Job:
    fn: Callable[[Engine, Control], Any]
    label: str
    steps: int = 0  # sampling steps per batch, for progress
    batches: int = 1
    future: Future = field(default_factory=Future)
    control: Control = field(default_factory=Control)
    started: float = 0.0
    batch: int = 0
    step: int = 0
    total_steps: int = 0
    latents: Any = None


class Worker:
    """A daemon thread that runs jobs one at a time on ``engine``."""

    def __init__(self, engine: Engine, max_queue: int = DEFAULT_MAX_QUEUE):
        self.engine = engine
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._current: Job | None = None
        self._lock = threading.Lock()
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._run, name="fastsd-worker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ submitting

    def submit(self, fn: Callable[[Engine, Control], Any], label: str = "job", steps: int = 0,
               batches: int = 1) -> Future:
        """Queue ``fn(engine, control)``; its result or exception lands in the Future."""
        job = Job(fn, label, steps, batches)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"The server is busy: {self.max_queue} jobs are already waiting. "
                            "Try again in a moment.") from None
        return job.future

    def run(self, fn: Callable[[Engine, Control], Any], label: str = "job", steps: int = 0,
            batches: int = 1, timeout: float | None = None) -> Any:
        """Submit and wait for the result (re-raising the job's exception)."""
        return self.submit(fn, label, steps, batches).result(timeout)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            job.started = time.monotonic()
            job.control.on_step = lambda step, total, latents, j=job: self._on_step(
                j, step, total, latents)
            with self._lock:
                self._current = job
            try:
                result = job.fn(self.engine, job.control)
            except BaseException as e:  # delivered to the caller, who reports it
                if not isinstance(e, FastSDError):
                    log.exception("%s failed", job.label)
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._current = None
                    self.jobs_done += 1

    def _on_step(self, job: Job, step: int, total: int, latents: Any) -> None:
        if step < job.step:  # a new batch began
            job.batch += 1
        job.step, job.total_steps, job.latents = step, total, latents

    def stop(self, timeout: float = 30.0) -> None:
        """Let the running job finish, drop the waiting ones, and end the thread."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
        if self._current is not None:
            self._current.control.interrupt = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ control

    def _signal(self, flag: str) -> bool:
        with self._lock:
            if self._current is None:
                return False
            setattr(self._current.control, flag, True)
            return True

    def interrupt(self) -> bool:
        """Stop the running job after its current step; its images so far are returned."""
        return self._signal("interrupt")

    def skip(self) -> bool:
        """End the running job's current batch and go on with its next."""
        return self._signal("skip")

    def progress(self, preview: bool = True) -> dict[str, Any]:
        """A1111's /progress object for the running job."""
        with self._lock:
            job = self._current
        waiting = self.waiting
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": waiting,
                 "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                    "textinfo": None, "queued": waiting}
        total = job.total_steps or job.steps or 1
        done = (job.batch + min(job.step, total) / total) / max(job.batches, 1)
        elapsed = time.monotonic() - job.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state.update(skipped=job.control.skip, interrupted=job.control.interrupt, job=job.label,
                     job_count=waiting + 1, job_no=job.batch, sampling_step=job.step,
                     sampling_steps=total,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(
                         time.time() - elapsed)))
        image = None
        latents = job.latents
        if preview and latents is not None:
            png = infotext.png_bytes(preview_image(latents, self.engine.family), None)
            image = base64.b64encode(png).decode()
        return {"progress": round(min(done, 1.0), 4), "eta_relative": round(max(eta, 0.0), 3),
                "state": state, "current_image": image,
                "textinfo": f"{job.label}: step {job.step}/{total}", "queued": waiting}
