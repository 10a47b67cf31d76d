"""The catalogue of models and the fleet that loads and unloads them, with stand-in engines."""

from __future__ import annotations

import asyncio
import json
import math
import threading

import pytest

from lmserve.fleet.catalogue import Catalogue, ModelEntry, UnknownModel, entry_for, scan_models_dir
from lmserve.fleet.fleet import Fleet, FleetBusy, FleetClosed, ModelFailed, ModelStatus, ModelTooLarge, NotLoaded


class StandIn:
    """What the fleet holds of a loaded model: drain and close, recorded."""

    def __init__(self, entry: ModelEntry, events: list):
        self.entry, self.events = entry, events
        self.closed = False

    async def drain(self, timeout=None):
        self.events.append(("drain", self.entry.id, timeout))
        return True

    def close(self, why):
        self.closed = True
        self.events.append(("close", self.entry.id))
        self.why = why


class Loader:
    """Loads StandIns, recording each load; a source named "broken" fails; `gate`, when given,
    holds every load until it is set."""

    def __init__(self, gate: threading.Event | None = None):
        self.events: list = []
        self.gate = gate

    def __call__(self, entry: ModelEntry, progress=None) -> StandIn:
        if self.gate is not None:
            assert self.gate.wait(5)
        if entry.source == "broken":
            raise ValueError("unsupported architecture 'mamba'")
        self.events.append(("load", entry.id))
        return StandIn(entry, self.events)

    def loads(self):
        return [e[1] for e in self.events if e[0] == "load"]

    def closes(self):
        return [e[1] for e in self.events if e[0] == "close"]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def catalogue(*ids: str, **entries: ModelEntry) -> Catalogue:
    return Catalogue([ModelEntry(id=i, source=f"/models/{i}.gguf") for i in ids] + list(entries.values()))


# ---------------------------------------------------------------- the catalogue


def test_names_aliases_and_the_single_model_fallback():
    one = Catalogue([ModelEntry(id="smol", source="s.gguf", aliases=("small",)),
                     ModelEntry(id="minilm", source="m/", kind="embedding")])
    assert one.resolve("small").id == one.resolve("smol").id == "smol"
    assert one.resolve("gpt-4o-mini").id == "smol"  # the one chat model serves any other name
    assert one.resolve(None).id == "smol"
    assert one.resolve("text-embedding-3-small", kind="embedding").id == "minilm"
    assert one.resolve("minilm").kind == "embedding"  # a name is served by its own entry, whatever the route


def test_with_several_chat_models_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModel) as caught:
        catalogue("a", "b").resolve("gpt-4o-mini")
    assert caught.value.known == ["a", "b"] and "'a', 'b'" in str(caught.value)


def test_two_entries_may_not_share_a_name():
    with pytest.raises(ValueError, match="'smol'"):
        Catalogue([ModelEntry(id="smol", source="a.gguf"), ModelEntry(id="other", source="b.gguf", aliases=("smol",))])


