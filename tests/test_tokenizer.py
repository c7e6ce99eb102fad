"""Tokenizer parity: our GGUF tokenizer fields -> a real GGUF file -> gguf-py's reader -> Tokenizer, compared with
the HF `tokenizers` library (byte-level BPE), sentencepiece itself and transformers (SentencePiece), on hard
text and hypothesis-generated text. Also streaming detokenisation and error reporting."""
from __future__ import annotations

import unicodedata
import warnings

import gguf
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tokenizer_fixtures as tf
from realizar_jax.errors import TokenizerError
from realizar_jax.formats.gguf_tokenizer import gguf_tokenizer_fields
from realizar_jax.text.tokenizer import Tokenizer

BPE_STYLES = ["llama3", "qwen2", "gpt2"]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

hard_text = tf.hard_text_strategy()


def write_gguf(path, hf_dir):
    """Store the writer fields in a real GGUF file the way our converter does (the documented loop)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value, vtype in gguf_tokenizer_fields(hf_dir):
        if vtype is None:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def read_metadata(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """style -> (hf dir, HF tokenizers.Tokenizer, our Tokenizer from the GGUF file, ours from the HF dir)."""
    from tokenizers import Tokenizer as HFTokenizer
    out = {}
    for style in BPE_STYLES:
        d = tf.make_bpe_dir(tmp_path_factory.mktemp(style), style)
        g = write_gguf(d / "tok.gguf", d)
        out[style] = (d, HFTokenizer.from_file(str(d / "tokenizer.json")),
                      Tokenizer.from_gguf_metadata(read_metadata(g)), Tokenizer.from_hf_dir(d))
    return out


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """(hf dir, sentencepiece processor, our Tokenizer from the GGUF file, metadata dict)."""
    import sentencepiece
    d = tf.make_spm_dir(tmp_path_factory.mktemp("spm"))
    md = read_metadata(write_gguf(d / "tok.gguf", d))
    return d, sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model")), \
        Tokenizer.from_gguf_metadata(md), md


# ------------------------------------------------------------------ writer fields
@pytest.mark.parametrize("style,pre", [("llama3", "llama-bpe"), ("qwen2", "qwen2"), ("gpt2", "gpt-2")])
def test_bpe_fields_follow_llama_cpp_converter(bpe, style, pre):
    import json
    d, hf, _, _ = bpe[style]
    md = read_metadata(d / "tok.gguf")
    tj = json.loads((d / "tokenizer.json").read_text())
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == pre
    vocab = hf.get_vocab(with_added_tokens=True)
    tokens = md["tokenizer.ggml.tokens"]
    assert len(tokens) == len(vocab) and all(vocab[t] == i for i, t in enumerate(tokens))
    types = md["tokenizer.ggml.token_type"]
    for i, t in enumerate(tokens):
        want = (gguf.TokenType.CONTROL if t in tf.BPE_SPECIALS else gguf.TokenType.USER_DEFINED
                if t == tf.USER_TOKEN else gguf.TokenType.NORMAL)
        assert types[i] == want, (i, t)
    assert md["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    assert md["tokenizer.ggml.bos_token_id"] == vocab["<|begin_of_text|>"]
    eos = "<|eot_id|>" if style == "llama3" else "<|end_of_text|>"
    assert md["tokenizer.ggml.eos_token_id"] == vocab[eos]
    assert md.get("tokenizer.ggml.add_bos_token", False) == (style == "llama3")
    assert md["tokenizer.chat_template"] == tf.CHAT_TEMPLATE


def test_spm_fields_follow_llama_cpp_converter(spm):
    _, sp, _, md = spm
    n = sp.vocab_size()
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(n)]
    assert md["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(n)])
    types = md["tokenizer.ggml.token_type"]
    assert [i for i in range(n) if types[i] == gguf.TokenType.BYTE] == [sp.piece_to_id(f"<0x{b:02X}>")
                                                                       for b in range(256)]
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN
    assert types[sp.bos_id()] == types[sp.eos_id()] == gguf.TokenType.CONTROL
    assert sum(t == gguf.TokenType.NORMAL for t in types) == n - 259
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"],
            md["tokenizer.ggml.unknown_token_id"]) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.ggml.add_eos_token"] is False
    assert md["tokenizer.chat_template"] == tf.SPM_CHAT_TEMPLATE


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_type=st.sampled_from(["bpe", "unigram"]), byte_fallback=st.booleans(), extra=st.integers(0, 400),
       ids=st.permutations([0, 1, 2, 3]), no_bos=st.booleans(), pad=st.booleans(), rename=st.booleans(),
       user=st.lists(st.sampled_from(["<tool>", "foo", "\u2581bar", "<ctl>"]), unique=True))
def test_tokenizer_model_read_without_the_library_equals_sentencepiece(tmp_path, model_type, byte_fallback, extra,
                                                                       ids, no_bos, pad, rename, user):
    """Our reading of the ModelProto gives the pieces, scores, types (as the converter maps them) and special ids
    that the sentencepiece library gives, over models trained with random settings."""
    import io

    import sentencepiece
    from realizar_jax.formats.gguf_tokenizer import _read_spm_model
    buf = io.BytesIO()
    names = dict(unk_piece="[UNK]", bos_piece="[BOS]", eos_piece="[EOS]", pad_piece="[PAD]") if rename else {}
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tf.training_text()[::3]), model_writer=buf, model_type=model_type,
        vocab_size=(700 if byte_fallback else 300) + extra, byte_fallback=byte_fallback, character_coverage=0.995,
        user_defined_symbols=[u for u in user if u != "<ctl>"], control_symbols=[u for u in user if u == "<ctl>"],
        unk_id=ids[0], bos_id=-1 if no_bos else ids[1], eos_id=ids[2], pad_id=ids[3] if pad else -1,
        minloglevel=2, num_threads=1, **names)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    pieces, scores, types, own, _ = _read_spm_model(path)
    n = sp.vocab_size()
    assert pieces == [sp.id_to_piece(i) for i in range(n)] and scores == [sp.get_score(i) for i in range(n)]
    T = gguf.TokenType
    assert types == [int(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.UNUSED
                         if sp.is_unused(i) else T.BYTE if sp.is_byte(i) else T.NORMAL) for i in range(n)]
    assert {k: -1 if v is None else v for k, v in own.items()} == {
        "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, 10**6), xor=st.integers(0, 255), cut=st.integers(0, 10**6))
def test_damaged_tokenizer_model_is_a_tokenizer_error(spm, tmp_path, pos, xor, cut):
    from realizar_jax.formats.gguf_tokenizer import _read_spm_model
    raw = bytearray((spm[0] / "tokenizer.model").read_bytes())
    raw[pos % len(raw)] ^= xor
    path = tmp_path / "tokenizer.model"
    path.write_bytes(raw[:len(raw) - cut % len(raw)])
    try:
        pieces, scores, types, _, _ = _read_spm_model(path)
    except TokenizerError as e:
        assert str(path) in str(e) and "not a SentencePiece model" in str(e)
    else:
        assert len(pieces) == len(scores) == len(types) > 0


def test_tokenizer_model_needs_no_sentencepiece_package(spm, monkeypatch):
    """`realizar-jax convert` of a SentencePiece folder works on a plain install, where sentencepiece is absent."""
    import sys
    want = gguf_tokenizer_fields(spm[0])
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # `import sentencepiece` now raises ImportError
    assert gguf_tokenizer_fields(spm[0]) == want
    for raw in (b"", b"\xff" * 12, b"\x0a\x20ab"):
        (spm[0].parent / "bad").mkdir(exist_ok=True)
        (spm[0].parent / "bad" / "tokenizer.model").write_bytes(raw)
        with pytest.raises(TokenizerError, match="not a SentencePiece model"):
            gguf_tokenizer_fields(spm[0].parent / "bad")


def test_config_vocab_size_pads_token_list(tmp_path):
    import json
    d = tf.make_bpe_dir(tmp_path / "m", "llama3", vocab_size=400)
    (d / "config.json").write_text(json.dumps({"vocab_size": 410}))
    fields = {k: v for k, v, _ in gguf_tokenizer_fields(d)}
    assert len(fields["tokenizer.ggml.tokens"]) == 410
    assert fields["tokenizer.ggml.tokens"][-1] == "[PAD409]"
    assert fields["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    (d / "config.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(TokenizerError, match="vocab_size 100"):
        gguf_tokenizer_fields(d)


# ------------------------------------------------------------------ byte-level BPE parity
@pytest.mark.parametrize("style", BPE_STYLES)
def test_bpe_hard_text_equals_hf(bpe, style):
    _, hf, ours, ours_hf = bpe[style]
    for text in tf.HARD_TEXTS + [tf.PROSE]:
        want = hf.encode(text).ids  # the post-processor adds BOS for llama3, nothing for the others
        assert ours.encode(text) == want, text
        assert ours_hf.encode(text) == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=True)
        assert ours.decode(want, skip_special=False) == hf.decode(want, skip_special_tokens=False)


@pytest.mark.parametrize("style", BPE_STYLES)
@HYP
@given(text=hard_text)
def test_bpe_random_text_equals_hf_and_round_trips(bpe, style, text):
    _, hf, ours, _ = bpe[style]
    ids = ours.encode(text)
    assert ids == hf.encode(text).ids
    plain = ours.encode(text, add_bos=False, special=False)
    # byte-level BPE is lossless (Qwen2 normalises to NFC first, as its tokenizer.json does)
    assert ours.decode(plain) == (unicodedata.normalize("NFC", text) if style == "qwen2" else text)


@pytest.mark.parametrize("style", BPE_STYLES)
@HYP
@given(data=st.data())
def test_bpe_random_ids_decode_like_hf(bpe, style, data):
    _, hf, ours, _ = bpe[style]
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=40))
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    stream = ours.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids)
    for p in pieces:
        p.encode("utf-8")  # never a lone surrogate / broken sequence


def test_bpe_ids_and_flags(bpe):
    _, hf, ours, ours_hf = bpe["llama3"]
    for t in (ours, ours_hf):
        assert t.bos_id == hf.token_to_id("<|begin_of_text|>") and t.add_bos
        assert t.eos_ids[0] == hf.token_to_id("<|eot_id|>")
        assert hf.token_to_id("<|end_of_text|>") in t.eos_ids  # llama.cpp's end-of-generation list
        assert t.chat_template == tf.CHAT_TEMPLATE
        assert t.vocab_size == hf.get_vocab_size(with_added_tokens=True)
        assert t.id_to_piece(hf.token_to_id("Ġthe")) == "Ġthe"
        assert t.encode("hi", add_bos=False) == hf.encode("hi", add_special_tokens=False).ids
        assert t.encode("<|eot_id|>", add_bos=False) == [hf.token_to_id("<|eot_id|>")]
        assert len(t.encode("<|eot_id|>", add_bos=False, special=False)) > 1
    _, hf, ours, _ = bpe["qwen2"]
    assert not ours.add_bos and ours.encode("hi") == hf.encode("hi").ids


# ------------------------------------------------------------------ SentencePiece parity
def test_spm_hard_text_equals_sentencepiece(spm):
    _, sp, ours, _ = spm
    for text in tf.HARD_TEXTS + [tf.PROSE]:
        want = [sp.bos_id()] + sp.encode(text)
        assert ours.encode(text, special=False) == want, text
        assert ours.decode(want) == sp.decode(want), text


@HYP
@given(text=hard_text)
def test_spm_random_text_equals_sentencepiece_and_round_trips(spm, text):
    _, sp, ours, _ = spm
    ids = ours.encode(text, special=False)
    assert ids == [sp.bos_id()] + sp.encode(text)
    # identity normalisation + byte fallback: lossless, except that a literal '▁' comes back as a space
    assert ours.decode(ids) == sp.decode(ids) == text.replace("\u2581", " ")


def test_spm_equals_transformers_llama_tokenizer(spm):
    """transformers' LlamaTokenizer agrees where its Metaspace rules match SentencePiece (text that does not
    start with a space; it does not add the '▁' prefix there, nor after special tokens, unlike SPM/llama.cpp)."""
    transformers = pytest.importorskip("transformers")
    d, _, ours, _ = spm
    ht = transformers.AutoTokenizer.from_pretrained(str(d))
    texts = [t for t in tf.HARD_TEXTS + [tf.PROSE] if t[:1] not in (" ", "") and "<" not in t]
    assert len(texts) > 25
    for text in texts:
        assert ours.encode(text) == ht.encode(text), text
        ids = ours.encode(text)
        assert ours.decode(ids) == ht.decode(ids, skip_special_tokens=True)


def test_spm_special_tokens_and_space_after_them(spm):
    """Special-token text is parsed (special=True) and a '▁' is prepended to the text after it, as llama.cpp
    does (is_prev_special)."""
    _, sp, ours, _ = spm
    ids = ours.encode("hi</s>there", add_bos=False)
    assert ids == sp.encode("hi") + [sp.eos_id()] + sp.encode("there")
    assert ours.decode(ids) == sp.decode(ids) == "hi there"
    assert ours.decode(ids, skip_special=False) == "hi</s> there"


def test_spm_hf_dir_without_tokenizer_json(spm):
    d, sp, ours, _ = spm
    t = Tokenizer.from_hf_dir(d)  # only tokenizer.model: goes through the GGUF fields
    assert t.encode(tf.PROSE) == ours.encode(tf.PROSE) == [sp.bos_id()] + sp.encode(tf.PROSE)
    assert (t.bos_id, t.eos_ids, t.add_bos, t.chat_template) == (1, (2,), True, tf.SPM_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def spm_model(spm, model_files, tmp_path_factory):
    """rj.load of an HF model folder whose only tokenizer file is a SentencePiece tokenizer.model."""
    import json
    import shutil

    import realizar_jax as rj
    d = tmp_path_factory.mktemp("spm-model") / "m"
    shutil.copytree(model_files.hf("llama"), d)
    (d / "tokenizer.json").unlink()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(spm[0] / name, d / name)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "bos_token_id": 1, "eos_token_id": 2}))  # the SPM's ids
    return rj.load(d, max_seq_len=64)


@HYP
@given(text=hard_text)
def test_hf_model_with_only_tokenizer_model_loads_its_tokenizer(spm, spm_model, text):
    _, sp, _, _ = spm
    assert spm_model.tokenizer.encode(text, special=False) == [sp.bos_id()] + sp.encode(text)


def test_hf_model_with_only_tokenizer_model_generates_text(spm_model):
    g = spm_model.generate("def main(argv):", max_new_tokens=4)
    assert g.prompt_tokens[0] == 1 and len(g.tokens) == 4 and isinstance(g.text, str)


def test_hf_dir_with_sentencepiece_style_tokenizer_json(spm, tmp_path):
    """A Llama tokenizer saved by transformers (tokenizer.json: Metaspace, byte fallback, Strip decoder) and no
    tokenizer.model: from_hf_dir matches the `tokenizers` library; the GGUF writer refuses it with a clear error."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    transformers.AutoTokenizer.from_pretrained(str(spm[0])).save_pretrained(str(tmp_path))
    assert not (tmp_path / "tokenizer.model").exists()
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_hf_dir(tmp_path)
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (1, (2,), True)
    for text in tf.HARD_TEXTS + [tf.PROSE]:
        ids = hf.encode(text).ids
        assert ours.encode(text) == ids, text
        assert "".join(_stream(ours, ids)) == ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    with pytest.raises(TokenizerError, match="put its tokenizer.model in the folder"):
        gguf_tokenizer_fields(tmp_path)


