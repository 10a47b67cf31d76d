"""lmserve's GGUF header parser against the gguf package's reader, and its errors on bad files."""

import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from lmserve.weights.gguf import GGUFFile, UnreadArray, UnsupportedModelError

T = gguf.GGUFValueType

VALUES = {
    "v.u8": (200, T.UINT8), "v.i8": (-100, T.INT8), "v.u16": (60000, T.UINT16), "v.i16": (-30000, T.INT16),
    "v.u32": (4_000_000_000, T.UINT32), "v.i32": (-2_000_000_000, T.INT32), "v.f32": (0.1, T.FLOAT32),
    "v.bool": (True, T.BOOL), "v.false": (False, T.BOOL), "v.str": ("héllo <|im_start|>", T.STRING),
    "v.u64": (2**63 + 5, T.UINT64), "v.i64": (-(2**62), T.INT64), "v.f64": (1e-300, T.FLOAT64),
    "v.empty": ("", T.STRING),
    "a.ints": ([1, -2, 3], T.ARRAY, T.INT32), "a.floats": ([0.5, -1.25, 1e-3], T.ARRAY, T.FLOAT32),
    "a.strs": (["Ġthe", "", "日本"], T.ARRAY, T.STRING), "a.bools": ([True, False], T.ARRAY, T.BOOL),
    "a.u8": ([0, 255], T.ARRAY, T.UINT8),
}


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write(path, alignment=None, with_values=True):
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    if with_values:
        for key, (value, vtype, *sub) in VALUES.items():
            writer.add_key_value(key, value, vtype, sub[0] if sub else None)
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 4)).astype(np.float16))
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1):
        writer.add_tensor(qtype.name.lower(), gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
    writer.add_tensor("vector", np.arange(7, dtype=np.float32))
    _finish(writer)
    return path


def _reference(path):
    reader = gguf.GGUFReader(str(path))
    metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return metadata, reader.tensors


def _metadata_file(path, *values):
    """A GGUF with no tensors and these (key, type id, packed value) entries, written by hand."""
    body = b"".join(struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", t) + v for k, t, v in values)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(values)) + body)
    return path


@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_metadata_and_tensors_match_the_gguf_package(tmp_path, alignment):
    path = _write(tmp_path / "m.gguf", alignment)
    ours = GGUFFile.open(path)
    metadata, tensors = _reference(path)
    assert ours.metadata == metadata
    assert {k: type(v) for k, v in ours.metadata.items()} == {k: type(v) for k, v in metadata.items()}
    assert ours.metadata["a.floats"] == [0.5, -1.25, float(np.float32(1e-3))]  # float32, widened
    assert ours.metadata["v.u64"] == 2**63 + 5 and ours.metadata["v.str"] == "héllo <|im_start|>"
    assert [t.name for t in ours.tensors] == ["f32", "f16", "q8_0", "q4_1", "vector"]
    for mine, ref in zip(ours.tensors, tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.shape) == (ref.name, ref.tensor_type, tuple(int(d) for d in ref.shape))
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape
        np.testing.assert_array_equal(mine.data, ref.data)
    np.testing.assert_array_equal(ours.read_tensor("vector"), np.arange(7, dtype=np.float32))


def test_nested_arrays_read_as_lists_of_lists(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    writer.add_array("nested", [[1, 2], [3]])
    writer.add_array("nested_strs", [["a", "b"], ["c"]])
    _finish(writer)
    metadata = GGUFFile.open(tmp_path / "n.gguf").metadata
    assert metadata["nested"] == [[1, 2], [3]] and metadata["nested_strs"] == [["a", "b"], ["c"]]


def test_a_header_read_without_arrays_has_the_rest_and_each_array_s_length(tmp_path):
    path = _write(tmp_path / "m.gguf", 64)
    writer = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    writer.add_array("nested_strs", [["a", "b"], ["c"]])
    writer.add_uint32("after", 7)
    _finish(writer)
    for file in (path, tmp_path / "n.gguf"):
        whole, header = GGUFFile.open(file), GGUFFile.open(file, arrays=False)
        arrays = {key for key, value in whole.metadata.items() if isinstance(value, list)}
        assert arrays and header.metadata.keys() == whole.metadata.keys()
        assert {key: header.metadata[key] for key in whole.metadata.keys() - arrays} == \
            {key: whole.metadata[key] for key in whole.metadata.keys() - arrays}
        assert {key: header.metadata[key] for key in arrays} == {key: UnreadArray(len(whole.metadata[key]))
                                                                  for key in arrays}
        assert [(t.name, t.tensor_type, t.shape) for t in header.tensors] == \
            [(t.name, t.tensor_type, t.shape) for t in whole.tensors]
        for tensor in whole.tensors:
            np.testing.assert_array_equal(header.read_tensor(tensor.name), whole.read_tensor(tensor.name))
    with pytest.raises(TypeError):
        iter(header.metadata["nested_strs"])  # nothing read, nothing to iterate


def test_a_default_model_header_without_arrays_gives_its_shape():
    from lmserve.cli import default_model_path
    from lmserve.model.config import ModelConfig
    from lmserve.weights.load import read_model_config

    whole, header = GGUFFile.open(default_model_path()), GGUFFile.open(default_model_path(), arrays=False)
    assert read_model_config(default_model_path()) == ModelConfig.from_gguf(whole.metadata, False)
    # without a vocab_size key, the vocabulary's length
    unsized = [{key: value for key, value in opened.metadata.items() if key != "llama.vocab_size"}
               for opened in (whole, header)]
    assert ModelConfig.from_gguf(unsized[1], False) == ModelConfig.from_gguf(unsized[0], False)
    assert ModelConfig.from_gguf(unsized[1], False).vocab_size == 49152


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile.open(tmp_path / "x.gguf")


@pytest.mark.parametrize("keep", [6, 30, 300, "in an array of strings", "in an array of numbers"])
@pytest.mark.parametrize("arrays", [True, False])
def test_a_header_cut_short_is_named_truncated(tmp_path, keep, arrays):
    raw = _write(tmp_path / "m.gguf").read_bytes()
    marks = {"in an array of strings": "日本".encode(), "in an array of numbers": struct.pack("<f", 1e-3)}
    if keep in marks:
        keep = raw.index(marks[keep]) + 2
    (tmp_path / "cut.gguf").write_bytes(raw[:keep])
    with pytest.raises(ValueError, match="truncated or not a valid GGUF"):
        GGUFFile.open(tmp_path / "cut.gguf", arrays=arrays)


def test_tensor_data_cut_short_is_named_truncated(tmp_path):
    raw = _write(tmp_path / "m.gguf", with_values=False).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-8])  # the last tensor loses its last two floats
    with pytest.raises(ValueError, match="truncated: tensor 'vector'"):
        GGUFFile.open(tmp_path / "cut.gguf")


@pytest.mark.parametrize("version, message", [
    (struct.pack("<I", 1), "GGUF version 1"),
    (struct.pack(">I", 3), "big-endian"),
])
def test_unsupported_versions_are_refused_by_name(tmp_path, version, message):
    raw = bytearray(_write(tmp_path / "m.gguf").read_bytes())
    raw[4:8] = version
    (tmp_path / "v.gguf").write_bytes(bytes(raw))
    with pytest.raises(UnsupportedModelError, match=message):
        GGUFFile.open(tmp_path / "v.gguf")


def test_unknown_value_and_tensor_types_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown metadata value type 77"):
        GGUFFile.open(_metadata_file(tmp_path / "bad.gguf", ("general.architecture", 77, b"llama")))

    raw = bytearray(_write(tmp_path / "m.gguf", with_values=False).read_bytes())
    at = raw.index(b"vector") + len(b"vector")  # name, then n_dims (4), one dim (8), the type id
    raw[at + 12:at + 16] = struct.pack("<I", 250)
    (tmp_path / "t.gguf").write_bytes(bytes(raw))
    with pytest.raises(UnsupportedModelError, match="'vector' has tensor type 250"):
        GGUFFile.open(tmp_path / "t.gguf")


def test_the_default_model_reads_as_the_gguf_package_reads_it():
    from lmserve.cli import default_model_path

    path = default_model_path()
    ours = GGUFFile.open(path)
    metadata, tensors = _reference(path)
    assert ours.metadata == metadata and len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [(t.name, t.tensor_type, t.shape, t.data.shape) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(int(d) for d in t.shape), t.data.shape) for t in tensors]
    for mine, ref in zip(ours.tensors, tensors):
        assert mine.data.ctypes.data - ours.tensors[0].data.ctypes.data == ref.data_offset - tensors[0].data_offset
    np.testing.assert_array_equal(ours.tensors[-1].data, tensors[-1].data)


