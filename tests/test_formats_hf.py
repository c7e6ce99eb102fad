"""HF folders: tensors equal what safetensors' own torch loader reads (f32, bf16, sharded), config.json in
both the transformers<5 and >=5 spellings, and clear errors for broken folders."""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from realizar_jax.config import RopeScaling
from realizar_jax.errors import DamagedFileError, MissingTensorError, ModelFormatError, UnknownArchitectureError
from realizar_jax.formats import open_model


def _reference_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("variant,kw", [("qwen2", {}), ("llama", {"dtype": "bfloat16"}),
                                        ("qwen3", {"dtype": "float16"}), ("mistral", {"shard_size": "300KB"})])
def test_tensors_equal_safetensors_reference(model_files, variant, kw):
    folder = model_files.hf(variant, **kw)
    if "shard_size" in kw:
        assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").is_file()
    src = open_model(folder)
    ref = _reference_tensors(folder)
    assert set(src.tensors) == set(ref)
    want_qtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name, t in src.tensors.items():
        r = ref[name]
        assert t.qtype == want_qtype[r.dtype] and t.shape == tuple(r.shape)
        if r.dtype == torch.bfloat16:
            assert t.data.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(np.asarray(t.data, np.float32), r.float().numpy())
        else:
            np.testing.assert_array_equal(t.data, r.numpy())
        assert t.nbytes == r.numel() * r.element_size()


def test_opening_reads_only_headers(tmp_path):
    """A 64 MiB safetensors file opens without its data entering RAM; a slice reads only its rows."""
    from safetensors.numpy import save_file

    from realizar_jax.formats.hf_dir import _open_safetensors

    def rss_mb():
        return sum(int(line.split()[1]) for line in open("/proc/self/status")
                   if line.startswith(("RssAnon:", "RssFile:"))) / 1024

    rng = np.random.default_rng()
    big = rng.standard_normal((4096, 4096), dtype=np.float32)
    small = rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    save_file({"big": big, "small": small}, str(tmp_path / "x.safetensors"))
    rows = rng.integers(0, 4096 - 8)
    want = big[rows:rows + 8].copy()
    del big
    before = rss_mb()
    tensors = _open_safetensors(tmp_path / "x.safetensors")
    part = tensors["big"].data[rows:rows + 8]
    assert rss_mb() - before < 16
    np.testing.assert_array_equal(part, want)
    assert tensors["big"].nbytes == 64 * 2**20 and tensors["big"].shape == (4096, 4096)
    assert np.asarray(tensors["small"].data).dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(tensors["small"].data, np.float32), small.astype(np.float32))


def test_bf16_and_sharded_configs_match_plain(model_files):
    plain = open_model(model_files.hf("llama")).config
    assert open_model(model_files.hf("llama", dtype="bfloat16")).config == plain
    assert open_model(model_files.hf("llama", shard_size="300KB")).config == plain


def _copy(folder, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_old_transformers_config_spelling(model_files, tmp_path):
    """transformers<5 wrote rope_theta and rope_scaling at the top level; both spellings give one config."""
    folder = _copy(model_files.hf("llama3"), tmp_path)
    new = open_model(folder).config
    cfg = json.loads((folder / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert open_model(folder).config == new
    assert new.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64) and new.rope_theta == 500000.0


def test_linear_rope_and_unsupported_rope(model_files, tmp_path):
    folder = _copy(model_files.hf("llama"), tmp_path)
    _edit_config(folder, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert open_model(folder).config.rope_scaling == RopeScaling("linear", factor=2.0)
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ModelFormatError, match="yarn"):
        open_model(folder)


def test_broken_folders(model_files, tmp_path):
    folder = _copy(model_files.hf("qwen2"), tmp_path)
    _edit_config(folder, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnknownArchitectureError, match="gpt2"):
        open_model(folder)
    _edit_config(folder, model_type="qwen2", num_hidden_layers=3)
    with pytest.raises(MissingTensorError, match=r"tensor\(s\) missing, first few: model.layers.2"):
        open_model(folder)
    _edit_config(folder, num_hidden_layers=2, hidden_size="wide")
    with pytest.raises(DamagedFileError, match="config.json"):
        open_model(folder)
    _edit_config(folder, hidden_size=256, intermediate_size=500)
    with pytest.raises(ModelFormatError, match="shape .* needs"):
        open_model(folder)
    _edit_config(folder, intermediate_size=512, num_hidden_layers=10**12)
    with pytest.raises(DamagedFileError, match="num_hidden_layers = 1000000000000 must be an integer in 1.."):
        open_model(folder)
    _edit_config(folder, num_hidden_layers=2)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(DamagedFileError, match="not valid JSON"):
        open_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(MissingTensorError, match="config.json not found"):
        open_model(folder)
    with pytest.raises(ModelFormatError, match="no such"):
        open_model(tmp_path / "nowhere")


def test_missing_shard_and_index_lies(model_files, tmp_path):
    folder = _copy(model_files.hf("mistral", shard_size="300KB"), tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    moved = folder / shard
    moved.rename(tmp_path / "away")
    with pytest.raises(MissingTensorError, match=shard):
        open_model(folder)
    (tmp_path / "away").rename(moved)
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(DamagedFileError, match="weight_map names file"):
        open_model(folder)


def test_qkv_bias_must_match_config(model_files, tmp_path):
    """A llama checkpoint with q/k/v biases the config does not announce would lose them silently."""
    folder = _copy(model_files.hf("qwen2"), tmp_path)
    _edit_config(folder, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False)
    with pytest.raises(ModelFormatError, match="does not use"):
        open_model(folder)
    _edit_config(folder, attention_bias=True)
    assert open_model(folder).config.qkv_bias
