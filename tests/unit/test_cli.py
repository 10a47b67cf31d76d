import argparse

import pytest

from lmserve import cli
from lmserve.cli import build_parser, parse_size, served_name


def test_parse_size_units():
    assert parse_size("1GiB") == 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2G") == 2 * 10**9
    assert parse_size("1048576") == 2**20
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_served_name_drops_the_quant_suffix(tmp_path):
    assert served_name(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert served_name(tmp_path / "qwen2.5-0.5b-instruct-q8_0.gguf") == "qwen2.5-0.5b-instruct"


@pytest.mark.parametrize("option", ["--max-num-seqs", "--max-model-len", "--max-num-batched-tokens", "--block-size"])
def test_non_positive_sizes_are_argparse_errors(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", option, "0"])
    assert exit_info.value.code == 2 and option in capsys.readouterr().err


def test_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_num_seqs, args.api_key, args.dtype) == ("127.0.0.1", 8080, 64, [], "auto")


def test_loading_the_engine_freezes_what_it_loaded(monkeypatch):
    """A full collection over the loaded model's objects stalls every stream: _load_engine puts
    them out of the collector's reach once the engine is up."""
    import gc

    from lmserve import memory
    from lmserve.engine import async_engine, engine

    loaded = [[i] for i in range(1000)]  # stands for the model's objects (lists: always tracked)
    monkeypatch.setattr(engine.LLMEngine, "from_config", classmethod(lambda cls, config: loaded))
    monkeypatch.setattr(async_engine, "AsyncEngine", lambda built, observers: ("engine", built))

    class State:
        engine = None
        metrics = None

    state = State()
    config = type("Config", (), {"model_path": "m.gguf", "served_model_name": "m"})()
    trimmed = []  # and the heap pages the loading freed (the GGUF reader's) go back to the OS
    monkeypatch.setattr(memory, "return_freed_memory", lambda: trimmed.append(gc.get_freeze_count()))
    released = []  # then the library pages only start-up touched
    monkeypatch.setattr(memory, "release_startup_pages", lambda: released.append(len(trimmed)) or 0)
    assert any(o is loaded[0] for o in gc.get_objects())
    try:
        cli._load_engine(config, state)
        assert state.engine == ("engine", loaded)
        assert len(trimmed) == 1 and trimmed[0] >= len(loaded)  # once, after the collection
        assert released == [1]  # once, after the trim
        assert gc.get_freeze_count() >= len(loaded)
        assert not any(o is loaded[0] for o in gc.get_objects())  # frozen objects are not collected
    finally:
        gc.unfreeze()
