import argparse

import pytest

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
    assert (args.host, args.port, args.max_num_seqs, args.api_key, args.dtype) == ("127.0.0.1", 8080, 64, [], "float32")