def test_damaged_headers_fail_with_value_errors_only(tmp_path):
    """Seeded damage to the header (bytes, sizes, cuts) yields a file or a ValueError, never another
    exception type, a hang or a huge allocation: the server reports a bad model file cleanly."""
    import random

    raw = _write(tmp_path / "m.gguf").read_bytes()
    header_end = raw.index(b"vector") + 40
    rng = random.Random(0)
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(300):
        damaged = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(8, header_end)
            if rng.random() < 0.5:
                damaged[at] = rng.randrange(256)
            else:
                damaged[at:at + 8] = struct.pack("<Q", rng.choice([2**63 - 1, 2**40, 2**32 + 1, rng.randrange(2**64)]))
        cut = len(damaged) if rng.random() < 0.7 else rng.randrange(8, len(damaged))
        (tmp_path / "d.gguf").write_bytes(bytes(damaged[:cut]))
        try:
            GGUFFile.open(tmp_path / "d.gguf")
            outcomes["parsed"] += 1
        except ValueError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 200 and sum(outcomes.values()) == 300


def test_hostile_metadata_is_refused(tmp_path, monkeypatch):
    nested = struct.pack("<IQ", 9, 1) * 40 + struct.pack("<IQ", 5, 0)  # arrays 40 deep
    with pytest.raises(ValueError, match="nested over 8 deep"):
        GGUFFile.open(_metadata_file(tmp_path / "n.gguf", ("x", 9, nested)))
    twice = ("tokenizer.ggml.model", 8, struct.pack("<Q", 4) + b"gpt2")
    with pytest.raises(ValueError, match="'tokenizer.ggml.model' twice"):
        GGUFFile.open(_metadata_file(tmp_path / "d.gguf", twice, twice))
    with pytest.raises(ValueError, match="general.alignment True"):
        GGUFFile.open(_metadata_file(tmp_path / "a.gguf", ("general.alignment", 7, b"\x01")))
    monkeypatch.setattr("lmserve.weights.gguf.MAX_ARRAY_ITEMS", 100)
    items = struct.pack("<IQ", 0, 101) + bytes(101)
    with pytest.raises(ValueError, match="array of 101 items"):
        GGUFFile.open(_metadata_file(tmp_path / "c.gguf", ("x", 9, items)))
    assert GGUFFile.open(_metadata_file(tmp_path / "ok.gguf", ("x", 9, struct.pack("<IQ", 0, 100) + bytes(100)))).metadata == {"x": [0] * 100}


