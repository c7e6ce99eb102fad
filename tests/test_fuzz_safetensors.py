"""Damaged safetensors files and config.json in an HF folder: only ModelFormatError subclasses come
out of open_model, quickly, whatever the header claims."""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import make_hf_model
from realizar_jax.errors import DamagedFileError, ModelFormatError, UnsupportedQuantError
from realizar_jax.formats import open_model
from realizar_jax.formats.hf_dir import read_safetensors_header

FUZZ = settings(deadline=3000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)
HUGE = [0, 1, -1, 2**31, 2**32, 2**53, 2**63, 2**64, 10**30, -(2**63)]
json_scalar = st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE), st.integers(-1000, 10**6),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
json_value = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
    st.text(max_size=6), kids, max_size=3), max_leaves=8)


class _Base(tuple):
    def __repr__(self):  # hypothesis prints fixture values on failure; the data is megabytes
        return "<base safetensors folder>"


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-st")
    src = make_hf_model(d, "qwen2", hidden=64, intermediate=128, layers=1, kv_heads=2)
    open_model(src)
    raw = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return _Base((src, json.loads(raw[8:8 + n]), raw[8 + n:], json.loads((src / "config.json").read_text())))


@pytest.fixture(scope="module")
def workdir(base_folder):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "m"
        shutil.copytree(base_folder[0], folder)
        yield folder


def _write(folder: Path, header, data: bytes, config=None, raw_header: bytes | None = None):
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def _opens_or_refuses(folder: Path):
    try:
        src = open_model(folder)
    except ModelFormatError as e:
        assert str(folder) in str(e)
        return e
    for t in src.tensors.values():
        np.asarray(t.data, np.float32).sum()
    return None


header_edit = st.tuples(
    st.integers(0, 10**6),  # which tensor
    st.sampled_from(["dtype", "shape", "data_offsets", "shape_item", "offset_item", "drop", "entry"]),
    json_value,
)


def _apply_header_edit(header: dict, edit):
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    which, field, value = edit
    if not names:
        return header
    name = names[which % len(names)]
    entry = header[name]
    try:
        _edit_entry(header, name, entry, which, field, value)
    except (TypeError, KeyError, IndexError, AttributeError):
        pass  # an earlier edit already broke this entry's structure: leave it
    return header


def _edit_entry(header, name, entry, which, field, value):
    if field in ("dtype", "shape", "data_offsets"):
        entry[field] = value
    elif field == "shape_item" and entry["shape"]:
        entry["shape"][which % len(entry["shape"])] = value
    elif field == "offset_item":
        entry["data_offsets"][which % 2] = value
    elif field == "drop":
        entry.pop(["dtype", "shape", "data_offsets"][which % 3])
    else:
        header[name] = value


@settings(FUZZ, max_examples=150)
@given(edit=header_edit, cut=st.integers(0, 64))
def test_lying_safetensors_header(base_folder, workdir, edit, cut):
    _, header, data, config = base_folder
    _write(workdir, _apply_header_edit(header, edit), data[:len(data) - cut] if cut % 8 == 1 else data, config)
    _opens_or_refuses(workdir)


@settings(FUZZ, max_examples=80)
@given(pos=st.integers(0, 10**6), xor=st.integers(1, 255), length_lie=st.sampled_from([None] + HUGE[:8]))
def test_flipped_or_truncated_safetensors(base_folder, workdir, pos, xor, length_lie):
    _, header, data, config = base_folder
    hb = bytearray(json.dumps(header).encode())
    hb[pos % len(hb)] ^= xor
    raw = struct.pack("<Q", len(hb) if length_lie is None else length_lie % 2**64) + bytes(hb) + data
    (workdir / "model.safetensors").write_bytes(raw[: len(raw) - (pos % 97 if xor % 3 == 0 else 0)])
    (workdir / "config.json").write_text(json.dumps(config))
    _opens_or_refuses(workdir)


@settings(FUZZ, max_examples=80)
@given(key=st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters",
                            "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "model_type",
                            "eos_token_id", "bos_token_id", "architectures", "attention_bias"]),
       value=json_value)
def test_lying_config_json(base_folder, workdir, key, value):
    _, header, data, config = base_folder
    _write(workdir, header, data, {**config, key: value})
    _opens_or_refuses(workdir)


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(edits=st.lists(header_edit, min_size=1, max_size=3), key=st.text(max_size=30), value=json_value)
def test_lying_safetensors_many(base_folder, workdir, edits, key, value):
    _, header, data, config = base_folder
    for e in edits:
        header = _apply_header_edit(header, e)
    _write(workdir, header, data, {**config, key: value} if key else config)
    _opens_or_refuses(workdir)


def test_what_only_the_library_refuses_names_the_file(base_folder, workdir):
    _, header, data, config = base_folder
    _write(workdir, {**header, "__metadata__": {"format": 1}}, data, config)  # metadata values must be strings
    with pytest.raises(DamagedFileError, match="safetensors library") as e:
        open_model(workdir)
    assert e.value.path == str(workdir / "model.safetensors")


def test_header_checks_are_named(tmp_path):
    path = tmp_path / "x.safetensors"
    good = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)

    def write(header, data=good.tobytes(), n=None):
        hb = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)

    entry = {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    write({"w": entry})
    header, start = read_safetensors_header(path)
    assert header["w"] == entry and start == 8 + len(json.dumps({"w": entry}))
    cases = [
        ({"w": {**entry, "shape": [3, 5]}}, None, DamagedFileError, "needs 60 bytes"),
        ({"w": {**entry, "shape": [2**40, 2**40]}}, None, DamagedFileError, "needs"),
        ({"w": {**entry, "data_offsets": [0, 4800]}}, None, DamagedFileError, "outside"),
        ({"w": {**entry, "dtype": "I64", "shape": [3, 2]}}, None, UnsupportedQuantError, "I64"),
        ({"w": {**entry, "dtype": "F33"}}, None, DamagedFileError, "unknown dtype"),
        ({"w": {**entry, "shape": [3, -4]}}, None, DamagedFileError, "bad shape"),
        ({"w": entry}, 2**63, DamagedFileError, "header length"),
        ({"w": entry, "v": {**entry, "data_offsets": [16, 64], "shape": [3, 4]}}, None, DamagedFileError, "outside"),
        # the safetensors library needs every data byte to belong to a tensor
        ({"w": {**entry, "shape": [2, 4], "data_offsets": [16, 48]}}, None, DamagedFileError, "16 data bytes before"),
        ({"w": {**entry, "shape": [2, 4], "data_offsets": [0, 32]}}, None, DamagedFileError, "16 data bytes after"),
    ]
    for header, n, err, msg in cases:
        write(header, n=n)
        with pytest.raises(err, match=msg) as e:
            read_safetensors_header(path)
        assert e.value.path == str(path)
    two = {"a": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
           "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}}
    write(two)
    with pytest.raises(DamagedFileError, match="overlap"):
        read_safetensors_header(path)
    hb = b"[" * 100000 + b"]" * 100000  # deep nesting: RecursionError inside json must not escape
    path.write_bytes(struct.pack("<Q", len(hb)) + hb)
    with pytest.raises(DamagedFileError, match="JSON"):
        read_safetensors_header(path)
