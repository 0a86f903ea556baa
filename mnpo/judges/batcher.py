"""Micro-batching for `mnpo serve-judge`: concurrent requests are queued and one worker thread concatenates
them into judge calls of at most `max_batch_size` pairs, so the model runs few large forward passes instead
of many small ones. A failing batch is retried request by request, so only the offender gets the error.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    prompts: list
    pairs: list
    done: threading.Event = field(default_factory=threading.Event)
    result: list[float] | None = None
    error: str | None = None


class MicroBatcher:
    """Worker thread that drains the queue into batches of up to `max_batch_size` pairs per judge call."""

    def __init__(self, judge: Any, max_batch_size: int = 64, max_wait_ms: float = 5.0):
        self.judge = judge
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.queue: queue.Queue[_Job | None] = queue.Queue()
        self.calls = 0
        self.thread = threading.Thread(target=self._run, name="judge-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompts: list, pairs: list, timeout: float | None = None) -> list[float]:
        job = _Job(prompts, pairs)
        self.queue.put(job)
        if not job.done.wait(timeout):
            raise TimeoutError("the judge did not answer in time")
        if job.error is not None:
            raise RuntimeError(job.error)
        return job.result

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _run(self) -> None:
        pending: _Job | None = None
        stopping = False
        while not stopping:
            job = pending if pending is not None else self.queue.get()
            pending = None
            if job is None:
                return
            batch, size = [job], len(job.pairs)
            deadline = time.monotonic() + self.max_wait
            while size < self.max_batch_size:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:  # stop after answering what is already taken
                    stopping = True
                    break
                if size + len(nxt.pairs) > self.max_batch_size:
                    pending = nxt  # first job of the next batch
                    break
                batch.append(nxt)
                size += len(nxt.pairs)
            self._process(batch)
        if pending is not None:
            self._process([pending])

    def _process(self, batch: list[_Job]) -> None:
        try:
            self._judge_together(batch)
        except Exception as exc:  # a failing model call must answer every waiting request, not hang them
            if len(batch) == 1:
                logger.exception("judge call failed")
                batch[0].error = f"{type(exc).__name__}: {exc}"
            else:
                # One bad request must not fail the others it was batched with: judge each alone.
                logger.warning("judge call on %d batched requests failed (%s); retrying one by one", len(batch), exc)
                for job in batch:
                    try:
                        self._judge_together([job])
                    except Exception as job_exc:
                        logger.exception("judge call failed")
                        job.error = f"{type(job_exc).__name__}: {job_exc}"
        for job in batch:
            job.done.set()

    def _judge_together(self, batch: list[_Job]) -> None:
        """One model call for all jobs of `batch`; each job gets its own slice of the answer."""
        prompts = [p for j in batch for p in j.prompts]
        pairs = [q for j in batch for q in j.pairs]
        self.calls += 1
        probs = self.judge.judge(prompts, pairs)
        if len(probs) != len(pairs):
            raise RuntimeError(f"the judge returned {len(probs)} probabilities for {len(pairs)} pairs")
        start = 0
        for j in batch:
            j.result = probs[start : start + len(j.pairs)]
            start += len(j.pairs)
