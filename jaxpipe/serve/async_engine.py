"""The engine thread: ``LLMEngine.step()`` on one background thread, outputs handed to asyncio queues.

The event loop only submits and aborts (both thread-safe on the engine) and reads queues; everything
that takes time (scheduling, device work, detokenization) happens on the engine thread, which hands each
step's outputs to the loop with one ``loop.call_soon_threadsafe`` call. A request's queue receives
``(tag, RequestOutput)`` items, or ``(tag, exception)`` when the request fails; the HTTP handler that
owns the queue decides what a tag means (the index of a prompt in a batched /v1/completions request).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from typing import Any

from jaxpipe.outputs import RequestOutput

logger = logging.getLogger("jaxpipe.serve")

# The engine thread waits at most this long for a submission before it checks whether to stop.
_IDLE_WAIT_S = 0.1


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shutdown, or a fault); no request can be served any more."""


class EngineStepError(RuntimeError):
    """``step()`` raised: the requests it was running are failed; the engine goes on serving."""


class AsyncEngine:
    """Owns the thread that drives an ``LLMEngine`` (or anything with its interface).

    ``max_waiting_requests`` bounds the queue: a submission that would leave more than that many
    sequences waiting for a slot (beyond ``max_num_seqs`` running) is refused by :meth:`has_room`.
    Sequences count ``n`` per request, since each completion takes a slot.
    """

    def __init__(self, engine: Any, max_waiting_requests: int, lockstep: bool = False) -> None:
        self.engine = engine
        self.max_waiting_requests = int(max_waiting_requests)
        # Several processes: the others follow process 0's steps (they wait for each step's submissions),
        # so after shutdown() process 0 steps once more to tell them to stop.
        self.lockstep = lockstep
        self._live: dict[str, tuple[asyncio.Queue, Any, int]] = {}  # id -> (queue, tag, sequences)
        self._live_seqs = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead: BaseException | None = None  # set when the engine thread is gone

    # -- loop side ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the queues."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() was called twice")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="jaxpipe-engine", daemon=True)
        self._thread.start()

    @property
    def num_live_sequences(self) -> int:
        return self._live_seqs

    @property
    def num_waiting_sequences(self) -> int:
        """Sequences submitted and not finished beyond the engine's slots (a bound, counted here)."""
        return max(0, self._live_seqs - int(self.engine.max_num_seqs))

    def has_room(self, sequences: int) -> bool:
        """Whether ``sequences`` more fit in the slots plus the bounded waiting queue."""
        return self._live_seqs + sequences <= int(self.engine.max_num_seqs) + self.max_waiting_requests

    def add(self, request_id: str, prompt: Any, params: Any, queue: asyncio.Queue, tag: Any = None) -> None:
        """Submit one request; its outputs go to ``queue`` as ``(tag, RequestOutput)``.

        Raises ValueError (bad prompt or parameters, from the engine) before anything is queued, and
        :class:`EngineDeadError` once the engine thread has stopped.
        """
        if self.dead is not None or self._stop.is_set():
            raise EngineDeadError("the server is shutting down" if self._stop.is_set() else
                                  f"the engine stopped: {self.dead}")
        self.engine.add_request(request_id, prompt, params)
        self._live[request_id] = (queue, tag, params.n)
        self._live_seqs += params.n

    def abort(self, request_ids: Iterable[str]) -> None:
        """Stop requests (client gone, or shutdown): they free their slots at the next step and their
        queues receive nothing more. Unknown and finished ids are ignored."""
        ids = [i for i in request_ids if self._forget(i)]
        if ids:
            self.engine.abort_request(ids)

    def close(self) -> None:
        """Take no more requests; fail what runs (its queues get :class:`EngineDeadError`) and abort it."""
        self._stop.set()
        self._fail_all(EngineDeadError("the server is shutting down"), abort=True)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """:meth:`close`, then wait for the engine thread to finish its step and shut the engine down."""
        self.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout_s)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0f s (a long device step?)", timeout_s)

    def _forget(self, request_id: str) -> bool:
        entry = self._live.pop(request_id, None)
        if entry is None:
            return False
        self._live_seqs -= entry[2]
        return True

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._live.get(out.request_id)
            if entry is None:  # aborted after the step produced it
                continue
            queue, tag, _ = entry
            queue.put_nowait((tag, out))
            if out.finished:
                self._forget(out.request_id)

    def _fail_all(self, error: BaseException, abort: bool = False) -> None:
        ids = list(self._live)
        for request_id in ids:
            queue, tag, _ = self._live[request_id]
            queue.put_nowait((tag, error))
            self._forget(request_id)
        if abort and ids:
            self.engine.abort_request(ids)

    # -- engine thread ------------------------------------------------------------------------------

    def _call_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone
            self._stop.set()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                if not engine.has_unfinished_requests() and not engine.wait_for_requests(_IDLE_WAIT_S):
                    continue
                try:
                    outputs = engine.step()
                except Exception as e:  # noqa: BLE001 (one bad step fails its requests, not the server)
                    logger.exception("engine step failed; failing the requests it was running")
                    self._call_loop(self._fail_all, EngineStepError(f"the engine failed: {type(e).__name__}: {e}"),
                                    True)
                    self._stop.wait(0.05)  # a step that keeps failing must not spin
                    continue
                if outputs:
                    self._call_loop(self._deliver, outputs)
        except BaseException as e:  # noqa: BLE001
            logger.exception("the engine thread stopped")
            self.dead = e
            self._call_loop(self._fail_all, EngineDeadError(f"the engine stopped: {e}"))
        finally:
            # Several processes: the others run engine.run_worker() until process 0 shuts the engine down.
            try:
                engine.shutdown()
                if self.lockstep:
                    engine.step()  # publishes the shutdown to the other processes
            except Exception:  # noqa: BLE001
                logger.exception("engine.shutdown() failed")
            if self.dead is None:
                self.dead = EngineDeadError("the engine was shut down")
