"""An int4 GGUF that holds some matrices at more bits (a Q4_K_M keeps attn_v and some ffn_down at
Q6_K) is served under `--dtype auto` with those matrices, and the ones fused with them, as int8: the
file's precision where it has it, closer to the file's values than int4 everywhere."""

from __future__ import annotations

import pytest
import torch

from lmserve.model.weight_formats.int4 import W4A8Pairs, W4A8Weight, int4_linear_supported
from lmserve.model.weight_formats.int8 import W8A8Weight
from lmserve.weights.load import load_weights
from tests.helpers.tiny_models import tiny_hf_model, write_gguf
from tests.model.test_bf16_weights import all_logits

pytestmark = pytest.mark.skipif(not int4_linear_supported(), reason="needs the W4A8 kernels")

# Q4_0 layers as the gguf package writes them; the wider matrices at Q8_0, as Q4_K_M places its Q6_K.
WIDER = {"blk.0.attn_v.weight": "Q8_0", "blk.0.ffn_down.weight": "Q8_0", "blk.1.ffn_down.weight": "Q8_0"}
INT4 = (W4A8Pairs, W4A8Weight)


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory):
    model = tiny_hf_model("llama", seed=3, hidden_size=128, intermediate_size=256)
    return write_gguf(model, tmp_path_factory.mktemp("mixed") / "m.gguf", "llama", "Q4_0", tensor_quants=WIDER)


def load(path, dtype: str) -> torch.nn.Module:
    return load_weights(path, dtype)[0]


def formats(model) -> list[dict[str, type]]:
    return [{name: type(module.storage) for name, module in (("qkv", layer.self_attn.qkv_proj),
                                                              ("o", layer.self_attn.o_proj),
                                                              ("gate_up", layer.mlp.gate_up_proj),
                                                              ("down", layer.mlp.down_proj))}
            for layer in model.model.layers]


def test_auto_serves_the_wider_matrices_and_their_fused_partners_as_int8(mixed_file, caplog):
    with caplog.at_level("INFO", logger="lmserve.weights.load"):
        first, second = formats(load(mixed_file, "auto"))
    assert first["qkv"] is W8A8Weight and first["down"] is W8A8Weight  # q and k with v: one product
    assert second["down"] is W8A8Weight
    assert first["o"] in INT4 and first["gate_up"] in INT4 and second["qkv"] in INT4 and second["gate_up"] in INT4
    assert "int8 for the layer matrices the file holds at more than 4 bits (3 Q8_0) and the 2 fused" in caplog.text


def test_int4_asked_for_by_name_is_int4_everywhere(mixed_file):
    for layer in formats(load(mixed_file, "int4")):
        assert all(kind in INT4 for kind in layer.values())


def test_auto_is_closer_to_the_files_values_than_int4_everywhere(mixed_file):
    ids = torch.randint(0, 300, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    exact = all_logits(load(mixed_file, "float32"), ids)  # the file's values, dequantized
    errors = {dtype: (all_logits(load(mixed_file, dtype), ids) - exact).pow(2).mean().sqrt().item()
              for dtype in ("auto", "int4")}
    assert errors["auto"] < 0.7 * errors["int4"], errors
