"""Running the app under uvicorn, with a stop that is bounded and ends with status 0.

Uvicorn (0.55) already stops gracefully on SIGTERM or SIGINT: it closes the listening socket,
closes idle keep-alive connections, waits for the responses under way, then runs the lifespan's
shutdown. What it lacks, and GracefulServer adds:

- the app hears of the stop when it begins, not once every response is done: `state.stop()`
  (middleware/draining.py) refuses new requests and ends those still running after the
  shutdown timeout, each with an error its client can read;
- a second SIGTERM or SIGINT ends the process at once, with 128 + the signal's number (143 or
  130), as a shell reports a process killed by it;
- the status is 0 once the stop is done: uvicorn would raise the caught signal again on its way
  out, which ends the process with -15 (SIGTERM);
- work that the stop cannot interrupt (a grammar compile or a model load, in a worker thread)
  does not hold the process: it exits without waiting for such threads, and a watchdog ends it
  with 0 should the stop itself overrun the timeout by more than SETTLE_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from lmserve.server.middleware.draining import ENDING_SECONDS
from lmserve.server.state import ServerState

log = logging.getLogger("lmserve")

# Beyond the shutdown timeout: for the ended requests' last bytes and for unloading the models.
SETTLE_SECONDS = ENDING_SECONDS + 3.0


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.stop_signal: int | None = None  # the signal that began the stop

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Uvicorn's signal handler (the main thread, between two bytecodes of the event loop)."""
        name = signal.Signals(sig).name
        if self.stop_signal is not None:
            log.warning("%s while stopping: exiting now", name)
            _exit(128 + sig)
        self.stop_signal = sig
        self.should_exit = True  # uvicorn's main loop notices within 0.1 s and calls shutdown()
        log.info("%s: stopping; requests in flight have up to %g s (%s again exits at once)",
                 name, self.state.shutdown_timeout, name)
        deadline = self.state.shutdown_timeout + SETTLE_SECONDS
        threading.Thread(target=_exit_after, args=(deadline,), name="lmserve-stop-watchdog", daemon=True).start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stopping = asyncio.ensure_future(self.state.stop())  # while uvicorn waits for the connections
        await super().shutdown(sockets)  # its lifespan shutdown awaits the same stop
        await stopping


def serve(app: FastAPI, state: ServerState, **options) -> None:
    """Serve `app` until a signal stops it; `options` are uvicorn.Config's. Returns once stopped,
    or exits 1 if the server could not start (as uvicorn.run does)."""
    config = uvicorn.Config(app, timeout_graceful_shutdown=state.shutdown_timeout + SETTLE_SECONDS, **options)
    server = GracefulServer(config, state)
    try:
        server.run()
    finally:
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
    if not server.started:
        sys.exit(1)
    _leave_worker_threads()


def _leave_worker_threads() -> None:
    """Exit now (0) if worker threads are still running (a compile whose request was cancelled):
    the interpreter would otherwise wait for them on its way out."""
    running = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if running:
        log.info("stopped; not waiting for %d worker threads (%s)", len(running), ", ".join(running))
        _exit(0)


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    log.warning("still stopping %.0f s after the signal: exiting without waiting for the rest", seconds)
    _exit(0)


def _exit(status: int) -> None:
    """End the process now, without waiting for threads; what was logged is written out first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