def test_version_zero_is_not_called_big_endian(tmp_path):
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 0, 0, 0))
    with pytest.raises(UnsupportedModelError, match="GGUF version 0"):
        GGUFFile.open(tmp_path / "v.gguf")


def test_an_impossible_tensor_shape_is_named(tmp_path):
    raw = bytearray(_write(tmp_path / "m.gguf", with_values=False).read_bytes())
    at = raw.index(b"vector") + len(b"vector")  # name, then n_dims (4), its one dim (8)
    raw[at + 4:at + 12] = struct.pack("<Q", 2**50)
    (tmp_path / "s.gguf").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="'vector' has an impossible shape"):
        GGUFFile.open(tmp_path / "s.gguf")


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_fast_block_dequantization_is_the_gguf_packages_bit_for_bit(qtype, native):
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    from lmserve.kernels import native_module
    from lmserve.memory import LOAD_PIECE_BYTES
    from lmserve.weights.gguf_blocks import dequantize_blocks

    assert native_module() is not None or not native  # the kernels' pass is the one tested

    # random bytes over more blocks than one piece (and not a multiple of it); the float16 scales
    # and lows get every finite value class: zero, subnormal, negative, large
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    piece_blocks = LOAD_PIECE_BYTES // (4 * block_size)
    blocks = rng.integers(0, 256, (piece_blocks * 2 + 37, type_size), dtype=np.uint8)
    halves = 2 if qtype == GGMLQuantizationType.Q4_1 else 1
    for h in range(halves):
        blocks[:, 2 * h + 1] &= 0x7B  # exponent below all-ones: no inf or NaN
        blocks[:3, 2 * h:2 * h + 2] = np.array([[0, 0], [1, 0], [0, 0x80]], dtype=np.uint8)  # 0, subnormal, -0
    ours = dequantize_blocks(blocks, qtype, native=native)
    reference = dequantize(blocks, qtype).reshape(-1)
    assert ours.dtype == np.float32 and np.array_equal(ours, reference)


