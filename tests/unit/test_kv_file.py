"""The saved-prefix file format: what is written reads back bit for bit; anything else (another
model's file, a truncated or corrupted one, not one of ours) is refused by name; writes are atomic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmserve.cache.kv_file import KVFileIdentity, checkpoint_fingerprint, open_kv_file, write_kv_file

IDENTITY = KVFileIdentity(family="llama", num_hidden_layers=2, num_key_value_heads=2, head_dim=8, block_size=4,
                          dtype="float32", kv_dtype="float32", weights="0123abcd")


def random_layers(identity: KVFileIdentity, num_blocks: int, seed: int = 0):
    """Each layer's (keys, values), (num_kv_heads, num_blocks, block_size, head_dim)."""
    g = torch.Generator().manual_seed(seed)
    shape = (identity.num_key_value_heads, num_blocks, identity.block_size, identity.head_dim)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[identity.kv_dtype]
    return [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
            for _ in range(identity.num_hidden_layers)]


def saved(tmp_path: Path, identity=IDENTITY, num_blocks=3) -> tuple[Path, list[int], list]:
    path = tmp_path / "slot.bin"
    tokens = list(range(100, 100 + num_blocks * identity.block_size))
    layers = random_layers(identity, num_blocks)
    write_kv_file(path, identity, tokens, layers)
    return path, tokens, layers


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_what_is_written_reads_back_bit_for_bit(tmp_path, kv_dtype):
    identity = replace(IDENTITY, kv_dtype=kv_dtype)
    path, tokens, layers = saved(tmp_path, identity)
    with open_kv_file(path) as file:
        file.verify()
        file.check(identity)
        assert file.identity == identity and file.token_ids == tokens and file.num_blocks == 3
        got = list(file.layers(0, 3))
        some = list(file.layers(1, 2))
    assert len(got) == len(some) == 2
    for (keys, values), (k, v), (k_part, v_part) in zip(layers, got, some):
        assert k.dtype == keys.dtype and torch.equal(k, keys) and torch.equal(v, values)
        assert torch.equal(k_part, keys[:, 1:3]) and torch.equal(v_part, values[:, 1:3])


def test_an_empty_prefix_is_a_valid_file_with_no_blocks(tmp_path):
    path, tokens, _ = saved(tmp_path, num_blocks=0)
    with open_kv_file(path) as file:
        file.verify()
        assert file.token_ids == [] and file.num_blocks == 0 and list(file.layers(0, 0)) == []


def test_another_models_file_is_refused_naming_what_differs(tmp_path):
    path, _, _ = saved(tmp_path)
    engine = replace(IDENTITY, num_hidden_layers=3, weights="ffff")
    with open_kv_file(path) as file, pytest.raises(ValueError) as refused:
        file.check(engine)
    message = str(refused.value)
    assert "num_hidden_layers: the file's 2, this engine's 3" in message
    assert "weights: the file's '0123abcd', this engine's 'ffff'" in message
    assert "head_dim" not in message


@pytest.mark.parametrize("keep", [0, 5, 40, -1])
def test_a_truncated_file_is_refused(tmp_path, keep):
    path, _, _ = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match="truncated"):
        with open_kv_file(path):
            pass


def test_extra_bytes_are_refused(tmp_path):
    path, _, _ = saved(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="corrupt: it holds"):
        with open_kv_file(path):
            pass


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_data_byte_fails_the_checksum(tmp_path):
    path, _, _ = saved(tmp_path)
    flip(path, path.stat().st_size - 100)
    with open_kv_file(path) as file, pytest.raises(ValueError, match="corrupt: its checksum"):
        file.verify()


def test_a_garbled_header_is_refused(tmp_path):
    path, _, _ = saved(tmp_path)
    flip(path, 16)  # the JSON's opening brace
    with pytest.raises(ValueError, match="corrupt: its header does not parse"):
        with open_kv_file(path):
            pass


def test_another_format_or_version_is_refused(tmp_path):
    path, _, _ = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(b"GGUF" + data[4:])
    with pytest.raises(ValueError, match="not a saved prefix file"):
        with open_kv_file(path):
            pass
    path.write_bytes(data[:8] + (2).to_bytes(4, "little") + data[12:])
    with pytest.raises(ValueError, match="format version 2; this lmserve reads version 1"):
        with open_kv_file(path):
            pass


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path, tokens, _ = saved(tmp_path)
    before = path.read_bytes()

    def failing_layers():
        yield random_layers(IDENTITY, 3)[0]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_kv_file(path, IDENTITY, tokens, failing_layers())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["slot.bin"]


def test_fingerprint_follows_contents_not_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "config.json").write_text('{"model_type": "llama"}')
        (tmp_path / folder / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "model.gguf").write_bytes(bytes(range(256)) * 10)
    a, b = checkpoint_fingerprint(tmp_path / "a"), checkpoint_fingerprint(str(tmp_path / "b"))
    assert a is not None and a == b
    assert checkpoint_fingerprint(tmp_path / "model.gguf") not in (None, a)  # no config.json in it
    flip(tmp_path / "b" / "model.safetensors", 1000)
    assert checkpoint_fingerprint(tmp_path / "b") != a
    assert checkpoint_fingerprint(tmp_path / "missing") is None
