"""Hypothesis fuzzing of the metadata around the tensors, through `realizar_jax.load()` and `realizar-jax inspect`
(not only open_model): config.json, tokenizer.json, tokenizer_config.json, generation_config.json, the shard
index and GGUF metadata values get hostile types, ranges, NaN/inf, huge and tiny numbers, unicode, deleted and
added keys; a SentencePiece folder's tokenizer.model (damaged bytes, hostile pieces), added_tokens.json and
chat_template.jinja (hostile Jinja, bad UTF-8, sizes) are mutated too, and every chat template a model loads with
renders a conversation. Every case runs in tests/hostile_worker.py's worker process, killed past 10 s or 2 GB
resident (and under a 6 GB address-space limit). The promise: a model, or a RealizarError naming the file (for
rendering a template: a ChatTemplateError) -- 0 other exceptions, 0 CLI tracebacks, 0 hangs, 0 memory blow-ups.

The default suite runs a few hundred cases; `pytest -m slow` runs >= 10,000 (FUZZ_SLOW_CASES per test, 5 tests).
Set FUZZ_COUNTS_DIR to get each test's outcome counts as JSON there.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_inputs import ARRAY, SCALAR_FMT, STRING, gguf_parts, proto_field, spm_piece, varint, write_gguf
from hostile_worker import Worker, problem

FAST_CASES = int(os.environ.get("FUZZ_FAST_CASES", 75))  # per test; 4 tests
SLOW_CASES = int(os.environ.get("FUZZ_SLOW_CASES", 2500))
GiB = 1024**3

# ---------------------------------------------------------------- hostile JSON values
_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 5e-324, 1e-300, 1e308, -1.0, 0.5, 1e-5, 1e30])
_ints = (st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2, 3, 7, 2**24, 2**24 + 1, 2**31, 2**32 + 1, 2**63,
                                                      2**64, 10**30, 10**400]))
_texts = st.text(max_size=12) | st.sampled_from(["", "llama", "qwen2", "LlamaForCausalLM", "linear", "llama3",
                                                 "<s>", "</s>", "<|begin_of_text|>", "\ud800", "\x00", "é" * 40,
                                                 "{{ 10 ** 10 }}", "a" * 5000])
scalars = st.none() | st.booleans() | _ints | _floats | _texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(_texts, inner, max_size=3), max_leaves=8)

HF_KEYS = {
    "config.json": ["architectures", "model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
                    "num_hidden_layers", "intermediate_size", "head_dim", "max_position_embeddings", "vocab_size",
                    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id",
                    "tie_word_embeddings", "attention_bias", "text_config", "torch_dtype"],
    "tokenizer_config.json": ["bos_token", "eos_token", "add_bos_token", "add_eos_token", "chat_template",
                              "added_tokens_decoder", "model_max_length", "tokenizer_class", "unk_token"],
    "generation_config.json": ["bos_token_id", "eos_token_id", "pad_token_id", "max_length", "temperature"],
    "tokenizer.json": ["added_tokens", "model", "model.vocab", "model.merges", "model.type", "post_processor",
                       "decoder", "pre_tokenizer", "normalizer", "truncation", "padding", "version"],
    "model.safetensors.index.json": ["weight_map", "metadata"],
}
rope = st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "llama3", "default", "yarn"]) | scalars},
                             optional={k: scalars for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                            "original_max_position_embeddings", "rope_theta")})


@st.composite
def hf_edit(draw, files):
    """(file, list of edits): an edit is ('set', dotted key, value), ('del', key), ('whole', value) or ('raw', bytes)."""
    file = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["keys"] * 6 + ["whole", "raw"]))
    if kind == "whole":
        return file, [("whole", draw(json_values))]
    if kind == "raw":
        return file, [("raw", draw(st.binary(max_size=64) | st.sampled_from(
            [b"\xff\xfe{}", b'{"a": ' * 2000, b"{" * 100000, b"[1, 2", b'{"x": 1e999999}', b"\x00" * 10])))]
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(HF_KEYS[file]) | _texts)
        if draw(st.integers(0, 4)) == 0:
            edits.append(("del", key))
        else:
            value = draw(rope if key in ("rope_scaling", "rope_parameters") and draw(st.booleans()) else json_values)
            edits.append(("set", key, value))
    return file, edits


def _apply_json(original: bytes, edits) -> bytes:
    try:
        value = json.loads(original)
    except (ValueError, RecursionError):  # an earlier edit of this case wrote raw bytes
        value = {}
    for edit in edits:
        if edit[0] == "raw":
            return edit[1]
        if edit[0] == "whole":
            value = edit[1]
            continue
        if not isinstance(value, dict):
            value = {}
        *parents, last = edit[1].split(".") if edit[1].startswith(("model.",)) else [edit[1]]
        node = value
        for p in parents:
            child = node.get(p)
            if not isinstance(child, dict):
                child = node[p] = {}
            node = child
        if edit[0] == "del":
            node.pop(last, None)
        else:
            node[last] = edit[2]
    return json.dumps(value).encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def worker():
    w = Worker(timeout=10, max_rss=2 * GiB)
    yield w
    w.close()


@pytest.fixture(scope="module")
def hf_base(model_files, tmp_path_factory):
    """The llama fixture folder, with a shard index added so that the index is fuzzed too."""
    from realizar_jax.formats.hf_dir import read_safetensors_header
    base = tmp_path_factory.mktemp("fuzz-load-hf") / "base"
    shutil.copytree(model_files.hf("llama"), base)
    names = list(read_safetensors_header(base / "model.safetensors")[0])
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {n: "model.safetensors" for n in names}}))
    return base


def _tally(name: str, counts: Counter):
    where = os.environ.get("FUZZ_COUNTS_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"{name}.json").write_text(json.dumps(dict(counts)))


def _check(worker, path, counts: Counter, problems: list, label):
    for op in ("load", "inspect"):
        result = worker.run(op, path)
        counts[f"{op}:{result['status']}"] += 1
        if "chat" in result:
            counts[f"chat:{result['chat']}"] += 1
        counts["max_seconds"] = max(counts["max_seconds"], round(result["seconds"], 2))
        counts["max_rss_mb"] = max(counts["max_rss_mb"], result["peak_rss"] >> 20)
        why = problem(result, path)
        if why:
            problems.append(f"{label} {op}: {why}")


def _hf_fuzz(worker, hf_base, tmp_path, files, cases, name):
    folder = tmp_path / "m"
    shutil.copytree(hf_base, folder)
    originals = {f: (hf_base / f).read_bytes() for f in HF_KEYS}
    counts, problems = Counter(cases=0, max_seconds=0, max_rss_mb=0), []

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(hf_edit(files), min_size=1, max_size=2))
    def case(changes):
        for f, data in originals.items():
            (folder / f).write_bytes(data)
        for f, edits in changes:
            (folder / f).write_bytes(_apply_json((folder / f).read_bytes(), edits))
        counts["cases"] += 1
        found = []  # this case's problems only, so that hypothesis shrinks to the case that has them
        _check(worker, folder, counts, found, repr(changes)[:300])
        problems.extend(found)
        assert not found, found[0]

    try:
        case()
    finally:
        _tally(name, counts)
    assert counts["cases"] >= min(cases, 1)


CONFIG_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


def test_fuzz_hf_config_through_load_and_cli(worker, hf_base, tmp_path):
    _hf_fuzz(worker, hf_base, tmp_path, CONFIG_FILES, FAST_CASES, "hf_config_fast")


def test_fuzz_hf_tokenizer_through_load_and_cli(worker, hf_base, tmp_path):
    _hf_fuzz(worker, hf_base, tmp_path, TOKENIZER_FILES, FAST_CASES, "hf_tokenizer_fast")


@pytest.mark.slow
def test_fuzz_hf_config_through_load_and_cli_slow(worker, hf_base, tmp_path):
    _hf_fuzz(worker, hf_base, tmp_path, CONFIG_FILES + TOKENIZER_FILES, SLOW_CASES, "hf_config_slow")


@pytest.mark.slow
def test_fuzz_hf_tokenizer_through_load_and_cli_slow(worker, hf_base, tmp_path):
    _hf_fuzz(worker, hf_base, tmp_path, TOKENIZER_FILES, SLOW_CASES, "hf_tokenizer_slow")


# ---------------------------------------------------------------- SentencePiece folder: the binary and text files
@pytest.fixture(scope="module")
def spm_base(model_files, tmp_path_factory):
    """The llama fixture with a trained SentencePiece tokenizer.model in place of tokenizer.json, an
    added_tokens.json, and its chat template in chat_template.jinja (read when tokenizer_config.json has none)."""
    from tokenizer_fixtures import make_spm_dir
    root = tmp_path_factory.mktemp("fuzz-load-spm")
    base, tok = root / "base", make_spm_dir(root / "tok", vocab_size=600)
    shutil.copytree(model_files.hf("llama"), base)
    (base / "tokenizer.json").unlink()
    shutil.copy(tok / "tokenizer.model", base / "tokenizer.model")
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (base / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "added_tokens.json").write_text(json.dumps({"<tool>": 600}))
    return base


# tokenizer.model: edits of the protobuf itself (bytes) and of its structure (hostile pieces, special names)
_piece_texts = (st.binary(max_size=12) | st.text(max_size=8).map(lambda t: t.encode("utf-8", "surrogatepass"))
                | st.sampled_from([b"", b"\xff\xfe", b"\xc3", b"\x00", b"<unk>", b"<s>", b"</s>", b"<0x41>", b"<0xZZ>",
                                   "\u2581".encode(), b"a" * 100_000, b"<|im_end|>"]))
_piece_types = st.integers(0, 8) | st.sampled_from([99, 2**31, 2**63, 2**64 - 1, 2**70])
_piece_scores = st.floats(width=32, allow_nan=True, allow_infinity=True)
_hostile_piece = st.builds(spm_piece, _piece_texts, _piece_scores, _piece_types) | st.sampled_from([
    proto_field(1, 0, 5),                                     # a piece as a varint
    proto_field(1, 2, proto_field(1, 0, 7)),                  # piece text as a varint
    proto_field(1, 2, b"\x0a\xff\xff\xff\xff\x0f"),            # piece text longer than the file
    proto_field(1, 2, proto_field(2, 5, b"\x00\x00")),         # a truncated float
    proto_field(1, 2, proto_field(3, 0, 2**80)),               # a varint past 10 bytes
    proto_field(1, 2, b"\x0f"),                                # wire type 7
    proto_field(2, 2, proto_field(46, 2, b"\xff") + proto_field(47, 2, b"a" * 5000)),  # trainer_spec names
    proto_field(2, 2, proto_field(45, 2, b"<s>") + proto_field(46, 2, b"<unk>")),
    proto_field(99, 2, b"x" * 1000), b"\x0a" + varint(2**40), b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"])


@st.composite
def spm_edit(draw):
    """('spm', [(what, where in 0..1, payload)]): bytes flipped, inserted, cut, or pieces inserted and dropped."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["flip", "insert", "cut", "piece", "piece", "drop", "whole"]))
        where = draw(st.floats(0, 1))
        payload = (draw(st.integers(1, 255)) if what == "flip" else draw(st.binary(min_size=1, max_size=16))
                   if what == "insert" else draw(st.lists(_hostile_piece, min_size=1, max_size=4)) if what == "piece"
                   else draw(st.binary(max_size=64)) if what == "whole" else None)
        edits.append((what, where, payload))
    return "tokenizer.model", [("spm", edits)]


