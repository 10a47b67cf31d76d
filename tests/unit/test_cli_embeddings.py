"""The CLI's embedding-model options."""

import pytest

from lmserve.cli import build_parser, default_embedding_model_path
from lmserve.serve_settings import embedding_config
from lmserve.serve_settings import DEFAULT_EMBEDDING_NAME


def parse(*argv):
    return build_parser().parse_args(["serve", *argv])


def test_packaged_minilm_is_served_by_default():
    config = embedding_config(parse())
    assert config.served_model_name == DEFAULT_EMBEDDING_NAME == "all-MiniLM-L6-v2"
    assert config.model_path == str(default_embedding_model_path())
    assert (default_embedding_model_path() / "model.safetensors").is_file()


def test_no_embedding_model_disables_it():
    assert embedding_config(parse("--no-embedding-model")) is None


def test_an_explicit_folder_and_name(tmp_path):
    folder = tmp_path / "bge-small-en"
    assert embedding_config(parse("--embedding-model", str(folder))).served_model_name == "bge-small-en"
    named = embedding_config(parse("--embedding-model", str(folder), "--embedding-model-name", "e5"))
    assert (named.model_path, named.served_model_name) == (str(folder), "e5")


def test_folder_and_no_embedding_model_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--embedding-model", "x", "--no-embedding-model")
    assert exit_info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_chat_embedding_pooling_defaults_to_mean():
    assert parse().chat_embedding_pooling == "mean"
    assert parse("--chat-embedding-pooling", "last").chat_embedding_pooling == "last"
    with pytest.raises(SystemExit):
        parse("--chat-embedding-pooling", "cls")