def test_the_models_folder_is_read_again_at_each_listing(tmp_path):
    (tmp_path / "Tiny-Llama.Q4_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    bert = tmp_path / "mini-bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    shelf = Catalogue([entry_for(tmp_path / "Tiny-Llama.Q4_0.gguf", id="tiny")], models_dir=tmp_path)
    # the declared file keeps its declared name and is not listed twice
    assert [(e.id, e.kind) for e in shelf.entries()] == [("tiny", "chat"), ("mini-bert", "embedding"), ("qwen", "chat")]
    (tmp_path / "Another.F16.gguf").write_bytes(b"GGUF")
    (tmp_path / "Tiny-Llama.Q4_0.gguf").unlink()
    assert [e.id for e in scan_models_dir(tmp_path)] == ["Another", "mini-bert", "qwen"]
    assert shelf.resolve("Another").source == str(tmp_path / "Another.F16.gguf")


# ---------------------------------------------------------------- loading on demand


def test_a_model_loads_when_first_asked_for_and_stays_loaded():
    loader = Loader()

    async def main():
        fleet = Fleet(catalogue("a", "b"), loader)
        assert [s.status for s in fleet.slots()] == [ModelStatus.UNLOADED] * 2
        first = await fleet.acquire("a")
        first.release()
        second = await fleet.acquire("a")
        assert second.model is first.model and second.entry.id == "a"
        return fleet

    fleet = asyncio.run(main())
    assert loader.loads() == ["a"]
    assert [(s.entry.id, s.status) for s in fleet.slots()] == [("a", ModelStatus.LOADED), ("b", ModelStatus.UNLOADED)]


def test_requests_arriving_while_a_model_loads_share_that_load():
    gate = threading.Event()
    loader = Loader(gate)

    async def main():
        fleet = Fleet(catalogue("a"), loader)
        waiting = [asyncio.create_task(fleet.acquire("a")) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert fleet.slots()[0].status is ModelStatus.LOADING and not any(t.done() for t in waiting)
        gate.set()
        leases = await asyncio.gather(*waiting)
        return fleet, leases

    fleet, leases = asyncio.run(main())
    assert loader.loads() == ["a"] and len({id(lease.model) for lease in leases}) == 1
    assert fleet.slots()[0].leases == 5


def test_a_model_that_fails_to_load_fails_alone_and_can_be_tried_again():
    loader = Loader()
    shelf = catalogue("good", broken=ModelEntry(id="bad", source="broken"))

    async def main():
        fleet = Fleet(shelf, loader)
        for _ in range(2):  # the failure is remembered, not retried by every request
            with pytest.raises(ModelFailed, match="'bad' failed to load: unsupported architecture 'mamba'"):
                await fleet.acquire("bad")
        (await fleet.acquire("good")).release()
        states = {s.entry.id: (s.status, s.error) for s in fleet.slots()}
        with pytest.raises(ModelFailed):
            await fleet.load("bad")  # an explicit load tries again
        return states

    states = asyncio.run(main())
    assert states == {"good": (ModelStatus.LOADED, None), "bad": (ModelStatus.FAILED, "unsupported architecture 'mamba'")}
    assert loader.loads() == ["good"]


def test_without_autoload_an_unloaded_model_says_how_to_load_it():
    async def main():
        fleet = Fleet(catalogue("a"), Loader(), autoload=False)
        with pytest.raises(NotLoaded, match="POST /models/load"):
            await fleet.acquire("a")
        await fleet.load("a")
        return (await fleet.acquire("a")).entry.id

    assert asyncio.run(main()) == "a"


# ---------------------------------------------------------------- room: max_loaded, busy models


def test_max_loaded_unloads_the_least_recently_used_idle_model():
    loader, clock = Loader(), Clock()

    async def use(fleet, name):
        lease = await fleet.acquire(name)
        clock.now += 1
        lease.release()

    async def main():
        fleet = Fleet(catalogue("a", "b", "c"), loader, max_loaded=2, clock=clock)
        for name in ["a", "b", "a", "c", "a", "b"]:
            await use(fleet, name)
        return {s.entry.id: s.status for s in fleet.slots()}

    states = asyncio.run(main())
    # c evicts b (a was used after b); b then evicts c (a again more recent)
    assert loader.loads() == ["a", "b", "c", "b"] and loader.closes() == ["b", "c"]
    assert states == {"a": ModelStatus.LOADED, "b": ModelStatus.LOADED, "c": ModelStatus.UNLOADED}


def test_a_busy_model_is_never_unloaded_a_new_one_waits_then_gives_up():
    loader = Loader()

    async def main():
        fleet = Fleet(catalogue("a", "b"), loader, max_loaded=1, wait_timeout=0.2)
        held = await fleet.acquire("a")
        with pytest.raises(FleetBusy, match="retry"):
            await fleet.acquire("b")
        assert not held.model.closed
        fleet.wait_timeout = 5
        waiting = asyncio.create_task(fleet.acquire("b"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        held.release()  # "a" becomes idle: "b" may now take its place
        return (await waiting).entry.id, held

    loaded, held = asyncio.run(main())
    assert loaded == "b" and held.model.closed and loader.loads() == ["a", "b"]


def test_pinned_models_load_at_start_and_are_never_evicted():
    loader = Loader()
    shelf = catalogue("a", "b", pinned=ModelEntry(id="p", source="/models/p.gguf", pinned=True))

    async def main():
        fleet = Fleet(shelf, loader, max_loaded=2, default_ttl=0)
        await fleet.load_pinned()
        for name in ["a", "b", "a"]:
            (await fleet.acquire(name)).release()
        assert await fleet.reap_idle() == ["a"]  # ttl 0: idle "a" goes, pinned "p" stays
        return {s.entry.id: s.status for s in fleet.slots()}

    states = asyncio.run(main())
    assert loader.loads() == ["p", "a", "b", "a"] and "p" not in loader.closes()
    assert states == {"a": ModelStatus.UNLOADED, "b": ModelStatus.UNLOADED, "p": ModelStatus.LOADED}


# ---------------------------------------------------------------- idle unload, explicit unload


def test_an_idle_model_is_unloaded_after_its_ttl_a_busy_one_is_not():
    loader, clock = Loader(), Clock()
    shelf = catalogue("a", "b", short=ModelEntry(id="s", source="/models/s.gguf", ttl=2))

    async def main():
        fleet = Fleet(shelf, loader, default_ttl=10, clock=clock)
        (await fleet.acquire("a")).release()
        (await fleet.acquire("s")).release()
        busy = await fleet.acquire("b")
        clock.now += 5
        first = await fleet.reap_idle()
        clock.now += 6
        second = await fleet.reap_idle()
        busy.release()
        return first, second

    assert asyncio.run(main()) == (["s"], ["a"])
    assert loader.closes() == ["s", "a"]


def test_unload_drains_the_requests_in_flight_then_closes():
    loader = Loader()

    async def main():
        fleet = Fleet(catalogue("a"), loader, drain_timeout=7)
        lease = await fleet.acquire("a")
        assert await fleet.unload("a") is True
        assert await fleet.unload("a") is False  # not loaded any more
        lease.release()
        lease.release()  # a second release changes nothing
        again = await fleet.acquire("a")  # loads afresh
        return fleet.slots()[0], again

    slot, again = asyncio.run(main())
    assert loader.events[:3] == [("load", "a"), ("drain", "a", 7), ("close", "a")]
    assert loader.loads() == ["a", "a"] and slot.leases == 1 and not again.model.closed


def test_close_unloads_every_model_at_once_and_then_refuses():
    loader = Loader()

    async def main():
        fleet = Fleet(catalogue("a", "b"), loader, drain_timeout=7)
        held = [await fleet.acquire("a"), await fleet.acquire("b")]
        await fleet.close(drain_timeout=2)
        await fleet.close(drain_timeout=2)  # a second close finds nothing loaded
        with pytest.raises(FleetClosed):
            await fleet.acquire("a")
        with pytest.raises(FleetClosed):
            await fleet.load("b")
        return held

    held = asyncio.run(main())
    assert sorted(loader.events[2:], key=repr) == [("close", "a"), ("close", "b"), ("drain", "a", 2), ("drain", "b", 2)]
    assert [lease.model.why for lease in held] == ["the server is shutting down; retry the request"] * 2


def test_an_unload_cut_short_says_the_model_is_being_unloaded():
    loader = Loader()

    async def main():
        fleet = Fleet(catalogue("a"), loader)
        lease = await fleet.acquire("a")
        await fleet.unload("a", drain_timeout=0)
        return lease

    assert asyncio.run(main()).model.why == "the model is being unloaded; retry the request"


def test_keep_alive_from_a_request_wins_over_the_ttl():
    loader, clock = Loader(), Clock()

    async def use(fleet, name, keep_alive):
        lease = await fleet.acquire(name)
        lease.keep_alive = keep_alive
        lease.release()
        await asyncio.sleep(0.01)  # keep_alive 0 unloads right after the release, in a task

    async def main():
        fleet = Fleet(catalogue("a", "b", "c"), loader, default_ttl=60, clock=clock)
        await use(fleet, "a", 0)  # unload after this request
        await use(fleet, "b", math.inf)  # keep loaded
        await use(fleet, "c", 5)
        after_release = {s.entry.id: s.status for s in fleet.slots()}
        clock.now += 6
        reaped = await fleet.reap_idle()
        clock.now += 3600
        return after_release, reaped, await fleet.reap_idle()

    after_release, reaped, later = asyncio.run(main())
    assert after_release == {"a": ModelStatus.UNLOADED, "b": ModelStatus.LOADED, "c": ModelStatus.LOADED}
    assert reaped == ["c"] and later == []  # b stays, whatever the ttl


def test_a_memory_budget_evicts_for_room_and_refuses_what_never_fits():
    loader, clock = Loader(), Clock()
    sizes = {"a": 60, "b": 60, "c": 30, "huge": 150}

    async def use(fleet, name):
        lease = await fleet.acquire(name)
        clock.now += 1
        lease.release()

    async def main():
        fleet = Fleet(catalogue(*sizes), loader, max_memory=100, footprint=lambda entry: sizes[entry.id], clock=clock)
        await use(fleet, "a")
        await use(fleet, "b")  # 60 + 60 > 100: "a" goes
        await use(fleet, "c")  # 60 + 30 fits beside "b"
        loaded = {s.entry.id for s in fleet.slots() if s.status is ModelStatus.LOADED}
        with pytest.raises(ModelTooLarge, match="'huge' needs"):
            await fleet.acquire("huge")
        return loaded

    assert asyncio.run(main()) == {"b", "c"}
    assert loader.loads() == ["a", "b", "c"] and loader.closes() == ["a"]


def test_a_remote_model_shows_its_download_progress_then_loads():
    reported, finish = threading.Event(), threading.Event()

    def load(entry, progress):
        progress(300, 1000)
        reported.set()
        assert finish.wait(5)
        progress(1000, 1000)
        return StandIn(entry, [])

    async def main():
        fleet = Fleet(Catalogue([ModelEntry(id="remote", source="hf:org/repo/m.gguf")]), load)
        waiting = asyncio.create_task(fleet.acquire("remote"))
        while not reported.is_set():
            await asyncio.sleep(0.01)
        [slot] = fleet.slots()
        during = (slot.status, slot.progress)
        finish.set()
        await waiting
        return during, (slot.status, slot.progress)

    assert asyncio.run(main()) == ((ModelStatus.DOWNLOADING, (300, 1000)), (ModelStatus.LOADED, None))


def test_the_models_folder_is_read_again_only_when_it_changed(tmp_path, monkeypatch):
    from lmserve.fleet import catalogue as catalogue_module

    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    scans = []
    real_scan = catalogue_module.scan_models_dir
    monkeypatch.setattr(catalogue_module, "scan_models_dir", lambda folder: scans.append(1) or real_scan(folder))
    shelf = Catalogue([], models_dir=tmp_path)
    for _ in range(3):  # every request resolves its model: one read of the folder serves them all
        assert shelf.resolve("a").id == "a"
    assert len(scans) == 1
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert [e.id for e in shelf.entries()] == ["a", "b"] and len(scans) == 2