def _apply_spm(data: bytes, edits) -> bytes:
    from realizar_jax.formats.gguf_tokenizer import _proto_fields
    for what, where, payload in edits:
        at = int(where * len(data))
        if what == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ payload]) + data[at + 1:]
        elif what == "insert":
            data = data[:at] + payload + data[at:]
        elif what == "cut":
            data = data[:at]
        elif what == "whole":
            data = payload
        elif what in ("piece", "drop"):  # at a field boundary, so that the rest of the file stays readable
            try:
                fields = [proto_field(f, w, v) for f, w, v in _proto_fields(data)]
            except (ValueError, IndexError):  # an earlier edit broke it: work on the bytes
                fields = [data]
            i = int(where * len(fields))
            fields = fields[:i] + ([b"".join(payload)] if what == "piece" else []) + fields[i + (what == "drop"):]
            data = b"".join(fields)
    return data


# chat_template.jinja: hostile Jinja put together from pieces, text, bad UTF-8, sizes
_JINJA_PIECES = [
    "{% for m in messages %}", "{% endfor %}", "{% if m.role == 'user' %}", "{% else %}", "{% endif %}",
    "{{ m['content'] }}", "{{ messages }}", "{{ bos_token }}", "{{ eos_token }}", "{% if add_generation_prompt %}",
    "{{ messages | tojson(indent=4) }}", "{{ messages | tojson(indent=10**9) }}", "{{ raise_exception('no') }}",
    "{% set ns = namespace(n=0) %}", "{% set ns.n = ns.n + 1 %}", "{{ ns.n }}", "{% set ns.s = 'ab' %}",
    "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "{{ 10 ** 10 ** 9 }}", "{{ 'x' * 10**10 }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "{{ lipsum(10**7) }}",
    "{{ range(10**9) | list }}", "{% macro r(n) %}{{ r(n) }}{% endmacro %}{{ r(1) }}", "{{ ''.__class__ }}",
    "{{ messages.append(1) }}", "{{ cycler(1, 2).next() }}", "{{ joiner(',')() }}", "{% include 'x' %}",
    "{% extends 'x' %}", "{% import 'x' as y %}", "{{ self }}", "{{ ('{0}' * 100000).format('x' * 1000) }}",
    "{{ (messages[0].content * 100) | wordwrap(1) }}", "{{ '%s' % (messages,) }}", "{% set a = [messages] * 10 %}",
    "{{ x.y.z }}", "{{ none | list }}", "{{ 1 / 0 }}", "{{ messages[10**20] }}", "{{ messages[::-1] }}",
    "{% filter upper %}", "{% endfilter %}", "{% raw %}", "{% endraw %}", "{#", "#}", "{%", "%}", "{{", "}}",
    "{%- ", " -%}", "\n", "text ", "é😀", "\x00", "{% break %}", "{% continue %}", "{{ loop.index }}"]
_templates = (st.lists(st.sampled_from(_JINJA_PIECES) | st.text(max_size=6), max_size=12).map("".join)
              .map(lambda t: t.encode("utf-8", "surrogatepass"))
              | st.binary(max_size=40)
              | st.sampled_from([b"\xff\xfe{{ messages }}", b"{{ 'a' }}" * 40000, b"x" * (5 * 2**20), b"",
                                 b"{% for %}" * 1000, b"{{ (((((((((((((((((((1))))))))))))))))))) }}",
                                 b"{% if 1 %}" * 2000 + b"{% endif %}" * 2000]))


@st.composite
def template_edit(draw):
    return "chat_template.jinja", [("raw", draw(_templates))]


@st.composite
def added_tokens_edit(draw):
    """added_tokens.json: token text -> id, ids and texts hostile, or the whole file replaced."""
    kind = draw(st.sampled_from(["keys"] * 4 + ["whole", "raw"]))
    if kind == "whole":
        return "added_tokens.json", [("whole", draw(json_values))]
    if kind == "raw":
        return "added_tokens.json", [("raw", draw(st.binary(max_size=32) | st.just(b'{"a": ' * 5000)))]
    ids = st.integers(-3, 800) | _ints | json_values
    return "added_tokens.json", [("set", draw(st.sampled_from(["<tool>", "<s>", "</s>", "<unk>", "a"]) | _texts),
                                  draw(ids)) for _ in range(draw(st.integers(1, 3)))]


SPM_STRATEGIES = {"tokenizer.model": spm_edit(), "added_tokens.json": added_tokens_edit(),
                  "chat_template.jinja": template_edit(), "tokenizer_config.json": hf_edit(["tokenizer_config.json"])}


def _spm_fuzz(worker, spm_base, tmp_path, cases, name):
    folder = tmp_path / "m"
    shutil.copytree(spm_base, folder)
    originals = {f.name: f.read_bytes() for f in spm_base.iterdir() if f.is_file()}
    counts, problems = Counter(cases=0, max_seconds=0, max_rss_mb=0), []

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(*SPM_STRATEGIES.values()), min_size=1, max_size=2))
    def case(changes):
        for f, data in originals.items():
            (folder / f).write_bytes(data)
        for f, edits in changes:
            data = (folder / f).read_bytes()
            if edits[0][0] == "spm":
                data = _apply_spm(data, edits[0][1])
            elif edits[0][0] == "raw":
                data = edits[0][1]
            else:
                data = _apply_json(data, edits)
            (folder / f).write_bytes(data)
        counts["cases"] += 1
        found = []
        _check(worker, folder, counts, found, repr(changes)[:300])
        problems.extend(found)
        assert not found, found[0]

    try:
        case()
    finally:
        _tally(name, counts)
    assert counts["cases"] >= min(cases, 1)


