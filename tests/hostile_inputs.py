"""Building blocks for hostile model files: a raw GGUF writer (any value type, any count, no checks) and a
reader that turns a valid GGUF into its editable parts.

    kvs, tensors = gguf_parts(path)         # [(key, vtype, value)], [(name, ggml dims, type id, data bytes)]
    write_gguf(out, kvs, tensors)           # the same file again, or whatever the edits made of it
"""
from __future__ import annotations

import struct
from pathlib import Path

SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def _string(value) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: int, value) -> bytes:
    """Bytes of one GGUF value; an ARRAY value is (element type, items)."""
    if vtype in SCALAR_FMT:
        return struct.pack("<" + SCALAR_FMT[vtype], value)
    if vtype == STRING:
        return _string(value)
    itype, items = value
    head = struct.pack("<IQ", itype, len(items))
    if itype in SCALAR_FMT:
        return head + struct.pack(f"<{len(items)}{SCALAR_FMT[itype]}", *items)
    if itype == STRING:
        return head + b"".join(_string(x) for x in items)
    return head + b"".join(encode_value(itype, x) for x in items)


def write_gguf(path, kvs, tensors, alignment: int = 32, version: int = 3) -> Path:
    """kvs: [(key, vtype, value)]; tensors: [(name, dims in ggml order, ggml type id, data bytes)]."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kvs))]
    for key, vtype, value in kvs:
        out += [_string(key), struct.pack("<I", vtype), encode_value(vtype, value)]
    offset, blobs = 0, []
    for name, dims, type_id, data in tensors:
        pad = -offset % alignment
        blobs.append(b"\0" * pad + data)
        offset += pad
        out += [_string(name), struct.pack(f"<I{len(dims)}Q", len(dims), *dims), struct.pack("<IQ", type_id, offset)]
        offset += len(data)
    header = b"".join(out)
    path = Path(path)
    path.write_bytes(header + b"\0" * (-len(header) % alignment) + b"".join(blobs))
    return path


def gguf_parts(path):
    """(kvs, tensors) of a valid GGUF file, for write_gguf."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    kvs = []
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        vtype = int(field.types[0])
        value = field.contents()
        if vtype == ARRAY:
            value = (int(field.types[-1]), value)
        kvs.append((name, vtype, value))
    tensors = [(t.name, [int(d) for d in t.shape], int(t.tensor_type), bytes(t.data.reshape(-1).view("uint8")))
               for t in reader.tensors]
    return kvs, tensors


def set_kv(kvs, key, vtype, value):
    """kvs with `key` set (replaced in place, or appended)."""
    out = [kv for kv in kvs if kv[0] != key]
    out.append((key, vtype, value))
    return out


def varint(n: int) -> bytes:
    """A protobuf varint (n >= 0; any size: past 10 bytes it is malformed on purpose)."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def proto_field(num: int, wire: int, payload) -> bytes:
    """One protobuf field: payload is an int for wire 0, bytes otherwise (length-prefixed for wire 2)."""
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def spm_piece(piece, score: float = 0.0, kind: int = 1) -> bytes:
    """A SentencePiece ModelProto.pieces entry (field 1): piece text (str, or bytes as they are), score, type."""
    raw = piece if isinstance(piece, bytes) else piece.encode("utf-8", "surrogatepass")
    return proto_field(1, 2, proto_field(1, 2, raw) + proto_field(2, 5, struct.pack("<f", score))
                       + proto_field(3, 0, kind))


def spm_model_bytes(pieces) -> bytes:
    """A SentencePiece ModelProto holding `pieces` [(piece, score, type)], as tokenizer.model stores it."""
    body = []
    for piece, score, kind in pieces:
        raw = piece.encode()
        if len(raw) < 100 and kind < 128:  # the common case, without the general encoder's calls
            msg = b"\x0a" + bytes([len(raw)]) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + bytes([kind])
            body.append(b"\x0a" + bytes([len(msg)]) + msg)
            continue
        body.append(spm_piece(raw, score, kind))
    return b"".join(body)
