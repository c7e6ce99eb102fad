"""Damaged GGUF files: whatever hypothesis does to a valid file, open_model raises a ModelFormatError
subclass (or, if the damage is harmless, returns a usable source) -- never another exception, never
a hang (hypothesis deadline), never a huge allocation."""
from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import make_gguf, make_hf_model
from realizar_jax.errors import ModelFormatError, UnknownArchitectureError, UnsupportedQuantError
from realizar_jax.formats import open_model

SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
FUZZ = settings(deadline=3000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=False, database=None)


def header_fields(buf: bytes):
    """(offset, size, what) of every count/length/type/dim/offset field of a GGUF header, and its end.

    Used on already-fuzzed files too, so every loop is bounded by the buffer length."""
    fields = [(8, 8, "tensor_count"), (16, 8, "kv_count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    if n_tensors > len(buf) or n_kv > len(buf):
        raise ValueError("counts beyond the buffer")
    pos = 24

    def value(vtype, pos, depth=0):
        if vtype in SCALAR:
            fields.append((pos, SCALAR[vtype], "scalar"))
            return pos + SCALAR[vtype]
        if vtype == 8:
            fields.append((pos, 8, "strlen"))
            return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
        if vtype != 9 or depth > 3:
            raise ValueError("bad type")
        itype, count = struct.unpack_from("<IQ", buf, pos)
        fields.extend([(pos, 4, "array_type"), (pos + 4, 8, "array_count")])
        pos += 12
        if count > len(buf):
            raise ValueError("array beyond the buffer")
        if itype in SCALAR:
            return pos + count * SCALAR[itype]
        for i in range(count):
            if i < 3 or itype != 8:  # only the first few strings of long arrays are fuzz targets
                pos = value(itype, pos, depth + 1)
            else:
                pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            if pos > len(buf):
                raise ValueError("past the end")
        return pos

    for _ in range(n_kv):
        fields.append((pos, 8, "keylen"))
        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        fields.append((pos, 4, "value_type"))
        pos = value(struct.unpack_from("<I", buf, pos)[0], pos + 4)
    for _ in range(n_tensors):
        fields.append((pos, 8, "namelen"))
        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        if n_dims > 8:
            raise ValueError("n_dims")
        fields.append((pos, 4, "n_dims"))
        pos += 4
        fields.extend((pos + 8 * i, 8, "dim") for i in range(n_dims))
        pos += 8 * n_dims
        fields.extend([(pos, 4, "ggml_type"), (pos + 4, 8, "offset")])
        pos += 12
    return fields, pos


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-gguf")
    hf = make_hf_model(d, "llama", hidden=64, intermediate=128, layers=1, kv_heads=2)
    path = make_gguf(hf, d / "base.gguf", "q8_0")
    buf = path.read_bytes()
    fields, header_end = header_fields(buf)
    assert open_model(path).config.num_layers == 1
    return buf, fields, header_end


def check_opens_or_refuses(data: bytes, workdir: Path):
    path = workdir / "fuzzed.gguf"
    path.write_bytes(data)
    try:
        source = open_model(path)
    except ModelFormatError as e:
        assert str(path) in str(e)  # every error names the file
        return e
    # harmless damage: the source must be fully usable
    for t in source.tensors.values():
        np.asarray(t.data).view(np.uint8).sum()
    from realizar_jax.cli.inspect import describe
    describe(source)
    return None


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# A position as a fraction of a range. Hypothesis favours small integers and 0.0/1.0 floats, which
# would pile every flip onto the magic; scattering through a multiplicative hash spreads them.
fraction = st.integers(0, 10**6).map(lambda i: (i * 2654435761) % 1000003 / 1000003)
mutation = st.one_of(
    st.tuples(st.just("truncate"), fraction),
    st.tuples(st.just("flip"), st.lists(st.tuples(fraction, st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("field"), fraction,
              st.one_of(st.tuples(st.just("set"), st.sampled_from(INTERESTING) | st.integers(0, 2**64 - 1)),
                        st.tuples(st.just("add"), st.integers(-8, 8)))),
)


def apply(m, buf: bytes, fields, header_end) -> bytes:
    kind = m[0]
    if kind == "truncate":
        return buf[: int(m[1] * len(buf))]
    if kind == "flip":
        out = bytearray(buf)
        for where, xor in m[1]:
            # mostly the header, where lies matter; sometimes the data
            i = int(where * header_end) if xor % 4 else int(where * (len(buf) - 1))
            out[min(i, len(out) - 1)] ^= xor
        return bytes(out)
    offset, size, what = fields[int(m[1] * (len(fields) - 1))]
    how, v = m[2]
    value = (v if how == "set" else int.from_bytes(buf[offset:offset + size], "little") + v) % 2 ** (8 * size)
    return buf[:offset] + value.to_bytes(size, "little") + buf[offset + size:]


@settings(FUZZ, max_examples=250)
@given(m=mutation)
def test_damaged_gguf_raises_only_model_format_errors(base_gguf, workdir, m):
    buf, fields, header_end = base_gguf
    check_opens_or_refuses(apply(m, buf, fields, header_end), workdir)


@pytest.mark.slow
@settings(FUZZ, max_examples=4000)
@given(ms=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_gguf_many(base_gguf, workdir, ms):
    buf, fields, header_end = base_gguf
    for m in ms:
        if len(buf) < 24:
            break
        try:
            fields, header_end = header_fields(buf)
        except (struct.error, IndexError, ValueError, OverflowError, MemoryError, RecursionError):
            fields = fields[:2]
        buf = apply(m, buf, fields, header_end)
    check_opens_or_refuses(buf, workdir)


@settings(FUZZ, max_examples=60)
@given(data=st.binary(max_size=200))
def test_random_bytes_after_magic(workdir, data):
    e = check_opens_or_refuses(b"GGUF" + data, workdir)
    assert e is not None


def _set_field(buf, fields, what, nth, value):
    offset, size, _ = [f for f in fields if f[2] == what][nth]
    return buf[:offset] + value.to_bytes(size, "little") + buf[offset + size:]


@pytest.mark.parametrize("what,value,message", [
    ("tensor_count", 2**40, "more than"),
    ("kv_count", 2**63, "more than"),
    ("array_count", 2**60, "needs"),
    ("strlen", 2**62, "needs"),
    ("n_dims", 9, "dimensions"),
    ("dim", 2**62, "past the end"),
    ("dim", 0, "size 0"),
    ("offset", 2**50, "past the end"),
    ("offset", 3, "alignment"),
])
def test_specific_lies_are_named(base_gguf, workdir, what, value, message):
    buf, fields, _ = base_gguf
    e = check_opens_or_refuses(_set_field(buf, fields, what, 0, value), workdir)
    assert e is not None and message in str(e), str(e)


def test_bad_magic_and_version(base_gguf, workdir):
    buf, _, _ = base_gguf
    assert "not a GGUF file" in str(check_opens_or_refuses(b"GGML" + buf[4:], workdir))
    assert "version 7" in str(check_opens_or_refuses(buf[:4] + struct.pack("<I", 7) + buf[8:], workdir))
    assert "big-endian" in str(check_opens_or_refuses(buf[:4] + struct.pack(">I", 3) + buf[8:], workdir))
    assert "too short" in str(check_opens_or_refuses(buf[:10], workdir))


def test_unknown_qtype_id(base_gguf, workdir):
    buf, fields, _ = base_gguf
    e = check_opens_or_refuses(_set_field(buf, fields, "ggml_type", 0, 1000), workdir)
    assert isinstance(e, UnsupportedQuantError) and "1000" in str(e)


def _tiny_gguf(path, arch, tensors):
    import gguf
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(1)
    for name, data, raw_dtype in tensors:
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_qtype_names_the_tensor(tmp_path):
    import gguf
    blocks = np.random.default_rng(0).integers(0, 256, (4, 66), dtype=np.uint8)  # IQ2_XXS: 66 bytes / 256 values
    path = _tiny_gguf(tmp_path / "iq2.gguf", "llama", [("token_embd.weight", blocks, gguf.GGMLQuantizationType.IQ2_XXS)])
    with pytest.raises(UnsupportedQuantError, match="IQ2_XXS") as e:
        open_model(path)
    assert e.value.tensor == "token_embd.weight" and e.value.path == str(path)


def test_unknown_architecture(tmp_path):
    emb = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    path = _tiny_gguf(tmp_path / "x.gguf", "mamba", [("token_embd.weight", emb, None)])
    with pytest.raises(UnknownArchitectureError, match="mamba"):
        open_model(path)