def test_fuzz_sentencepiece_files_and_chat_template_through_load_and_cli(worker, spm_base, tmp_path):
    _spm_fuzz(worker, spm_base, tmp_path, FAST_CASES, "spm_fast")


@pytest.mark.slow
def test_fuzz_sentencepiece_files_and_chat_template_through_load_and_cli_slow(worker, spm_base, tmp_path):
    _spm_fuzz(worker, spm_base, tmp_path, SLOW_CASES, "spm_slow")


# ---------------------------------------------------------------- GGUF metadata values
_RANGES = {0: (0, 255), 1: (-128, 127), 2: (0, 2**16 - 1), 3: (-2**15, 2**15 - 1), 4: (0, 2**32 - 1),
           5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}


def _gguf_scalar(vtype):
    if vtype in _RANGES:
        lo, hi = _RANGES[vtype]
        return st.integers(lo, hi) | st.sampled_from([v for v in (0, 1, 2, 3, 7, 64, 701, lo, hi) if lo <= v <= hi])
    if vtype == 6:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if vtype == 12:
        return _floats
    if vtype == 7:
        return st.booleans()
    return st.text(max_size=20) | st.sampled_from(["llama", "gpt2", "qwen2", "llama-bpe", "linear", "a" * 3000])


@st.composite
def gguf_value(draw, depth=0):
    vtype = draw(st.sampled_from(sorted(SCALAR_FMT) + [STRING] * 3 + ([ARRAY] * 3 if depth < 2 else [])))
    if vtype != ARRAY:
        return vtype, draw(_gguf_scalar(vtype))
    itype = draw(st.sampled_from(sorted(SCALAR_FMT) + [STRING] + ([ARRAY] if depth < 1 else [])))
    if itype == ARRAY:
        inner = draw(st.lists(gguf_value(depth + 1).filter(lambda v: v[0] == ARRAY), max_size=2))
        # nested arrays must share one element type
        items = [v for _, v in inner]
        if items:
            items = [v for v in items if v[0] == items[0][0]]
        return ARRAY, (ARRAY, items)
    return ARRAY, (itype, draw(st.lists(_gguf_scalar(itype), max_size=6)))


