"""load(hf_dir, quantize=Q): the weights a `convert --quant Q` file would hold, without the file.

The reference is the project's own two-step path, convert then load, on the same folder: every
weight leaf must match bit for bit, and so must the logits. Independent checks of the quantizers
themselves (against gguf-py) live in test_quant_quantize.py and test_convert.py."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import realizar_jax as rj
from realizar_jax.cli.main import main
from realizar_jax.cli.parser import QUANT_CHOICES as CLI_CHOICES
from realizar_jax.formats.gguf_writer import QUANT_CHOICES, write_gguf


def _leaves(model):
    return [np.asarray(getattr(x, "data", x)) for x in jax.tree_util.tree_leaves(model.params)]


@pytest.mark.parametrize("arch, quant", [("llama", "q4_k_m"), ("qwen2", "q8_0"), ("qwen2", "mxfp4"),
                                         pytest.param("llama", "q6_k", marks=pytest.mark.slow),
                                         pytest.param("qwen3", "q4_0", marks=pytest.mark.slow),
                                         pytest.param("llama", "f16", marks=pytest.mark.slow)])
def test_quantize_on_load_equals_convert_then_load(model_files, tmp_path, arch, quant):
    hf = model_files.hf(arch)
    gguf_path = write_gguf(hf, tmp_path / f"{arch}-{quant}.gguf", quant, progress=False)
    via_file = rj.load(gguf_path, dtype="float32", dense_weights=False)   # the packed blocks themselves
    on_load = rj.load(hf, dtype="float32", quantize=quant, dense_weights=False)
    want, got = _leaves(via_file), _leaves(on_load)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_array_equal(g, w)
    kinds = {getattr(x, "qtype", "dense") for x in jax.tree_util.tree_leaves(
        on_load.params, is_leaf=lambda x: hasattr(x, "qtype"))}
    assert kinds == {getattr(x, "qtype", "dense") for x in jax.tree_util.tree_leaves(
        via_file.params, is_leaf=lambda x: hasattr(x, "qtype"))}
    ids = [int(i) for i in np.random.default_rng(0).integers(3, on_load.config.vocab_size, 11)]
    np.testing.assert_array_equal(np.asarray(on_load.logits(ids)), np.asarray(via_file.logits(ids)))


def test_quantize_on_load_on_the_device_equals_convert_then_load(model_files, tmp_path, monkeypatch):
    """Every type through the jitted encoders (on a CPU only the 32-value ones go there by default)."""
    from realizar_jax.quant import device_quant
    monkeypatch.setattr(device_quant, "faster_on_device", lambda qtype, backend=None: True)
    encoded, run = [], device_quant.quantize_rows_on_device

    def counted(read, rows, cols, qtype, device=None):
        encoded.append(qtype)
        return run(read, rows, cols, qtype, device)
    monkeypatch.setattr(device_quant, "quantize_rows_on_device", counted)
    hf = model_files.hf("llama")
    via_file = rj.load(write_gguf(hf, tmp_path / "llama-q4_k_m.gguf", "q4_k_m", progress=False), dtype="float32",
                       dense_weights=False)
    on_load = rj.load(hf, dtype="float32", quantize="q4_k_m", dense_weights=False)
    assert {"Q4_K", "Q6_K"} <= set(encoded)
    for w, g in zip(_leaves(via_file), _leaves(on_load)):
        np.testing.assert_array_equal(g, w)


def test_quantize_on_load_refuses_what_it_cannot_do(model_files):
    with pytest.raises(ValueError, match="q4_k_m"):   # the message lists the choices
        rj.load(model_files.hf("llama"), quantize="q3_k")
    with pytest.raises(ValueError, match="HF safetensors folder"):
        rj.load(model_files.gguf("llama", "q8_0"), quantize="q8_0")


def test_cli_quantize(model_files, capsys):
    assert CLI_CHOICES == QUANT_CHOICES   # the CLI spells them out so that parsing does not import jax
    rc = main(["generate", "--model", str(model_files.hf("llama")), "--prompt", "hello", "--max-new-tokens", "3",
               "--quantize", "q8_0"])
    assert rc == 0
    assert "decode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_files.hf("llama")), "--prompt", "x", "--quantize", "q9"])