# ------------------------------------------------------------------ streaming
def _stream(tok, ids):
    s = tok.stream_decoder()
    return [s.push(i) for i in ids] + [s.flush()]


@pytest.mark.parametrize("which", BPE_STYLES + ["spm"])
@HYP
@given(text=hard_text)
def test_stream_pieces_are_whole_characters(bpe, spm, which, text):
    tok = spm[2] if which == "spm" else bpe[which][2]
    ids = tok.encode(text, special=False)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)  # no character was ever emitted half-done


@pytest.mark.parametrize("which", ["llama3", "spm"])
def test_stream_holds_back_partial_characters(bpe, spm, which):
    tok = spm[2] if which == "spm" else bpe[which][2]
    text = "ok 👨‍👩‍👧 語"
    ids = tok.encode(text, add_bos=False)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert len(ids) > len(text)  # some characters were split into several tokens ...
    assert pieces.count("") >= len(ids) - len(text)  # ... and those tokens emitted nothing until complete


def test_spm_stream_random_ids_are_valid_utf8(spm):
    import random
    tok = spm[2]
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(30))]
        for p in _stream(tok, ids):
            p.encode("utf-8")


# ------------------------------------------------------------------ errors
def test_bad_metadata_raises_tokenizer_error(bpe, spm):
    md = read_metadata(bpe["llama3"][0] / "tok.gguf")
    smd = spm[3]
    cases = [
        ({k: v for k, v in md.items() if k != "tokenizer.ggml.tokens"}, "no tokenizer.ggml.tokens"),
        ({k: v for k, v in md.items() if k != "tokenizer.ggml.merges"}, "no tokenizer.ggml.merges"),
        ({**md, "tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
        ({**md, "tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"][:-1]}, "token_type has"),
        ({**md, "tokenizer.ggml.merges": ["Ġ"] + md["tokenizer.ggml.merges"]}, r"merges\[0\]"),
        ({**md, "tokenizer.ggml.merges": ["zz qq"]}, "not in tokenizer.ggml.tokens"),
        ({**md, "tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id = 1000000 is outside"),
        ({**md, "tokenizer.ggml.tokens": "abc"}, "should be an array"),
        ({**smd, "tokenizer.ggml.scores": smd["tokenizer.ggml.scores"][:5]}, "scores has 5 entries"),
        ({k: v for k, v in smd.items() if k != "tokenizer.ggml.scores"}, "no tokenizer.ggml.scores"),
    ]
    for bad, msg in cases:
        with pytest.raises(TokenizerError, match=msg):
            Tokenizer.from_gguf_metadata(bad)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer.model or tokenizer.json"):
        gguf_tokenizer_fields(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_warning(bpe):
    _, hf, _, _ = bpe["gpt2"]
    md = read_metadata(bpe["gpt2"][0] / "tok.gguf")
    with pytest.warns(UserWarning, match="unknown tokenizer.ggml.pre 'some-new-model'"):
        tok = Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": "some-new-model"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.pre": "default"})
    assert tok.encode(tf.PROSE) == hf.encode(tf.PROSE).ids
