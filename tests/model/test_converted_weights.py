"""Converted weights kept ready to map (lmserve/weights/converted.py): a second load of an int4 or
int8 model maps the first one's converted copy, with the same logits bit for bit and none of the
conversion; what is not cached, a changed checkpoint, an unreadable entry and an unwritable cache."""

from __future__ import annotations

import logging

import pytest
import torch

from lmserve.weights import load as load_module
from lmserve.weights.load import load_weights
from tests.helpers.tiny_models import save_hf_folder, tiny_hf_model, write_gguf
from tests.model.test_llama_logits import run_paged

IDS = list(range(5, 25))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", str(folder))
    return folder


def logits(path, dtype):
    model, config, _ = load_weights(path, dtype)
    return run_paged(model, config, IDS, [12, 1, 7]), model


def entries(folder):
    return sorted(folder.glob("*.pt")) if folder.exists() else []


def mapped_files(model) -> set[str]:
    """The files whose mappings hold the model's tensors' bytes."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end, fields[5]))
    pointers = [t.data_ptr() for t in model.state_dict().values() if t.numel()]
    return {name for start, end, name in spans if any(start <= p < end for p in pointers)}


def no_conversion(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(load_module, "_fill", refuse)


@pytest.mark.parametrize("source, dtype", [("Q4_0", "auto"), ("Q4_1", "int4"), ("Q8_0", "int8"), ("hf", "int4")])
def test_a_second_load_maps_the_first_one_s_converted_weights(tmp_path, cache, monkeypatch, source, dtype):
    hf = tiny_hf_model("llama", seed=3)
    path = (save_hf_folder(hf, tmp_path / "m") if source == "hf"
            else write_gguf(hf, tmp_path / "m.gguf", "llama", source))
    first, _ = logits(path, dtype)
    [entry] = entries(cache)
    no_conversion(monkeypatch)
    second, model = logits(path, dtype)
    assert torch.equal(first, second)
    assert str(entry) in mapped_files(model)  # mapped from the entry, not read into memory
    assert entries(cache) == [entry]


def test_float_models_and_a_cache_of_none_write_nothing(tmp_path, cache, monkeypatch):
    path = write_gguf(tiny_hf_model("llama", seed=4), tmp_path / "m.gguf", "llama", "Q4_0")
    logits(path, "float32")
    logits(path, "bfloat16")
    assert entries(cache) == []
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", "none")
    logits(path, "int4")
    assert not cache.exists()


def test_a_changed_checkpoint_is_converted_again_and_replaces_its_entry(tmp_path, cache, monkeypatch):
    path = tmp_path / "m.gguf"
    before, _ = logits(write_gguf(tiny_hf_model("llama", seed=5), path, "llama", "Q4_0"), "int4")
    [old] = entries(cache)
    write_gguf(tiny_hf_model("llama", seed=6), path, "llama", "Q4_0")  # the same path, other weights
    after, _ = logits(path, "int4")
    [new] = entries(cache)
    assert new != old and not torch.equal(before, after)
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", "none")
    assert torch.equal(after, logits(path, "int4")[0])  # as converted with no cache
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", str(cache))
    assert torch.equal(logits(path, "int4")[0], after)  # the new entry, read back


def test_a_file_put_in_place_with_the_old_one_s_size_and_times_is_converted_again(tmp_path, cache):
    """As `cp -p` or `rsync -t` leave it: another file, the same size and modification time."""
    import os
    import shutil

    path = write_gguf(tiny_hf_model("llama", seed=13), tmp_path / "m.gguf", "llama", "Q4_0")
    before, _ = logits(path, "int4")
    other = write_gguf(tiny_hf_model("llama", seed=14), tmp_path / "other.gguf", "llama", "Q4_0")
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    assert other.stat().st_size == path.stat().st_size
    shutil.copy2(other, tmp_path / "incoming.gguf")
    os.replace(tmp_path / "incoming.gguf", path)
    after, _ = logits(path, "int4")
    assert not torch.equal(before, after)
    assert torch.equal(after, logits(other, "int4")[0])


def test_another_context_length_is_another_entry(tmp_path, cache):
    path = write_gguf(tiny_hf_model("llama", seed=7), tmp_path / "m.gguf", "llama", "Q4_0")
    load_weights(path, "int4", max_positions=128)
    [short] = entries(cache)
    load_weights(path, "int4", max_positions=256)
    [long] = entries(cache)  # the checkpoint's older entry replaced
    assert long != short and str(long) in mapped_files(load_weights(path, "int4", max_positions=256)[0])


def test_an_unreadable_entry_is_converted_again(tmp_path, cache, monkeypatch, caplog):
    path = write_gguf(tiny_hf_model("llama", seed=8), tmp_path / "m.gguf", "llama", "Q4_0")
    first, _ = logits(path, "int4")
    [entry] = entries(cache)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # cut short
    with caplog.at_level(logging.WARNING, logger="lmserve.weights.converted"):
        again, _ = logits(path, "int4")
    assert torch.equal(first, again) and "unreadable" in caplog.text
    no_conversion(monkeypatch)
    assert torch.equal(logits(path, "int4")[0], first)  # saved whole again


def test_an_unwritable_cache_still_loads(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    path = write_gguf(tiny_hf_model("llama", seed=9), tmp_path / "m.gguf", "llama", "Q4_0")
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", "none")
    expected, _ = logits(path, "int4")
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", str(blocked / "cache"))
    assert torch.equal(logits(path, "int4")[0], expected)
    assert blocked.read_text() == "not a folder"


def test_what_the_conversion_asks_of_the_machine_is_part_of_the_key(tmp_path, cache, monkeypatch):
    """The formats a CPU's kernels choose (here those of a CPU without the W4A8 and packed W8A8
    products): a load that would choose others converts again."""
    from lmserve.model import linear
    from lmserve.model.weight_formats.int4 import Int4WeightOnly

    path = write_gguf(tiny_hf_model("llama", seed=10), tmp_path / "m.gguf", "llama", "Q4_0")
    load_weights(path, "int4")
    [first] = entries(cache)
    monkeypatch.setattr(linear, "int4_linear_supported", lambda: False)
    monkeypatch.setattr(linear, "packs_weights", lambda: False)
    model, _, _ = load_weights(path, "int4")
    [second] = entries(cache)
    assert second != first and isinstance(model.model.layers[0].self_attn.qkv_proj.small_step_copy.storage,
                                          Int4WeightOnly)


def test_a_checkpoint_keeps_an_entry_for_each_dtype_it_is_served_in(tmp_path, cache, monkeypatch):
    path = write_gguf(tiny_hf_model("llama", seed=11), tmp_path / "m.gguf", "llama", "Q8_0")
    load_weights(path, "int4")
    load_weights(path, "int8")
    assert len(entries(cache)) == 2
    no_conversion(monkeypatch)
    for dtype in ("int4", "int8"):  # both mapped, neither converted again
        model, _, _ = load_weights(path, dtype)
        assert mapped_files(model) & {str(entry) for entry in entries(cache)}


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_folder_others_may_write_to_is_not_used(tmp_path, monkeypatch, caplog, mode):
    """Its files would be loaded as code is: a folder writable by others could hand the server theirs."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    monkeypatch.setenv("LMSERVE_WEIGHTS_CACHE", str(shared))
    path = write_gguf(tiny_hf_model("llama", seed=12), tmp_path / "m.gguf", "llama", "Q4_0")
    with caplog.at_level(logging.WARNING, logger="lmserve.weights.converted"):
        logits(path, "int4")
    assert entries(shared) == [] and "may write to it" in caplog.text
