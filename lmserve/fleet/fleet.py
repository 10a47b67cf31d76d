"""Models loaded when a request asks for them, and unloaded when idle or when room is needed.

The fleet holds one Slot per catalogue entry it has seen. `acquire(name)` answers with a Lease on
the model, loading it first if it is not loaded (requests that arrive while it
loads share that one load). A model is busy while leases on it are held: a server holds one for a
request's whole life, streaming included, so a busy model is never unloaded under a request.

Room: with `max_loaded` models loaded (or loading), loading another first unloads the least
recently used idle one; when every loaded model is busy the request waits for one to become
idle, up to `wait_timeout`, then gets FleetBusy (503 with Retry-After). Idle models are
unloaded after their ttl (`reap_idle`, called periodically by the server). Unloading closes the
engine in the server's process: measured, that gives the weights' and KV cache's memory back to
the OS (bench/RESULTS.md), so no worker process per model is needed.

Models are whatever `load(entry, progress)` returns: anything with `drain(timeout)` and `close(why)`
(models.py); a loader that downloads first reports progress(bytes done, total), shown as the
model's `downloading` status. Loading runs in a worker thread; the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lmserve.fleet.catalogue import Catalogue, ModelEntry

log = logging.getLogger("lmserve.fleet")


class Servable(Protocol):
    async def drain(self, timeout: float | None = None) -> bool: ...

    def close(self, why: str) -> None:
        """Let go of the model; requests still running end with an error saying `why`."""


# What the requests an unload cuts short are told, by the unload's reason (FleetEvents.model_unloaded).
_UNLOAD_ERRORS = {"shutdown": "the server is shutting down; retry the request"}
_UNLOAD_ERROR = "the model is being unloaded; retry the request"


class ModelStatus(enum.Enum):
    UNLOADED = "unloaded"
    DOWNLOADING = "downloading"  # its source is remote and its bytes are arriving (Slot.progress)
    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"


class FleetEvents(Protocol):
    """Told of loads and unloads (metrics); called on the event loop."""

    def model_loaded(self, model: str, seconds: float) -> None: ...

    def model_failed(self, model: str) -> None: ...

    def model_unloaded(self, model: str, reason: str) -> None:
        """`reason`: idle (ttl or keep_alive), room (another needed it), requested, shutdown."""


class _NoEvents:
    def model_loaded(self, model: str, seconds: float) -> None:
        pass

    def model_failed(self, model: str) -> None:
        pass

    def model_unloaded(self, model: str, reason: str) -> None:
        pass


class FleetBusy(RuntimeError):
    """No room to load a model now: every loaded model has requests in flight."""


class ModelFailed(RuntimeError):
    """The model could not be loaded; the message says why."""


class ModelTooLarge(ValueError):
    """The model needs more than the fleet's whole memory budget: it can never be loaded."""


class NotLoaded(RuntimeError):
    """The model is not loaded and the fleet does not load on demand."""


class FleetClosed(RuntimeError):
    """The fleet has been closed (the server is shutting down): it serves and loads nothing more."""


@dataclass
class Slot:
    """One catalogue entry as the fleet sees it."""

    entry: ModelEntry
    status: ModelStatus = ModelStatus.UNLOADED
    model: Any = None  # a Servable once loaded
    error: str | None = None  # why the last load failed
    loading: asyncio.Future | None = None  # set while loading: what requests for it wait on
    leases: int = 0  # requests holding the model now
    last_used: float = 0.0  # time.monotonic() of the last lease's release (or of the load)
    loaded_at: float = 0.0
    footprint: int = 0  # bytes it takes loaded (weights and KV budget), estimated before loading
    progress: tuple[int, int] | None = None  # (bytes done, total; 0 while unknown) while downloading
    keep_alive: float | None = None  # set by the last request that asked (Ollama's keep_alive): wins over the ttl

    @property
    def busy(self) -> bool:
        return self.leases > 0


def _downloading(slot: Slot, done: int, total: int) -> None:
    """The loader's progress report (from its thread): downloading until every byte is in."""
    slot.progress = (done, total)
    slot.status = ModelStatus.DOWNLOADING if total == 0 or done < total else ModelStatus.LOADING


