import argparse
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lmserve import cli, serve_settings
from lmserve.arg_types import parse_size
from lmserve.cli import build_parser
from lmserve.fleet.catalogue import served_name


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


@pytest.mark.parametrize("option", ["--max-num-seqs", "--max-model-len", "--max-num-batched-tokens", "--block-size",
                                    "--max-queued-requests"])
def test_non_positive_sizes_are_argparse_errors(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", option, "0"])
    assert exit_info.value.code == 2 and option in capsys.readouterr().err


def test_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.dtype) == ("127.0.0.1", 8080, [], "auto")
    config = serve_settings.engine_config(args)  # the limits -c and -np may set are resolved here
    assert (config.scheduler.max_num_seqs, config.scheduler.max_model_len) == (64, None)
    assert (config.cache.kv_cache_memory_bytes, config.cache.kv_cache_tokens) == (2**30, None)
    assert (config.scheduler.num_speculative_tokens, config.scheduler.speculative_sampling) == (4, False)


def test_speculative_ngram_sets_the_drafts_per_step(capsys):
    args = build_parser().parse_args(["serve", "--speculative-ngram", "6"])
    assert serve_settings.engine_config(args).scheduler.num_speculative_tokens == 6
    args = build_parser().parse_args(["serve", "--speculative-ngram", "0", "--speculative-sampling"])
    assert (serve_settings.engine_config(args).scheduler.num_speculative_tokens, serve_settings.engine_config(args).scheduler.speculative_sampling) == (0, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--speculative-ngram", "-1"])
    assert "--speculative-ngram" in capsys.readouterr().err


def test_max_step_ms_bounds_a_steps_prompt_time(capsys):
    assert serve_settings.engine_config(build_parser().parse_args(["serve"])).scheduler.max_step_ms == 250
    args = build_parser().parse_args(["serve", "--max-step-ms", "80.5"])
    assert serve_settings.engine_config(args).scheduler.max_step_ms == 80.5
    args = build_parser().parse_args(["serve", "--max-step-ms", "0"])
    assert serve_settings.engine_config(args).scheduler.max_step_ms == 0
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--max-step-ms", bad])
        assert "--max-step-ms" in capsys.readouterr().err


def test_loading_a_model_freezes_what_it_loaded(monkeypatch):
    """A full collection over the loaded model's objects stalls every stream: the fleet's loader
    puts them out of the collector's reach once the engine is up."""
    import gc

    from lmserve import memory
    from lmserve.config import EmbeddingConfig, EngineConfig
    from lmserve.engine import async_engine, engine
    from lmserve.fleet.catalogue import ModelEntry
    from lmserve.fleet.models import model_loader

    loaded = [[i] for i in range(1000)]  # stands for the model's objects (lists: always tracked)
    monkeypatch.setattr(engine.LLMEngine, "from_config", classmethod(lambda cls, config: loaded))
    monkeypatch.setattr(async_engine, "AsyncEngine", lambda build, observers: SimpleNamespace(built=build(), model=None,
                                                                                             draft_model=None))
    trimmed = []  # and the heap pages the loading freed (the GGUF reader's) go back to the OS
    monkeypatch.setattr(memory, "return_freed_memory", lambda: trimmed.append(gc.get_freeze_count()))
    released = []  # and the library pages only start-up touched: before the load and after it
    monkeypatch.setattr(memory, "release_library_pages", lambda: released.append(len(trimmed)) or 0)
    assert any(o is loaded[0] for o in gc.get_objects())
    load = model_loader(EngineConfig("m.gguf", "m"), EmbeddingConfig("", ""))
    try:
        model = load(ModelEntry(id="m", source="m.gguf"))
        assert model.engine.built is loaded
        assert len(trimmed) == 1 and trimmed[0] >= len(loaded)  # once, after the collection
        assert released == [0, 1]  # before the load (no trim yet), and again after the trim
        assert gc.get_freeze_count() >= len(loaded)
        assert not any(o is loaded[0] for o in gc.get_objects())  # frozen objects are not collected
    finally:
        gc.unfreeze()


def test_closing_a_chat_model_hands_its_freed_memory_back_after_its_engine(monkeypatch):
    """While a model serves, the blocks its steps free stay in the heap for the next step
    (memory.serve_from_heap): unloading it gives them back to the OS once its engine has let go."""
    from lmserve import memory
    from lmserve.fleet.models import ChatModel

    events = []
    engine = SimpleNamespace(model=None, draft_model=None, close=lambda why: events.append(("close", why)))
    monkeypatch.setattr(memory, "return_freed_memory", lambda: events.append(("trim",)))
    ChatModel(engine).close("unloaded")
    assert events == [("close", "unloaded"), ("trim",)]


def test_durations_take_ollamas_spellings():
    from lmserve.arg_types import parse_duration

    assert [parse_duration(t) for t in ("300", "30s", "5m", "1h", "250ms", "0")] == [300, 30, 300, 3600, 0.25, 0]
    assert parse_duration("-1") is None  # never
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration("soon")


def test_the_queue_bound_and_timeout_reach_the_server_state():
    settings = serve_settings.state_settings(build_parser().parse_args(["serve"]))
    assert (settings["max_queued_requests"], settings["queue_timeout"]) == (None, 60.0)  # None: sized per engine
    argv = ["serve", "--max-queued-requests", "32", "--queue-timeout", "2m"]
    settings = serve_settings.state_settings(build_parser().parse_args(argv))
    assert (settings["max_queued_requests"], settings["queue_timeout"]) == (32, 120.0)
    settings = serve_settings.state_settings(build_parser().parse_args(["serve", "--queue-timeout", "-1"]))
    assert settings["queue_timeout"] is None  # wait without limit


def models_of(*argv: str):
    args = build_parser().parse_args(["serve", *argv])
    return serve_settings.catalogue(args, serve_settings.engine_config(args), serve_settings.embedding_config(args))


def test_one_model_and_the_embedding_model_load_at_start_as_before(tmp_path):
    model = tmp_path / "Tiny.Q8_0.gguf"
    model.write_bytes(b"GGUF")
    entries = models_of(str(model)).entries()
    assert [(e.id, e.kind, e.pinned) for e in entries] == [("Tiny", "chat", True), ("all-MiniLM-L6-v2", "embedding", True)]
    assert models_of(str(model), "--served-model-name", "mine", "--no-embedding-model").resolve(None).id == "mine"
    assert models_of("--no-embedding-model").resolve(None).source == str(cli.default_model_path())


def test_several_models_or_a_models_folder_load_on_demand(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    several = models_of(str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"), "--no-embedding-model").entries()
    assert [(e.id, e.pinned) for e in several] == [("a", False), ("b", False)]
    folder = models_of("--models-dir", str(tmp_path)).entries()  # no MODEL: only the folder's, no default
    assert [(e.id, e.kind, e.pinned) for e in folder] == [("all-MiniLM-L6-v2", "embedding", False), ("a", "chat", False),
                                                          ("b", "chat", False)]


@pytest.mark.parametrize("argv, message", [
    (["missing.gguf"], "does not exist"),
    (["--models-dir", "no-such-folder"], "is not a folder"),
    (["a.gguf", "b.gguf", "--served-model-name", "x"], "names one MODEL"),
])
def test_bad_model_arguments_stop_start_up_with_the_reason(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=message):
        models_of(*argv)


def test_a_kv_budget_below_the_context_stops_start_up_before_the_server_is_up(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    args = build_parser().parse_args(["serve", "--kv-cache-memory", "64MiB", "--no-embedding-model"])
    with pytest.raises(SystemExit, match="KV cache budget holds 2912 tokens, fewer than max_model_len 8192"):
        cli.serve(args)
    fits = build_parser().parse_args(["serve", "--kv-cache-memory", "64MiB", "--max-model-len", "2048"])
    serve_settings.preflight_pinned(serve_settings.catalogue(fits, serve_settings.engine_config(fits), None), serve_settings.engine_config(fits))  # no error


FIRST_MISTAKE = """
import sys
from lmserve.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print(exc)
    print(sorted(name for name in ("torch", "lmserve.server.app", "lmserve.server.state") if name in sys.modules))
"""


@pytest.mark.parametrize(("flag", "value", "told"), [("--dry-base", "0.5", "dry_base must be >= 1"),
                                                     ("--api-key-file", "keys.txt", "holds no keys")])
def test_a_flag_s_mistake_is_told_before_the_server_s_modules_are_imported(flag, value, told, tmp_path):
    """A mistyped flag is told in under a second, not after the ~2 s of torch and the routes."""
    (tmp_path / "keys.txt").write_text("# none yet\n")
    done = subprocess.run([sys.executable, "-c", FIRST_MISTAKE, "serve", "--no-embedding-model", flag, value],
                          capture_output=True, text=True, timeout=60, check=True, cwd=tmp_path)
    said, imported = done.stdout.splitlines()
    assert told in said
    assert imported == "[]"
