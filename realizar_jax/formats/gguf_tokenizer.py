"""The `tokenizer.ggml.*` GGUF metadata for an HF model folder, as llama.cpp's convert_hf_to_gguf.py writes it.

Two vocab kinds, chosen like the converter's llama path (tokenizer.model first, else tokenizer.json):

* SentencePiece `tokenizer.model` -> model 'llama', pre 'default': tokens (pieces, '▁' kept), scores,
  token_type (NORMAL / UNKNOWN / CONTROL / UNUSED / BYTE for '<0x00>'..'<0xFF>', USER_DEFINED for added
  tokens from tokenizer_config.json's added_tokens_decoder, which also get score -1000). Special ids missing
  from config.json / tokenizer_config.json fall back to the SentencePiece model's own bos/eos/unk/pad ids.
* byte-level BPE `tokenizer.json` -> model 'gpt2', pre (below), tokens (byte-level strings, 'Ġ' etc.),
  token_type (NORMAL, CONTROL for special added tokens or ones that look special like '<|...|>',
  USER_DEFINED for other added tokens), merges ('a b' strings).

Both get bos/eos/unk/sep/pad ids, add_bos_token/add_eos_token and chat_template through gguf-py's own
`gguf.SpecialVocab` (the converter's code for these), so ids and flags follow llama.cpp exactly.
When config.json's vocab_size is larger than the tokenizer's, the gap is filled with '[PAD{i}]' UNUSED
tokens, as the converter does (the embedding matrix and the token list must have the same length).

`tokenizer.ggml.pre` names llama.cpp's pre-tokenizer regex. The converter identifies it by hashing the
token ids of a probe text, which only works for published vocabularies; we match the regex itself in
tokenizer.json's pre_tokenizer instead (see `PRE_TOKENIZER_REGEXES`):
    llama3 regex ('\\p{N}{1,3}', used by Llama 3.x)       -> 'llama-bpe'
    qwen2 regex  (single digits '\\p{N}', Qwen2/2.5/3)     -> 'qwen2'
    o200k regex  (case-split words, '\\p{N}{1,3}', gpt-oss) -> 'gpt-4o'
    ByteLevel(use_regex=True) or the GPT-2 regex           -> 'gpt-2'
    anything else                                         -> 'default' with a warning (llama.cpp would then
                                                             split text differently from HF)
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import gguf

from ..errors import TokenizerError
from .files import (MAX_JSON_BYTES, MAX_SPM_MODEL_BYTES, MAX_TEMPLATE_BYTES, MAX_TOKENIZER_JSON_BYTES, present,
                    read_bounded)

logger = logging.getLogger(__name__)

Field = tuple[str, object, "gguf.GGUFValueType | None"]

# llama.cpp's split regexes (llama-vocab.cpp) and the tokenizer.ggml.pre names that select them; text/ builds
# tokenizers from these, so they live here, with the file knowledge.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# tiktoken's o200k_base (GPT-4o, gpt-oss: its tokenizer.json's Split), llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PRE_NAMES = frozenset(["llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"])  # also ignore_merges, BOS
NFC_PRE_NAMES = frozenset(["qwen2", "deepseek-r1-qwen"])
PRE_REGEXES = {  # tokenizer.ggml.pre -> split regex
    **dict.fromkeys(LLAMA3_PRE_NAMES, LLAMA3_REGEX),
    **dict.fromkeys(NFC_PRE_NAMES, QWEN2_REGEX),
    **dict.fromkeys(["default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"], GPT2_REGEX),
    "gpt-4o": GPT4O_REGEX,
}
# regex in tokenizer.json -> the name we write as tokenizer.ggml.pre
PRE_TOKENIZER_REGEXES = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2", GPT2_REGEX: "gpt-2", GPT4O_REGEX: "gpt-4o"}


def _looks_special(text: str) -> bool:
    # The converter's heuristic: some models leave control tokens marked non-special.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read_json(path: Path, limit: int = MAX_JSON_BYTES) -> dict:
    raw = read_bounded(path, limit)  # a regular file within the bound, or a DamagedFileError naming it
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"cannot read JSON: {str(e)[:200]}", path=path) from None
    if not isinstance(value, dict):
        raise TokenizerError("cannot read JSON: not a JSON object", path=path)
    return value


def _config_vocab_size(hf_dir: Path) -> int | None:
    cfg_path = hf_dir / "config.json"
    if not present(cfg_path):
        return None
    from ..config import MAX_SIZE
    cfg = _read_json(cfg_path)
    text_config = cfg.get("text_config")
    n = cfg.get("vocab_size", text_config.get("vocab_size") if isinstance(text_config, dict) else None)
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_SIZE:
        raise TokenizerError(f"config.json vocab_size = {n!r:.40} must be an integer in 1..{MAX_SIZE}", path=cfg_path)
    return n


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE tokenizer.json (see module doc)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = []
    for step in steps:
        if step.get("type") == "Split":
            regexes.append((step.get("pattern") or {}).get("Regex"))
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            regexes.append(GPT2_REGEX)
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZER_REGEXES:
        return PRE_TOKENIZER_REGEXES[regexes[0]]
    logger.warning("unrecognised BPE pre-tokenizer %r; writing tokenizer.ggml.pre='default' "
                   "(llama.cpp may split text differently from the HF tokenizer)", regexes)
    return "default"


def _is_byte_level(tokenizer_json: dict) -> bool:
    def has_byte_level(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(n) for n in node.get("pretokenizers", []) or [])
    return has_byte_level(tokenizer_json.get("pre_tokenizer"))


def _bpe_vocab(hf_dir: Path, tok_json: dict, n_vocab: int | None):
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(tok_json):
        # e.g. a SentencePiece-style tokenizer.json (Metaspace + byte fallback) saved without its tokenizer.model:
        # its merges do not carry the piece scores llama.cpp's 'llama' vocab needs.
        raise TokenizerError(f"{hf_dir / 'tokenizer.json'}: only byte-level BPE tokenizer.json files can be "
                             f"converted (model type {model.get('type')!r}, pre-tokenizer "
                             f"{(tok_json.get('pre_tokenizer') or {}).get('type')!r}); for a SentencePiece model "
                             f"put its tokenizer.model in the folder")
    id_to_tok: dict[int, str] = {int(i): t for t, i in (model.get("vocab") or {}).items()}
    added = {}
    for a in tok_json.get("added_tokens") or []:
        id_to_tok[int(a["id"])] = a["content"]
        added[int(a["id"])] = a
    if not id_to_tok:
        raise TokenizerError(f"{hf_dir / 'tokenizer.json'}: empty vocabulary")
    size = max(id_to_tok) + 1
    if n_vocab is not None:
        if n_vocab < size:
            raise TokenizerError(f"{hf_dir}: config.json vocab_size {n_vocab} is smaller than the tokenizer's "
                                 f"largest id {size - 1}")
        size = n_vocab
    tokens, types = [], []
    for i in range(size):
        tok = id_to_tok.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            if added[i].get("special") or _looks_special(tok):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                tok = tok.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalised
                types.append(int(gguf.TokenType.USER_DEFINED))
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of each field of one protobuf message: an int for varints, bytes for the
    rest. Raises ValueError on a truncated or malformed message."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while shift < 70:
            b = buf[i]  # IndexError past the end
            value, i, shift = value | (b & 0x7F) << shift, i + 1, shift + 7
            if b < 0x80:
                return value, i
        raise ValueError("varint longer than 10 bytes")

    i = 0
    while i < len(buf):
        key, i = varint(i)
        wire = key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 2, 5):
            size, i = (8, i) if wire == 1 else (4, i) if wire == 5 else varint(i)
            value, i = buf[i:i + size], i + size
            if i > len(buf):
                raise ValueError("field runs past the end")
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield key >> 3, wire, value


# SentencePiece piece types the converter keeps (the enum has gguf's values); the others become NORMAL
_SPM_KEPT_TYPES = {int(t) for t in (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED,
                                    gguf.TokenType.BYTE)}


def _read_spm_model(path: Path, limit: int | None = None):
    """(pieces, scores, types, {'unk'|'bos'|'eos'|'pad': id}, number of pieces) of a SentencePiece tokenizer.model;
    past the first `limit` pieces (those the vocabulary has room for) pieces are counted, not decoded.

    The ModelProto is read directly (pieces = field 1: piece 1, score 2, type 3; trainer_spec = field 2 with
    the special pieces' names in 45-48): this is all the converter takes from the `sentencepiece` library, so
    a plain install needs no compiled extension for it. Special ids as the library gives them: the named
    piece when it has the right type (the first UNKNOWN piece for unk)."""
    try:
        pieces, scores, types, skipped = [], [], [], 0
        names = {45: "<unk>", 46: "<s>", 47: "</s>", 48: "<pad>"}
        for field, wire, value in _proto_fields(read_bounded(path, MAX_SPM_MODEL_BYTES)):
            if field == 1 and wire == 2 and limit is not None and len(pieces) >= limit:
                skipped += 1
            elif field == 1 and wire == 2:
                piece, score, kind = "", 0.0, int(gguf.TokenType.NORMAL)
                for f, w, v in _proto_fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                pieces.append(piece)
                scores.append(score)
                types.append(kind if kind in _SPM_KEPT_TYPES else int(gguf.TokenType.NORMAL))
            elif field == 2 and wire == 2:
                names.update({f: v.decode("utf-8") for f, w, v in _proto_fields(value) if f in names and w == 2})
    except (ValueError, IndexError) as e:  # UnicodeDecodeError is a ValueError
        raise TokenizerError(f"not a SentencePiece model: {e}", path=path) from None
    if not pieces:
        raise TokenizerError("not a SentencePiece model: it holds no pieces", path=path)
    ids = {p: i for i, p in reversed(list(enumerate(pieces)))}  # the first id of a repeated piece
    own = {"unk": next((i for i, t in enumerate(types) if t == gguf.TokenType.UNKNOWN), None)}
    for key, field in (("bos", 46), ("eos", 47), ("pad", 48)):
        i = ids.get(names[field])
        own[key] = i if i is not None and types[i] == gguf.TokenType.CONTROL else None
    return pieces, scores, types, own, len(pieces) + skipped


def _check_text(text: str, what: str, path: Path):
    """A token from JSON is text the tokenizer can hold: JSON's \\ud800 escapes give lone surrogates, which
    are no UTF-8 (the tokenizers library fails on them with a UnicodeEncodeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError(f"{what} holds a lone surrogate ({text!r:.60}), not text", path=path) from None


def _spm_vocab(hf_dir: Path, n_vocab: int | None):
    path = hf_dir / "tokenizer.model"
    pieces, piece_scores, piece_types, own_ids, total = _read_spm_model(path, n_vocab)
    size = n_vocab or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    n = min(size, len(pieces))
    tokens[:n], scores[:n], types[:n] = pieces[:n], piece_scores[:n], piece_types[:n]
    if total > size:
        logger.warning("%s: tokenizer has %d pieces but config.json vocab_size is %d; extra pieces dropped",
                       path, total, size)
    extra = {}
    if present(hf_dir / "added_tokens.json"):
        for t, i in _read_json(hf_dir / "added_tokens.json").items():
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise TokenizerError(f"added token {t!r:.60} has id {i!r:.40}, not an integer >= 0",
                                     path=hf_dir / "added_tokens.json")
            _check_text(t, f"added token {t!r:.60}", hf_dir / "added_tokens.json")
            extra[i] = {"content": t}
    if present(hf_dir / "tokenizer_config.json"):
        decoder = _read_json(hf_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError("added_tokens_decoder must be an object", path=hf_dir / "tokenizer_config.json")
        for i, d in decoder.items():
            if not (i.isdigit() and isinstance(d, dict) and isinstance(d.get("content"), str)):
                raise TokenizerError(f"added_tokens_decoder[{i!r:.40}] = {d!r:.60} is not id -> "
                                     f"{{\"content\": text, ...}}", path=hf_dir / "tokenizer_config.json")
            _check_text(d["content"], f"added_tokens_decoder[{i!r:.40}]", hf_dir / "tokenizer_config.json")
            extra[int(i)] = d
    for i, d in sorted(extra.items()):
        if i >= size:
            logger.warning("%s: added token %r has id %d >= vocab size %d; skipped", hf_dir, d["content"], i, size)
            continue
        text = d["content"]
        if d.get("special") or _looks_special(text):
            types[i] = int(gguf.TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")
            types[i] = int(gguf.TokenType.USER_DEFINED)
        tokens[i], scores[i] = text, -1000.0
    return tokens, scores, types, {k: v for k, v in own_ids.items() if v is not None and v < size}


def gguf_tokenizer_fields(hf_dir) -> list[Field]:
    """The `tokenizer.ggml.*` (and `tokenizer.chat_template`) key/values for the HF model folder `hf_dir`.

    Returns a list of `(key, value, vtype)`: `vtype` is the `gguf.GGUFValueType` of a scalar (STRING, UINT32,
    BOOL), or None for an array, whose element type gguf-py infers from the Python values exactly as the
    converter's typed helpers do (str -> STRING, int -> INT32, float -> FLOAT32). Write them with::

        for key, value, vtype in gguf_tokenizer_fields(hf_dir):
            if vtype is None:
                writer.add_array(key, value)
            else:
                writer.add_key_value(key, value, vtype)

    Raises TokenizerError when the folder has no usable tokenizer.
    """
    hf_dir = Path(hf_dir)
    for name in ("config.json", "tokenizer_config.json", "chat_template.json", "tokenizer.json"):  # SpecialVocab
        if present(hf_dir / name):  # reads these itself, unbounded: check first that they are safe to read
            read_bounded(hf_dir / name, MAX_TOKENIZER_JSON_BYTES if name == "tokenizer.json" else MAX_JSON_BYTES)
    extra = hf_dir / "additional_chat_templates"
    for path in [hf_dir / "chat_template.jinja", *(sorted(extra.glob("*.jinja")) if extra.is_dir() else [])]:
        if present(path):  # SpecialVocab reads these as UTF-8 text, unbounded, and lets a decoding error out
            try:
                read_bounded(path, MAX_TEMPLATE_BYTES).decode("utf-8")
            except UnicodeDecodeError as e:
                raise TokenizerError(f"cannot read the chat template: {e}", path=path) from None
    n_vocab = _config_vocab_size(hf_dir)
    # A scratch writer (never opened on disk) lets gguf-py's own helpers pick keys and value types.
    w = gguf.GGUFWriter(path=None, arch="llama")
    if present(hf_dir / "tokenizer.model"):
        tokens, scores, types, own_ids = _spm_vocab(hf_dir, n_vocab)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        special = gguf.SpecialVocab(hf_dir, load_merges=False, n_vocab=len(tokens))
        for typ, tid in own_ids.items():  # without config.json ids, use the model's own (llama.cpp's defaults)
            special.special_token_ids.setdefault(typ, tid)
    elif present(hf_dir / "tokenizer.json"):
        tok_json = _read_json(hf_dir / "tokenizer.json", MAX_TOKENIZER_JSON_BYTES)
        tokens, types = _bpe_vocab(hf_dir, tok_json, n_vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre_tokenizer_name(tok_json))
        w.add_token_list(tokens)
        w.add_token_types(types)
        special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise TokenizerError(f"{hf_dir / 'tokenizer.json'}: BPE tokenizer has no merges")
    else:
        raise TokenizerError(f"{hf_dir}: no tokenizer.model or tokenizer.json")
    if isinstance(special.chat_template, list):  # named templates: gguf-py's writer takes each as name -> text
        named = [t for t in special.chat_template
                 if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)]
        if len(named) < len(special.chat_template):
            logger.warning("%s: chat_template entries that are not {\"name\": text, \"template\": text} skipped",
                           hf_dir)
        special.chat_template = named or None
    try:
        special.add_to_gguf(w, quiet=True)
    except ValueError as e:
        raise TokenizerError(f"{hf_dir}: {e}") from e
    fields: list[Field] = []
    for key, v in w.kv_data[0].items():
        if key.startswith("tokenizer."):
            fields.append((key, v.value, None if v.type == gguf.GGUFValueType.ARRAY else v.type))
    return fields
