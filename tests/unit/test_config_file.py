"""--config FILE: models as TOML tables, and start-up stopped by anything the file gets wrong."""

from __future__ import annotations

import math

import pytest

from lmserve.arg_types import parse_size
from lmserve.fleet.config_file import ConfigError, read_config


def write(tmp_path, text: str):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "minilm").mkdir(exist_ok=True)
    (tmp_path / "minilm" / "config.json").write_text('{"model_type": "bert"}')
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_every_setting_is_read(tmp_path):
    path = write(tmp_path, """
[models.qwen]
source = "m.gguf"
aliases = ["gpt-4o-mini", "qwen-small"]
dtype = "int8"
max_model_len = 4096
kv_cache_memory = "512MiB"
ttl = "10m"
pinned = true
preload = "You are terse."
draft_model = "m.gguf"
draft_dtype = "int4"
draft_tokens = 6

[models.qwen.defaults]
temperature = 1
top_k = 20
max_tokens = 256
stop = ["END"]

[models.embed]
source = "minilm"
ttl = -1
""")
    qwen, embed = read_config(path, parse_size)
    assert (qwen.id, qwen.source, qwen.kind, qwen.aliases, qwen.pinned, qwen.ttl) == (
        "qwen", str(tmp_path / "m.gguf"), "chat", ("gpt-4o-mini", "qwen-small"), True, 600)
    assert qwen.settings == {"dtype": "int8", "max_model_len": 4096, "kv_cache_memory": 512 * 2**20,
                             "draft_model": str(tmp_path / "m.gguf"), "draft_dtype": "int4", "draft_tokens": 6}
    assert qwen.defaults == {"temperature": 1.0, "top_k": 20, "max_tokens": 256, "stop": ["END"]}
    assert isinstance(qwen.defaults["temperature"], float)
    assert qwen.preload == [{"role": "system", "content": "You are terse."}]
    assert (embed.kind, embed.ttl, embed.pinned, embed.preload) == ("embedding", math.inf, False, None)


@pytest.mark.parametrize("text, needle", [
    ('[models.a]\nsource = "m.gguf"\ncolour = "red"\n', "model 'a': 'colour' is not a model setting"),
    ('[models.a]\ndtype = "int8"\n', "model 'a': 'source' is required"),
    ('[models.a]\nsource = "missing.gguf"\n', "model 'a': 'source' names"),
    ('[models.a]\nsource = "m.gguf"\ndtype = "int3"\n', "model 'a': 'dtype' must be one of auto"),
    ('[models.a]\nsource = "m.gguf"\nmax_model_len = 0\n', "'max_model_len' must be a positive integer"),
    ('[models.a]\nsource = "m.gguf"\nkv_cache_memory = "lots"\n', "'kv_cache_memory' is not a memory size"),
    ('[models.a]\nsource = "m.gguf"\nttl = "soon"\n', "model 'a': 'ttl' not a duration"),
    ('[models.a]\nsource = "m.gguf"\npinned = "yes"\n', "'pinned' must be true or false"),
    ('[models.a]\nsource = "m.gguf"\naliases = "b"\n', "'aliases' must be a list of names"),
    ('[models.a]\nsource = "m.gguf"\npreload = 3\n', "'preload' must be a system prompt or a list"),
    ('[models.a]\nsource = "m.gguf"\n[models.a.defaults]\nwarmth = 1\n', "'defaults.warmth' is not a sampling setting"),
    ('[models.a]\nsource = "m.gguf"\n[models.a.defaults]\ntemperature = "hot"\n', "'defaults.temperature' has the wrong type"),
    ('[models.a]\nsource = "m.gguf"\n[models.a.defaults]\nmax_tokens = 0\n', "'defaults.max_tokens' must be at least 1"),
    ('[models.e]\nsource = "minilm"\ndtype = "int8"\n', "model 'e': 'dtype' applies to chat models only"),
    ('[models.a]\nsource = "m.gguf"\ndraft_model = "gone.gguf"\n', "'draft_model' names"),
    ('[models.a]\nsource = "m.gguf"\ndraft_model = "hf:org/repo/f.gguf"\n', "'draft_model' must name a local"),
    ('[models.a]\nsource = "m.gguf"\ndraft_tokens = 4\n', "'draft_tokens' sets the draft model's drafts"),
    ('[models.a]\nsource = "m.gguf"\ndraft_model = "m.gguf"\ndraft_tokens = 0\n', "'draft_tokens' must be a positive"),
    ('[models.a]\nsource = "m.gguf"\ndraft_model = "m.gguf"\ndraft_dtype = "int2"\n', "'draft_dtype' must be one of"),
    ('[model.a]\nsource = "m.gguf"\n', "unknown table or key 'model'"),
    ('[models]\n', "no models"),
    ('[models.a\n', "not valid TOML"),
])
def test_a_mistake_names_the_file_the_model_and_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        read_config(path, parse_size)
    assert str(caught.value).startswith(str(path)) and needle in str(caught.value)


def test_the_cli_serves_the_files_models_beside_the_others(tmp_path):
    from lmserve import cli, serve_settings

    def catalogue(*argv):
        args = cli.build_parser().parse_args(["serve", *argv, "--no-embedding-model"])
        return serve_settings.catalogue(args, serve_settings.engine_config(args), None)

    path = write(tmp_path, '[models.a]\nsource = "m.gguf"\naliases = ["gpt-4o-mini"]\n')
    alone = catalogue("--config", str(path))  # no MODEL: only the file's, not the packaged default
    assert [e.id for e in alone.entries()] == ["a"] and alone.resolve("gpt-4o-mini").id == "a"
    both = catalogue(str(tmp_path / "m.gguf"), "--config", str(path)).entries()
    assert [(e.id, e.pinned) for e in both] == [("m", False), ("a", False)]
    clash = write(tmp_path, '[models.m]\nsource = "m.gguf"\n')
    with pytest.raises(ValueError, match="two models are named 'm'"):
        catalogue(str(tmp_path / "m.gguf"), "--config", str(clash))