@pytest.mark.parametrize("name", ["f32", "f16", "q8_0", "q4_1"])
def test_rows_read_as_the_whole_tensor_reads_them(tmp_path, name):
    ours = GGUFFile.open(_write(tmp_path / "m.gguf"))
    whole = ours.read_tensor(name)
    count = whole.shape[0]
    for start, stop in ((0, 1), (1, count), (0, count)):
        rows = ours.read_rows(name, start, stop)
        assert rows.dtype == np.float32 and rows.shape == (stop - start, whole.shape[1])
        np.testing.assert_array_equal(rows, whole[start:stop])
    with pytest.raises(ValueError, match=rf"rows \[1, {count + 1}\) of tensor '{name}', which has {count}"):
        ours.read_rows(name, 1, count + 1)
    with pytest.raises(ValueError, match="'vector' has 1 dimensions"):
        ours.read_rows("vector", 0, 1)


def _mapped_resident_bytes(path, address: int | None = None) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps); only the one holding
    `address` if given."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                low, high = (int(end, 16) for end in head[0].split("-"))
                inside = line.rstrip().endswith(str(path)) and (address is None or low <= address < high)
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def test_a_tensor_read_leaves_the_resident_set_and_keeps_its_values():
    """A dequantized tensor's bytes in the mapped file are dropped from the process's resident set
    (a load would otherwise hold the whole file beside the weights made from it), and read again
    from the file alike. An F32 tensor is a copy, so its pages go too."""
    from lmserve.cli import default_model_path

    path = default_model_path()
    ours = GGUFFile.open(path)
    table = next(t for t in ours.tensors if t.name == "token_embd.weight")  # Q8_0, ~30 MB
    assert table.tensor_type == GGMLQuantizationType.Q8_0 and table.data.nbytes > 20 * 2**20
    before = _mapped_resident_bytes(path)
    checksum = int(table.data.sum(dtype=np.int64))  # every page of it touched
    touched = _mapped_resident_bytes(path)
    assert touched - before > 0.9 * table.data.nbytes
    first = ours.read_rows("token_embd.weight", 0, 64)
    whole = ours.read_tensor("token_embd.weight")
    assert touched - _mapped_resident_bytes(path) > 0.9 * table.data.nbytes
    np.testing.assert_array_equal(whole[:64], first)
    assert int(table.data.sum(dtype=np.int64)) == checksum  # back from the file, unchanged
    norm = next(t for t in ours.tensors if t.tensor_type == GGMLQuantizationType.F32 and len(t.shape) == 1)
    values = ours.read_tensor(norm.name)
    assert not np.shares_memory(values, norm.data) and np.array_equal(values, norm.data)


def test_reading_every_tensor_leaves_none_of_the_file_resident():
    """Once every tensor is read, the file's pages are out of the resident set: the header's once it
    is parsed, and those the kernel mapped around each read (64 KiB at each end of each of the
    default model's 272 tensors otherwise, ~9-17 MiB in all; whole large folios of up to 2 MiB on
    file systems that have them: 3.7 MiB left with 64 KiB margins on Linux 6.18's ext4)."""
    from lmserve.cli import default_model_path

    path = default_model_path()
    ours = GGUFFile.open(path)
    mapping = ours.tensors[0].data.ctypes.data
    assert _mapped_resident_bytes(path, mapping) < 64 * 1024  # the header: 1.8 MiB of tokenizer strings
    for tensor in ours.tensors:
        ours.read_tensor(tensor.name)
    assert _mapped_resident_bytes(path, mapping) < 256 * 1024
