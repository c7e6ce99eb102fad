"""validate_roles: every tensor explained by a role, nothing missing, shapes as the config says,
fused QKV / gate_up accepted in place of the separate tensors."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from realizar_jax.errors import MissingTensorError, ModelFormatError, ShapeMismatchError, UnsupportedQuantError
from realizar_jax.formats import TensorSource, open_model
from realizar_jax.formats.validate import parse_tensor_name, validate_roles


@pytest.fixture(scope="module")
def source(model_files):
    return open_model(model_files.gguf("qwen2", "f32"))


def _with(source, tensors):
    return dataclasses.replace(source, tensors=tensors)


def test_role_map_covers_every_tensor(source):
    roles = validate_roles(source)
    assert set(roles.values()) == set(source.tensors)
    assert roles[("wq", 1)] == "blk.1.attn_q.weight" and roles[("bk", 0)] == "blk.0.attn_k.bias"
    assert roles[("lm_head", None)] == "output.weight"


def test_parse_tensor_name():
    assert parse_tensor_name("blk.12.ffn_down.weight", "gguf") == ("w_down", 12)
    assert parse_tensor_name("model.layers.3.self_attn.q_norm.weight", "hf") == ("q_norm", 3)
    assert parse_tensor_name("model.norm.weight", "hf") == ("final_norm", None)
    for bad in ("blk.01.ffn_down.weight", "blk.x.ffn_down.weight", "blk.1.ffn_down", "blk..attn_q.weight",
                "model.layers.1.mlp.down_proj.weight"):
        assert parse_tensor_name(bad, "gguf") is None


def test_missing_tensors_are_counted_and_listed(source):
    tensors = {n: t for n, t in source.tensors.items() if not n.endswith("ffn_up.weight") and n != "output.weight"}
    with pytest.raises(MissingTensorError) as e:
        validate_roles(_with(source, tensors))
    msg = str(e.value)
    assert "3 tensor(s) missing, first few: " in msg
    assert "output.weight" in msg and "blk.0.ffn_up.weight" in msg and "blk.1.ffn_up.weight" in msg
    assert str(source.path) in msg


def test_shape_mismatch_names_tensor_and_shapes(source):
    tensors = dict(source.tensors)
    t = tensors["blk.1.attn_k.weight"]
    tensors[t.name] = dataclasses.replace(t, shape=(t.shape[0] * 2, t.shape[1]))
    with pytest.raises(ShapeMismatchError, match=r"blk.1.attn_k.weight.*\[256, 256\].*\[128, 256\]"):
        validate_roles(_with(source, tensors))


def test_fused_roles_accepted(source):
    rng = np.random.default_rng(1)
    tensors = dict(source.tensors)
    c = source.config
    for i in range(c.num_layers):
        q, k, v = (tensors.pop(f"blk.{i}.attn_{x}.weight") for x in "qkv")
        fused = np.concatenate([q.data, k.data, v.data])
        tensors[f"blk.{i}.attn_qkv.weight"] = TensorSource(f"blk.{i}.attn_qkv.weight", "F32", fused.shape, fused)
        g, u = (tensors.pop(f"blk.{i}.ffn_{x}.weight") for x in ("gate", "up"))
        gu = np.concatenate([g.data, u.data]) + rng.standard_normal((2 * c.intermediate_size, c.hidden_size))
        tensors[f"blk.{i}.ffn_gate_up.weight"] = TensorSource(f"blk.{i}.ffn_gate_up.weight", "F32", gu.shape, gu)
    roles = validate_roles(_with(source, tensors))
    assert roles[("wqkv", 0)] == "blk.0.attn_qkv.weight" and ("wq", 0) not in roles
    # both fused and separate for one layer is ambiguous
    tensors["blk.0.attn_q.weight"] = source.tensors["blk.0.attn_q.weight"]
    with pytest.raises(ModelFormatError, match="both the fused wqkv"):
        validate_roles(_with(source, tensors))


def test_unknown_and_unused_tensors_refused(source):
    extra = TensorSource("blk.0.attn_output.bias", "F32", (256,), np.ones(256, np.float32))
    with pytest.raises(ModelFormatError, match="no qwen2 role explains.*attn_output.bias"):
        validate_roles(_with(source, {**source.tensors, extra.name: extra}))
    beyond = dataclasses.replace(source.tensors["blk.0.attn_norm.weight"], name="blk.7.attn_norm.weight")
    with pytest.raises(ModelFormatError, match="blk.7.attn_norm.weight"):
        validate_roles(_with(source, {**source.tensors, beyond.name: beyond}))
    no_bias = dataclasses.replace(source, config=source.config.replace(qkv_bias=False))
    with pytest.raises(ModelFormatError, match="does not use"):
        validate_roles(no_bias)


def test_quantized_vector_refused(source):
    tensors = dict(source.tensors)
    tensors["output_norm.weight"] = TensorSource("output_norm.weight", "Q8_0", (256,),
                                                 np.zeros((1, 272), np.uint8))
    with pytest.raises(UnsupportedQuantError, match="output_norm.weight.*1-D tensor stored as Q8_0"):
        validate_roles(_with(source, tensors))