@st.composite
def gguf_edits(draw, keys):
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(keys) | st.text(max_size=10))
        kind = draw(st.sampled_from(["set", "set", "set", "del", "array"]))
        if kind == "del":
            edits.append(("del", key))
        elif kind == "array":  # damage one element of an existing array, or its length
            edits.append(("array", key, draw(st.integers(0, 10**6)), draw(st.sampled_from(["drop", "cut", "elem"])),
                          draw(gguf_value())))
        else:
            edits.append(("set", key, draw(gguf_value())))
    return edits


def _apply_gguf(kvs, edits):
    kvs = list(kvs)
    for edit in edits:
        index = {k: i for i, (k, _, _) in enumerate(kvs)}
        key = edit[1]
        if edit[0] == "del":
            kvs = [kv for kv in kvs if kv[0] != key]
        elif edit[0] == "set":
            vtype, value = edit[2]
            kv = (key, vtype, value)
            if key in index:
                kvs[index[key]] = kv
            else:
                kvs.append(kv)
        elif key in index and kvs[index[key]][1] == ARRAY:
            _, _, (itype, items) = kvs[index[key]]
            items = list(items)
            where, how, (vtype, value) = edit[2] % max(1, len(items)), edit[3], edit[4]
            if how == "drop" and items:
                del items[where]
            elif how == "cut":
                items = items[:where]
            elif items and vtype == itype:
                items[where] = value
            kvs[index[key]] = (key, ARRAY, (itype, items))
    return kvs


