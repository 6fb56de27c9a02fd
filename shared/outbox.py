"""report-usage's outbox: the flushes of its queued meter events, and the thread that runs them.

Recording a call never needs Stripe, so this module loads neither Stripe's client nor the meter
event stream (shared/meter_flush.py) until the first flush: a cold instance answers its first
report without importing them. `BackgroundFlusher` is one thread per process that flushes once
100 reports have queued events or the oldest has waited `METER_FLUSH_DELAY_SECONDS`; the
scheduled flush (every minute, `deploy.sh functions`) covers instances that stopped receiving
traffic.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.db import Database
from shared.settings import Settings
from shared.usage import BATCH, MAX_FLUSH_LIMIT

if TYPE_CHECKING:
    from shared.meter_flush import MeterStream

log = logging.getLogger("metered_billing")


class Outbox:
    """The process's flushes: its meter event session, made with the first one."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self._database, self._settings = database, settings
        self._stream: MeterStream | None = None
        self._lock = threading.Lock()
        self.flusher = BackgroundFlusher(
            lambda: self.flush(limit=MAX_FLUSH_LIMIT), settings.METER_FLUSH_DELAY_SECONDS
        )

    def flush(self, *, limit: int) -> dict[str, int]:
        """Deliver up to `limit` due meter events now: {sent, pending, failed, requests}."""
        from shared import meter_flush

        return meter_flush.flush(self._database, self.stream(), limit=limit).as_dict()

    def stream(self) -> MeterStream:
        from shared.meter_flush import MeterStream
        from shared.stripe_api import make_stripe_client

        with self._lock:
            if self._stream is None:
                self._stream = MeterStream(make_stripe_client(self._settings), self._settings)
            return self._stream

    def queued(self) -> None:
        """A report left a meter event pending."""
        self.flusher.queued()


class BackgroundFlusher:
    """One flushing thread per process, woken by reports that queued a meter event.

    It flushes once BATCH reports have queued events or the oldest has waited `delay` seconds,
    then drains whatever is due. A delay of 0 turns it off (the scheduled flush alone delivers).
    The thread starts with the first queued event in each process (gunicorn forks workers after
    import), and a failed flush is logged; its events stay pending for the next one.
    """

    def __init__(self, flush_due: Callable[[], Any], delay: float) -> None:
        self._flush_due = flush_due
        self._delay = delay
        self._wake = threading.Condition()
        self._queued = 0
        self._oldest = 0.0
        self._pid = 0

    def queued(self) -> None:
        """A report left a meter event pending."""
        if self._delay <= 0:
            return
        with self._wake:
            if self._pid != os.getpid():
                self._pid, self._queued = os.getpid(), 0
                threading.Thread(target=self._run, name="meter-flush", daemon=True).start()
            if self._queued == 0:
                self._oldest = time.monotonic()
            self._queued += 1
            if self._queued >= BATCH:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._queued == 0:
                    self._wake.wait()
                while self._queued < BATCH:
                    left = self._oldest + self._delay - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                self._queued = 0
            try:
                self._flush_due()
            except Exception:
                log.exception("background meter flush failed; its events stay pending")
