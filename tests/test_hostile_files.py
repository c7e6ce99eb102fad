"""Hostile files, special files and hostile sizes: each is refused with a ModelFormatError naming the path (and the
tensor or key), in bounded time and memory -- run in a separate worker process (tests/hostile_worker.py) that is
killed past its time or memory bound, so a regression fails the test instead of hanging or swapping the run."""
from __future__ import annotations

import json
import os
import shutil
import struct
import time

import numpy as np
import pytest

from hostile_inputs import gguf_parts, set_kv, spm_model_bytes, write_gguf
from hostile_worker import Worker, problem
from realizar_jax.errors import DamagedFileError, ModelFormatError, TokenizerError
from realizar_jax.formats import open_model

GiB = 1024**3


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=15, max_rss=2 * GiB)
    yield w
    w.close()


@pytest.fixture
def hf(model_files, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(model_files.hf("llama"), dst)
    return dst


def _refused(worker, op, path, *needles, seconds=10.0, rss=1 * GiB):
    result = worker.run(op, path)
    assert problem(result) is None, problem(result)
    assert result["status"] == "error", f"{path} was accepted"
    for needle in needles:
        assert str(needle) in result["message"], result["message"]
    assert result["seconds"] < seconds and result["peak_rss"] < rss, result
    return result


# ---------------------------------------------------------------- special files: FIFO, device, loops, folders
def _make_special(path, kind, tmp_path):
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "loop":
        other = tmp_path / f"loop-{path.name}"
        other.unlink(missing_ok=True)
        path.symlink_to(other)
        other.symlink_to(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")


SPECIAL_KINDS = ["fifo", "dev_zero", "loop", "folder"]
HF_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors",
            "chat_template.jinja"]
KIND_WORDS = {"fifo": "FIFO", "dev_zero": "character device", "loop": "symlink loop", "folder": "folder",
              "dangling": "not found"}


@pytest.mark.parametrize("kind", SPECIAL_KINDS + ["dangling"])
@pytest.mark.parametrize("name", HF_FILES)
def test_special_file_in_hf_folder(worker, hf, tmp_path, name, kind):
    if name == "chat_template.jinja":  # read only when tokenizer_config.json has no template
        cfg = json.loads((hf / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    _make_special(hf / name, kind, tmp_path)
    _refused(worker, "open", hf, hf / name, KIND_WORDS[kind])


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_special_file_as_model_path(worker, tmp_path, kind):
    path = tmp_path / "model.gguf"
    _make_special(path, kind, tmp_path)
    if kind == "folder":  # an empty folder is an HF folder without config.json
        _refused(worker, "open", path, path / "config.json", "not found")
    else:
        _refused(worker, "open", path, path, KIND_WORDS[kind])
    _refused(worker, "inspect", path, path)


def test_special_shard_named_by_index(worker, hf, tmp_path):
    names = list(open_model_names(hf))
    (hf / "model.safetensors").rename(hf / "model-00001-of-00001.safetensors")
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    assert worker.run("open", hf)["status"] == "ok"
    _make_special(hf / "model.safetensors.index.json", "fifo", tmp_path)
    _refused(worker, "open", hf, "model.safetensors.index.json", "FIFO")
    (hf / "model.safetensors.index.json").unlink()
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))
    _make_special(hf / "model-00001-of-00001.safetensors", "dev_zero", tmp_path)
    _refused(worker, "open", hf, "model-00001-of-00001.safetensors", "character device")


def open_model_names(folder):
    from realizar_jax.formats.hf_dir import read_safetensors_header
    return read_safetensors_header(folder / "model.safetensors")[0].keys()


def test_symlinks_to_regular_files_outside_the_folder_are_followed(worker, hf, tmp_path, model_files):
    """The Hugging Face cache is laid out this way (snapshots/REV/config.json -> ../../blobs/HASH): a symlink to a
    regular file is read wherever it points, within the same size bounds as any file."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.move(hf / name, blobs / name)
        (hf / name).symlink_to(os.path.relpath(blobs / name, hf))
    assert worker.run("open", hf)["status"] == "ok"
    link = tmp_path / "link.gguf"
    link.symlink_to(model_files.gguf("llama", "q8_0"))
    assert worker.run("open", link)["status"] == "ok"


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
def test_huge_sparse_json_is_refused_by_size(worker, hf, name):
    if name == "chat_template.jinja":
        cfg = json.loads((hf / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    with open(hf / name, "ab") as f:
        f.truncate(3 * GiB)  # sparse: costs no disk, but reading it would cost 3 GiB
    _refused(worker, "open", hf, hf / name, "bytes, more than", seconds=5, rss=600 * 1024**2)


# ---------------------------------------------------------------- GGUF: counts the file can hold but no model uses
@pytest.fixture(scope="module")
def gguf_base(model_files):
    path = model_files.gguf("llama", "q8_0")
    return gguf_parts(path)


def test_gguf_round_trip_of_the_raw_writer(gguf_base, tmp_path):
    kvs, tensors = gguf_base
    src = open_model(write_gguf(tmp_path / "same.gguf", kvs, tensors))
    assert src.config.num_layers == 2


def test_gguf_two_million_strings_in_an_array(worker, gguf_base, tmp_path):
    """30 MB of empty strings under a key no model reads: parsed in bounded time and memory (gguf-py's reader
    took 58 s and 3.3 GB), and the file opens."""
    kvs, tensors = gguf_base
    path = write_gguf(tmp_path / "strings.gguf", set_kv(kvs, "junk.strings", 9, (8, [""] * 2_000_000)), tensors)
    result = worker.run("open", path)
    assert result["status"] == "ok", result
    assert result["seconds"] < 10 and result["peak_rss"] < 1 * GiB, result


def test_gguf_300k_tensors(worker, gguf_base, tmp_path):
    kvs, tensors = gguf_base
    extra = [(f"junk.{i}", [1], 0, b"\0\0\0\0") for i in range(300_000)]
    path = write_gguf(tmp_path / "tensors.gguf", kvs, tensors + extra)
    _refused(worker, "open", path, path, "300", seconds=10, rss=1 * GiB)


def test_gguf_token_list_longer_than_the_embedding(worker, gguf_base, tmp_path):
    """Two million tokens beside a 701-row embedding: refused before any tokenizer is built."""
    kvs, tensors = gguf_base
    n = 2_000_000
    kvs = set_kv(kvs, "tokenizer.ggml.tokens", 9, (8, [f"t{i}" for i in range(n)]))
    kvs = set_kv(kvs, "tokenizer.ggml.token_type", 9, (5, [1] * n))
    path = write_gguf(tmp_path / "vocab.gguf", kvs, tensors)
    _refused(worker, "open", path, path, "2000000 tokens", seconds=10, rss=1 * GiB)


def _tensor_offset_fields(path):
    """(offset of the 'offset' field, tensor name) for each tensor info of a GGUF written by write_gguf."""
    from test_fuzz_gguf import header_fields
    buf = path.read_bytes()
    fields, _ = header_fields(buf)
    return [pos for pos, size, what in fields if what == "offset"], buf


def test_gguf_overlapping_tensor_data(gguf_base, tmp_path):
    kvs, tensors = gguf_base
    norms = [i for i, t in enumerate(tensors) if t[0].endswith("norm.weight")]
    # two tensors of the same size, the second pointed at the first one's data
    a, b = norms[0], norms[1]
    path = write_gguf(tmp_path / "ok.gguf", kvs, tensors)
    positions, buf = _tensor_offset_fields(path)
    buf = bytearray(buf)
    buf[positions[b]:positions[b] + 8] = buf[positions[a]:positions[a] + 8]
    path.write_bytes(bytes(buf))
    with pytest.raises(DamagedFileError, match="overlap") as info:
        open_model(path)
    assert info.value.tensor in (tensors[a][0], tensors[b][0]) and info.value.path == str(path)
    assert tensors[a][0] in str(info.value) and tensors[b][0] in str(info.value)


def test_gguf_tensor_data_past_the_end(gguf_base, tmp_path):
    kvs, tensors = gguf_base
    path = write_gguf(tmp_path / "ok.gguf", kvs, tensors)
    positions, buf = _tensor_offset_fields(path)
    buf = bytearray(buf)
    buf[positions[-1]:positions[-1] + 8] = struct.pack("<Q", -(-len(buf) // 32) * 32)
    path.write_bytes(bytes(buf))
    with pytest.raises(DamagedFileError, match="runs past the end") as info:
        open_model(path)
    assert info.value.tensor == tensors[-1][0]


def test_safetensors_overlapping_and_outside_data(hf):
    from safetensors.numpy import load_file
    st = hf / "model.safetensors"
    n = struct.unpack("<Q", st.read_bytes()[:8])[0]
    header = json.loads(st.read_bytes()[8:8 + n])
    data = st.read_bytes()[8 + n:]
    names = [k for k in header if k != "__metadata__" and k.endswith("norm.weight")]
    a, b = header[names[0]], header[names[1]]
    for which, message in (("overlap", "overlap"), ("outside", "outside")):
        saved = json.loads(json.dumps(header))
        if which == "overlap":
            b["data_offsets"] = list(a["data_offsets"])
        else:
            b["data_offsets"] = [len(data) - 4, len(data) - 4 + b["data_offsets"][1] - b["data_offsets"][0]]
        raw = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        with pytest.raises(DamagedFileError, match=message) as info:
            open_model(hf)
        assert info.value.tensor in names and info.value.path == str(st)
        header.clear()
        header.update(saved)
        a, b = header[names[0]], header[names[1]]
    assert load_file  # noqa


# ---------------------------------------------------------------- declared sizes are checked before allocating
@pytest.mark.parametrize("field,value", [("tensor_count", 2**62), ("kv_count", 2**40), ("strlen", 2**60),
                                         ("array_count", 2**61), ("dim", 2**40)])
def test_gguf_declared_huge_counts_allocate_nothing(worker, model_files, tmp_path, field, value):
    from test_fuzz_gguf import header_fields
    buf = bytearray(model_files.gguf("llama", "q8_0").read_bytes())
    pos = next(p for p, size, what in header_fields(bytes(buf))[0] if what == field)
    buf[pos:pos + 8] = struct.pack("<Q", value)
    path = tmp_path / "lying.gguf"
    path.write_bytes(bytes(buf))
    for op in ("open", "load"):
        result = _refused(worker, op, path, path, rss=2 * GiB)
        if op == "open":
            assert result["peak_rss"] < 400 * 1024**2, result


def test_safetensors_declared_huge_header_allocates_nothing(worker, hf):
    st = hf / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[:8] = struct.pack("<Q", 2**40)
    st.write_bytes(bytes(raw))
    result = _refused(worker, "open", hf, st, "header length")
    assert result["peak_rss"] < 400 * 1024**2, result


# ---------------------------------------------------------------- tokenizer sizes
def _spm_metadata(tokens):
    n = len(tokens)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [-1.0] * n,
            "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (n - 3)}


@pytest.mark.parametrize("length", [1_000_000, 100_000_000])
def test_huge_sentencepiece_token(length):
    from realizar_jax.text.tokenizer import Tokenizer
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "a" * length]
    start = time.monotonic()
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.tokens\[6\] is \d+ characters long"):
        Tokenizer.from_gguf_metadata(_spm_metadata(tokens), path="x.gguf")
    assert time.monotonic() - start < 5


def test_huge_piece_in_tokenizer_model(hf):
    from realizar_jax.text.tokenizer import Tokenizer
    (hf / "tokenizer.json").unlink()
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("a", -1.0, 1), ("b", -2.0, 1),
              ("ab", -3.0, 1), ("a" * 1_000_000, -4.0, 1)]
    (hf / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    start = time.monotonic()
    with pytest.raises(TokenizerError, match="tokenizer.model") as info:
        Tokenizer.from_hf_dir(hf)
    assert "characters long" in str(info.value)
    assert time.monotonic() - start < 5


def test_millions_of_pieces_in_tokenizer_model(worker, hf):
    """A 12 MB tokenizer.model of 1M pieces beside a 701-row embedding: the pieces past the vocabulary are
    dropped with a warning, as llama.cpp's converter does, all in bounded time and memory."""
    (hf / "tokenizer.json").unlink()
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"p{i}", -1.0, 1) for i in range(1_000_000)]
    (hf / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    result = worker.run("open", hf)
    assert result["status"] == "ok", result
    assert result["seconds"] < 10 and result["peak_rss"] < 1 * GiB, result


def test_tokenizer_errors_are_model_format_errors_with_the_path(gguf_base, tmp_path):
    kvs, tensors = gguf_base
    path = write_gguf(tmp_path / "t.gguf", set_kv(kvs, "tokenizer.ggml.model", 8, "klingon"), tensors)
    from realizar_jax.text.tokenizer import load_tokenizer
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(open_model(path))
    assert isinstance(info.value, ModelFormatError) and info.value.path == str(path)


def test_a_long_architecture_name_is_not_echoed_whole(gguf_base, tmp_path):
    """Found by the slow fuzz: a 3,000-character general.architecture made a 3 kB error line."""
    from realizar_jax.errors import UnknownArchitectureError
    kvs, tensors = gguf_base
    path = write_gguf(tmp_path / "arch.gguf", set_kv(kvs, "general.architecture", 8, "a" * 3000), tensors)
    with pytest.raises(UnknownArchitectureError) as info:
        open_model(path)
    assert str(info.value).startswith(str(path)) and len(str(info.value)) < len(str(path)) + 200


def test_load_names_a_symlink_loop_or_a_dangling_link(tmp_path):
    """load() itself (not only the CLI): a looping or dangling model path says so instead of 'no such file'."""
    import realizar_jax as rj
    from realizar_jax.errors import DamagedFileError
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(DamagedFileError, match="symlink loop"):
        rj.load(a)
    dangling = tmp_path / "gone.gguf"
    dangling.symlink_to(tmp_path / "nowhere.gguf")
    with pytest.raises(FileNotFoundError, match="symlink to .*nowhere.gguf.*not found"):
        rj.load(dangling)