@pytest.fixture(scope="module")
def gguf_base(model_files):
    return gguf_parts(model_files.gguf("llama", "q8_0"))


GGUF_KEYS = ["general.architecture", "general.alignment", "llama.block_count", "llama.embedding_length",
             "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
             "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
             "llama.context_length", "llama.vocab_size", "llama.rope.scaling.type", "llama.rope.scaling.factor",
             "llama.rope.scale_linear", "realizar.rope.scaling.factor", "realizar.rope.scaling.low_freq_factor",
             "realizar.rope.scaling.high_freq_factor", "realizar.rope.scaling.original_context_length",
             "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
             "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.unknown_token_id",
             "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
             "tokenizer.chat_template"]


def _gguf_fuzz(worker, gguf_base, tmp_path, cases, name, keys):
    kvs, tensors = gguf_base
    counts, problems = Counter(cases=0, max_seconds=0, max_rss_mb=0), []

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(gguf_edits(keys))
    def case(edits):
        # a fresh name each case: rewriting the file in place would truncate pages a model of the previous case
        # may still map (JAX on a CPU can alias them), which is SIGBUS, not a finding
        counts["files"] += 1
        path = tmp_path / f"fuzzed-{counts['files']}.gguf"
        for old in tmp_path.glob("fuzzed-*.gguf"):
            old.unlink()
        try:
            write_gguf(path, _apply_gguf(kvs, edits), tensors)
        except (struct_error, OverflowError, UnicodeEncodeError):
            return  # a value the format cannot hold (e.g. a nested array of mixed types)
        counts["cases"] += 1
        found = []
        _check(worker, path, counts, found, repr(edits)[:300])
        problems.extend(found)
        assert not found, found[0]

    try:
        case()
    finally:
        _tally(name, counts)