class Lease:
    """A request's hold on a loaded model (`model`, what the loader made of `entry`); release it
    once the request is done (idempotent)."""

    def __init__(self, fleet: Fleet, slot: Slot):
        self._fleet, self._slot, self._released = fleet, slot, False
        self.entry = slot.entry
        self.model = slot.model
        self.keep_alive: float | None = None  # seconds the model stays loaded once idle (inf: always); None: its ttl

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._fleet._release(self._slot, self.keep_alive)


class Fleet:
    def __init__(self, catalogue: Catalogue, load: Callable[[ModelEntry, Callable[[int, int], None]], Servable], *,
                 max_loaded: int | None = None, default_ttl: float | None = None, autoload: bool = True,
                 wait_timeout: float | None = 60.0, drain_timeout: float = 30.0, events: FleetEvents | None = None,
                 max_memory: int | None = None, footprint: Callable[[ModelEntry], int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if max_loaded is not None and max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.catalogue = catalogue
        self._load = load
        self.max_loaded = max_loaded
        self.default_ttl = default_ttl
        self.autoload = autoload
        self.wait_timeout = wait_timeout
        self.drain_timeout = drain_timeout
        self.max_memory = max_memory  # bytes the loaded models' footprints may add up to
        self._footprint = footprint if footprint is not None else (lambda entry: 0)
        self._clock = clock
        self._events = events if events is not None else _NoEvents()
        self._slots: dict[str, Slot] = {}
        self._closed = False  # close() was called
        self._room = asyncio.Condition()  # notified whenever a model becomes idle or is unloaded

    # ---------------------------------------------------------------- what a request does

    async def acquire(self, name: str | None, kind: str = "chat") -> Lease:
        """A lease on the model `name` resolves to (catalogue.resolve), loaded first if needed.
        Raises UnknownModel, ModelFailed, NotLoaded (no autoload), FleetBusy or FleetClosed."""
        self._check_open()
        slot = self._slot(self.catalogue.resolve(name, kind))
        if slot.status is not ModelStatus.LOADED and not self.autoload and slot.loading is None:
            raise NotLoaded(f"The model '{slot.entry.id}' is not loaded; load it with POST /models/load "
                            f'{{"model": "{slot.entry.id}"}}.')
        await self._ensure_loaded(slot)
        slot.leases += 1
        return Lease(self, slot)

    async def load(self, name: str) -> Slot:
        """Load `name` now (POST /models/load); a failed model is tried again."""
        self._check_open()
        slot = self._slot(self.catalogue.resolve(name))
        if slot.status is ModelStatus.FAILED:
            slot.status, slot.error = ModelStatus.UNLOADED, None
        await self._ensure_loaded(slot)
        return slot

    async def unload(self, name: str, drain_timeout: float | None = None, reason: str = "requested") -> bool:
        """Unload `name` (POST /models/unload): new requests for it wait for a fresh load, those in
        flight get up to `drain_timeout` (default the fleet's) to finish, then are aborted.
        False if it was not loaded."""
        slot = self._slot(self.catalogue.resolve(name))
        if slot.loading is not None:  # let the load under way finish, then unload what it loaded
            with contextlib.suppress(FleetBusy):
                await asyncio.shield(slot.loading)
        if slot.status is not ModelStatus.LOADED:
            return False
        model = slot.model
        slot.model, slot.status, slot.keep_alive = None, ModelStatus.UNLOADED, None
        log.info("unloading %s", slot.entry.id)
        await model.drain(self.drain_timeout if drain_timeout is None else drain_timeout)
        await asyncio.to_thread(model.close, _UNLOAD_ERRORS.get(reason, _UNLOAD_ERROR))
        self._events.model_unloaded(slot.entry.id, reason)
        await self._notify_room()
        return True

    async def reap_idle(self) -> list[str]:
        """Unload every idle model whose ttl has passed; the ids unloaded."""
        now = self._clock()
        expired = [s for s in self._slots.values()
                   if s.status is ModelStatus.LOADED and not s.busy and not s.entry.pinned
                   and (ttl := self._ttl(s)) is not None and now - s.last_used >= ttl]
        for slot in expired:
            log.info("unloading %s: idle for %.0f s", slot.entry.id, now - slot.last_used)
            await self._close(slot, "idle")
        if expired:
            await self._notify_room()
        return [s.entry.id for s in expired]

    def adopt(self, name: str, model: Servable) -> None:
        """Serve `model`, loaded elsewhere, as the entry `name` names (as if the fleet had loaded it)."""
        slot = self._slot(self.catalogue.resolve(name))
        slot.model, slot.status, slot.error = model, ModelStatus.LOADED, None
        slot.loaded_at = slot.last_used = self._clock()

    async def reap_forever(self, every: float = 1.0) -> None:
        """reap_idle every `every` seconds, until cancelled (the server runs this)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.reap_idle()
            except Exception:  # noqa: BLE001 - an unload that failed is logged; reaping goes on
                log.exception("unloading idle models failed")

    async def load_pinned(self) -> None:
        """Load the pinned models (at start-up); one that fails shows as failed."""
        for entry in self.catalogue.entries():
            if entry.pinned:
                try:
                    await self.load(entry.id)
                except (ModelFailed, FleetBusy, ModelTooLarge) as exc:
                    log.error("pinned model %s: %s", entry.id, exc)

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Unload everything (server shutdown), as `unload` does, every model at once: requests in
        flight get up to `drain_timeout` seconds, then end with an error saying the server is
        shutting down. From now on requests and loads raise FleetClosed; a load under way is not
        waited for (its model is let go with the process). Safe to call more than once."""
        self._closed = True
        loaded = [slot.entry.id for slot in self._slots.values() if slot.status is ModelStatus.LOADED]
        await asyncio.gather(*(self.unload(name, drain_timeout, reason="shutdown") for name in loaded))

    def _check_open(self) -> None:
        if self._closed:
            raise FleetClosed("the server is shutting down")

    def unloads_in(self, slot: Slot) -> float | None:
        """Seconds until `slot`'s model is unloaded for idleness if nothing uses it; None if it will
        not be (not loaded, busy, pinned, or no ttl)."""
        ttl = self._ttl(slot)
        if slot.status is not ModelStatus.LOADED or slot.busy or slot.entry.pinned or ttl is None:
            return None
        return max(0.0, ttl - (self._clock() - slot.last_used))

    def slots(self) -> list[Slot]:
        """Every catalogue entry, in catalogue order, with its state."""
        return [self._slot(entry) for entry in self.catalogue.entries()]

    # ---------------------------------------------------------------- loading and room

    def _slot(self, entry: ModelEntry) -> Slot:
        slot = self._slots.get(entry.id)
        if slot is None or slot.entry.source != entry.source:  # new, or a models-dir file replaced
            slot = self._slots[entry.id] = Slot(entry)
        return slot

    def _ttl(self, slot: Slot) -> float | None:
        """Seconds idle before unloading: the last request's keep_alive, else the entry's ttl, else
        the fleet's; None is never."""
        if slot.keep_alive is not None:
            ttl = slot.keep_alive
        else:
            ttl = slot.entry.ttl if slot.entry.ttl is not None else self.default_ttl
        return None if ttl == math.inf else ttl

    async def _ensure_loaded(self, slot: Slot) -> None:
        if slot.status is ModelStatus.LOADED:
            return
        if slot.status is ModelStatus.FAILED:
            raise ModelFailed(f"The model '{slot.entry.id}' failed to load: {slot.error}")
        if slot.loading is None:
            slot.loading = asyncio.get_running_loop().create_future()
            asyncio.create_task(self._load_slot(slot))
        await asyncio.shield(slot.loading)
        if slot.status is not ModelStatus.LOADED:  # failed, or unloaded again before this request ran
            await self._ensure_loaded(slot)

    async def _load_slot(self, slot: Slot) -> None:
        try:
            await self._make_room(slot)
            started = self._clock()
            log.info("loading %s from %s", slot.entry.id, slot.entry.source)
            report = functools.partial(_downloading, slot)
            slot.model = await asyncio.to_thread(self._load, slot.entry, report)
            slot.progress = None
            slot.status, slot.loaded_at, slot.last_used = ModelStatus.LOADED, self._clock(), self._clock()
            log.info("loaded %s in %.1f s", slot.entry.id, self._clock() - started)
            self._events.model_loaded(slot.entry.id, self._clock() - started)
        except (FleetBusy, ModelTooLarge) as exc:
            slot.status = ModelStatus.UNLOADED
            self._finish_loading(slot, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the model fails, the fleet goes on
            log.error("cannot load %s: %s", slot.entry.id, exc)
            slot.status, slot.error, slot.model = ModelStatus.FAILED, str(exc) or type(exc).__name__, None
            self._events.model_failed(slot.entry.id)
        except BaseException as exc:  # cancelled (the server is stopping): the next request loads it afresh
            slot.status = ModelStatus.UNLOADED
            self._finish_loading(slot, FleetBusy("the load was cancelled"))
            raise exc
        self._finish_loading(slot, None)

    @staticmethod
    def _finish_loading(slot: Slot, exc: Exception | None) -> None:
        future, slot.loading = slot.loading, None
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)
            future.exception()  # retrieved: a load nobody waited for is not an unhandled error

    async def _make_room(self, slot: Slot) -> None:
        """Unload least recently used idle models until `slot` fits under max_loaded and max_memory,
        waiting for one to become idle when all are busy (up to wait_timeout), and mark `slot`
        loading. ModelTooLarge when it could never fit."""
        if self.max_memory is not None:
            slot.footprint = await asyncio.to_thread(self._footprint, slot.entry)
            if slot.footprint > self.max_memory:
                raise ModelTooLarge(f"The model '{slot.entry.id}' needs {slot.footprint >> 20} MiB (weights and KV "
                                    f"cache), more than the {self.max_memory >> 20} MiB all models may take "
                                    "(--models-memory)")
        deadline = None if self.wait_timeout is None else self._clock() + self.wait_timeout
        async with self._room:
            while self._crowded(slot):
                idle = [s for s in self._slots.values() if s is not slot and s.status is ModelStatus.LOADED
                        and not s.busy and not s.entry.pinned]
                if idle:
                    victim = min(idle, key=lambda s: s.last_used)
                    log.info("unloading %s (least recently used) to load %s", victim.entry.id, slot.entry.id)
                    await self._close(victim, "room")
                    continue
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    raise FleetBusy(f"no room to load '{slot.entry.id}': the loaded models are all serving "
                                    "requests; retry shortly")
                try:
                    await asyncio.wait_for(self._room.wait(), remaining)
                except TimeoutError:
                    pass
            slot.status = ModelStatus.LOADING  # under the lock: counted by the next load's room check

    def _crowded(self, slot: Slot) -> bool:
        """Loading `slot` now would go over max_loaded or max_memory."""
        others = [s for s in self._slots.values() if s is not slot
                  and s.status in (ModelStatus.LOADED, ModelStatus.LOADING, ModelStatus.DOWNLOADING)]
        too_many = self.max_loaded is not None and len(others) >= self.max_loaded
        too_big = self.max_memory is not None and sum(s.footprint for s in others) + slot.footprint > self.max_memory
        return too_many or too_big

    async def _close(self, slot: Slot, reason: str) -> None:
        """Unload an idle model (no request holds it, so there is nothing to drain)."""
        model = slot.model
        slot.model, slot.status, slot.keep_alive = None, ModelStatus.UNLOADED, None
        await asyncio.to_thread(model.close, _UNLOAD_ERROR)  # idle: no request to tell
        self._events.model_unloaded(slot.entry.id, reason)

    def _release(self, slot: Slot, keep_alive: float | None) -> None:
        slot.leases -= 1
        slot.last_used = self._clock()
        if keep_alive is not None:
            slot.keep_alive = keep_alive
        if slot.leases == 0:
            loop = asyncio.get_running_loop()
            loop.create_task(self._notify_room())
            if slot.keep_alive == 0:  # "unload after this request"
                loop.create_task(self.reap_idle())

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()