from struct import error as struct_error  # noqa: E402

TOKENIZER_KEYS = [k for k in GGUF_KEYS if k.startswith("tokenizer.")]
MODEL_KEYS = [k for k in GGUF_KEYS if not k.startswith("tokenizer.")]


def test_fuzz_gguf_model_metadata_through_load_and_cli(worker, gguf_base, tmp_path):
    _gguf_fuzz(worker, gguf_base, tmp_path, FAST_CASES, "gguf_model_fast", MODEL_KEYS)


def test_fuzz_gguf_tokenizer_metadata_through_load_and_cli(worker, gguf_base, tmp_path):
    _gguf_fuzz(worker, gguf_base, tmp_path, FAST_CASES, "gguf_tokenizer_fast", TOKENIZER_KEYS)


@pytest.mark.slow
def test_fuzz_gguf_model_metadata_through_load_and_cli_slow(worker, gguf_base, tmp_path):
    _gguf_fuzz(worker, gguf_base, tmp_path, SLOW_CASES, "gguf_model_slow", GGUF_KEYS)


@pytest.mark.slow
def test_fuzz_gguf_tokenizer_metadata_through_load_and_cli_slow(worker, gguf_base, tmp_path):
    _gguf_fuzz(worker, gguf_base, tmp_path, SLOW_CASES, "gguf_tokenizer_slow", TOKENIZER_KEYS)
