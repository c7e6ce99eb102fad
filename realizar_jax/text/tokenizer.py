"""One `Tokenizer` for GGUF vocabularies and HF `tokenizer.json` files, built on the `tokenizers` library.

Constructors:
* `Tokenizer.from_hf_dir(path)`: tokenizer.json (+ tokenizer_config.json, config.json, generation_config.json
  for bos/eos/add_bos/chat_template). A folder with only a SentencePiece tokenizer.model goes through the
  same fields our GGUF writer stores (formats.gguf_tokenizer) and then `from_gguf_metadata`.
* `Tokenizer.from_gguf_metadata(metadata)`: `metadata` maps GGUF keys to Python values as gguf-py's
  `ReaderField.contents()` returns them: str for strings, int/float/bool for scalars, lists for arrays
  (numpy arrays and bytes strings are accepted too). Keys used: tokenizer.ggml.{model, pre, tokens,
  token_type, scores, merges, bos_token_id, eos_token_id, eot_token_id, eom_token_id, unknown_token_id,
  add_bos_token, add_eos_token, add_space_prefix} and tokenizer.chat_template.
* `Tokenizer.from_gguf_file(path)`: reads just the metadata with gguf-py and calls the above.
* `load_tokenizer(source)`: whichever of these fits an opened `formats.ModelSource` (None if it has no tokenizer).

How a GGUF vocab becomes a `tokenizers` object (mirroring llama.cpp's llama-vocab.cpp):
* 'gpt2' (byte-level BPE): tokens + merges, the split regex named by tokenizer.ggml.pre (llama-bpe/llama3,
  qwen2, gpt-2/default, gpt-4o (o200k: gpt-oss); others fall back to GPT-2's with a warning), byte-level mapping, `ignore_merges` for
  Llama 3 as llama.cpp sets it. Qwen2 names also get NFC normalisation, as its tokenizer.json has.
* 'llama' (SentencePiece): llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation
  is the highest-scoring token; a BPE whose merges are ranked by that score (what HF's LlamaConverter does)
  gives the same result. Spaces become '▁', '▁' is prepended to each text run (add_space_prefix, also after
  special tokens, as llama.cpp and HF's legacy Llama tokenizer do), and unknown characters fall back to
  <0xXX> byte tokens.
CONTROL/UNKNOWN tokens become special added tokens (parsed in text when `special=True`, skipped by
`decode`), USER_DEFINED tokens plain added tokens.

Streaming: `stream_decoder()` returns a `StreamDecoder` fed one id at a time; it turns each id into the
bytes the HF decoder would produce for it and runs them through an incremental UTF-8 decoder, so a
character split over several byte tokens is only emitted once complete.
"""
from __future__ import annotations

import codecs
import json
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import ModelFormatError, TokenizerError
from ..formats import ModelSource
from ..formats.files import MAX_JSON_BYTES, MAX_TEMPLATE_BYTES, MAX_TOKENIZER_JSON_BYTES, present, read_bounded
from ..formats.gguf_tokenizer import GPT2_REGEX, LLAMA3_PRE_NAMES, NFC_PRE_NAMES, PRE_REGEXES

# gguf.TokenType values, as the plain ints metadata holds
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Longest token text accepted. Published vocabularies stay under ~130 characters; deriving SentencePiece merges
# costs O(length^2) per token, so one 1,000,000-character token would hang the build (and a 300,000-character
# one took 33 s). With this bound the build is linear in the vocabulary's total size.
MAX_TOKEN_CHARS = 1024


# Control tokens llama.cpp also treats as end-of-generation (llama-vocab.cpp's EOG list).
EOG_TEXTS = frozenset(["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
                       "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>", "<|end_of_text|>"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that are always whole UTF-8 characters.

    `push(id)` returns the text completed by that token (possibly ''); `flush()` returns what is left at the
    end (an incomplete sequence becomes U+FFFD). Special tokens produce nothing, as in `Tokenizer.decode`.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer._strip_first_space

    def push(self, token_id: int) -> str:
        data = self._tok._token_bytes(int(token_id))
        if self._strip_space and data:
            self._strip_space = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def push_many(self, ids: Iterable[int]) -> str:
        return "".join(self.push(i) for i in ids)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Encode/decode text for one model. Build with `from_hf_dir`, `from_gguf_metadata` or `from_gguf_file`."""

    def __init__(self, hf, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool, add_eos: bool = False,
                 chat_template: str | None = None, decode_mode: str = "byte_level", strip_first_space: bool = False):
        self._hf = hf
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))  # de-duplicated, first is the main EOS
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)
        self.chat_template = chat_template
        self._mode = decode_mode  # 'byte_level' | 'spm' | 'text': how one token's bytes are found
        self._strip_first_space = strip_first_space
        self._special_ids = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self._bytes_cache: dict[int, bytes] = {}
        self._lock = threading.Lock()  # encode toggles hf.encode_special_tokens

    # ---------------------------------------------------------------- interface
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, add_bos: bool | None = None, *, add_eos: bool | None = None,
               special: bool = True) -> list[int]:
        """Token ids of `text`. BOS (EOS) is added when `add_bos` (`add_eos`) is true, or as the model says when
        None. `special=True` parses special-token text such as '<|eot_id|>' into its id (what chat templates
        need); `special=False` tokenizes it as plain text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        with self._lock:
            self._hf.encode_special_tokens = not special
            try:
                ids = self._hf.encode(text, add_special_tokens=False).ids
            finally:
                self._hf.encode_special_tokens = False
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if (self.add_eos if add_eos is None else add_eos) and self.eos_ids:
            ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, ...) are left out unless `skip_special=False`.
        Ids outside the vocabulary (e.g. padded embedding rows) have no text and are ignored."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry for `token_id` ('Ġthe', '▁the', '<0x0A>', '<|eot_id|>'), None if unknown."""
        return self._hf.id_to_token(int(token_id))

    def token_to_id(self, piece: str) -> int | None:
        return self._hf.token_to_id(piece)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self._special_ids

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, mode={self._mode!r}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos})")

    # ---------------------------------------------------------------- per-token bytes (streaming)
    def _token_bytes(self, token_id: int) -> bytes:
        data = self._bytes_cache.get(token_id)
        if data is None:
            data = self._bytes_cache[token_id] = self._compute_token_bytes(token_id)
        return data

    def _compute_token_bytes(self, token_id: int) -> bytes:
        piece = self._hf.id_to_token(token_id)
        if piece is None or token_id in self._special_ids:
            return b""
        if self._mode == "byte_level":
            # As the ByteLevel decoder: map every char back to its byte, or keep the token as UTF-8 if one
            # char is not in the table (added tokens with other characters).
            try:
                return bytes(_CHAR_TO_BYTE[c] for c in piece)
            except KeyError:
                return piece.encode("utf-8")
        if self._mode == "spm":
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            return piece.replace("\u2581", " ").encode("utf-8")
        return self._hf.decode([token_id], skip_special_tokens=True).encode("utf-8")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_hf_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError("not a directory", path=path)
        tj_path = path / "tokenizer.json"
        if not present(tj_path):
            if present(path / "tokenizer.model"):
                from ..formats.gguf_tokenizer import gguf_tokenizer_fields
                return cls.from_gguf_metadata({k: v for k, v, _ in gguf_tokenizer_fields(path)},
                                              path=path / "tokenizer.model")
            raise TokenizerError("no tokenizer.json or tokenizer.model", path=path)
        from tokenizers import Tokenizer as HFTokenizer
        raw = read_bounded(tj_path, MAX_TOKENIZER_JSON_BYTES, "tokenizer.json")  # regular, bounded, or refused
        try:
            text = raw.decode("utf-8")
            tj = json.loads(text)
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot load: {str(e)[:300]}", path=tj_path) from None
        if not isinstance(tj, dict):
            raise TokenizerError("cannot load: not a JSON object", path=tj_path)
        tcfg = _read_json_opt(path / "tokenizer_config.json")
        cfg = _read_json_opt(path / "config.json")
        gcfg = _read_json_opt(path / "generation_config.json")

        def token_id(entry) -> int | None:
            text = entry.get("content") if isinstance(entry, dict) else entry
            return hf.token_to_id(text) if isinstance(text, str) else None

        bos_id = token_id(tcfg.get("bos_token"))
        if bos_id is None and isinstance(cfg.get("bos_token_id"), int):
            bos_id = cfg["bos_token_id"]
        eos = [token_id(tcfg.get("eos_token"))]
        for src in (cfg, gcfg):
            v = src.get("eos_token_id")
            eos.extend(v if isinstance(v, list) else [v])
        added = hf.get_added_tokens_decoder()
        eos.extend(i for i, t in sorted(added.items()) if t.special and t.content in EOG_TEXTS)
        eos_ids = [i for i in eos if isinstance(i, int) and 0 <= i < hf.get_vocab_size(True)]

        add_bos = tcfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and _post_processor_first_special(tj) == hf.id_to_token(bos_id)
        add_eos = tcfg.get("add_eos_token") is True

        mode, strip = _decode_mode(tj.get("decoder"))
        return cls(hf, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos, add_eos=add_eos,
                   chat_template=_hf_chat_template(path, tcfg), decode_mode=mode, strip_first_space=strip)

    @classmethod
    def from_gguf_file(cls, path) -> "Tokenizer":
        from ..formats.gguf_file import read_gguf_metadata  # bounded and checked, as open_model reads it
        md = {k: v for k, v in read_gguf_metadata(path).items() if k.startswith("tokenizer.")}
        return cls.from_gguf_metadata(md, path=path)

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, path=None, *, max_vocab: int | None = None) -> "Tokenizer":
        """max_vocab: refuse (before building anything) a vocabulary longer than this, e.g. the embedding."""
        where = f"{path}: " if path is not None else ""
        md = _Meta(metadata, where)
        model = md.str("tokenizer.ggml.model", required=True)
        raw_tokens = metadata.get("tokenizer.ggml.tokens")
        if max_vocab is not None and hasattr(raw_tokens, "__len__") and len(raw_tokens) > max_vocab:
            raise TokenizerError(f"{where}the tokenizer has {len(raw_tokens)} tokens but the embedding table only "
                                 f"{max_vocab} rows")  # before anything is built from them
        tokens = md.str_list("tokenizer.ggml.tokens", required=True)
        n = len(tokens)
        if n == 0:
            raise TokenizerError(f"{where}tokenizer.ggml.tokens is empty")
        for i, t in enumerate(tokens):
            if len(t) > MAX_TOKEN_CHARS:
                raise TokenizerError(f"{where}tokenizer.ggml.tokens[{i}] is {len(t)} characters long, more than the "
                                     f"{MAX_TOKEN_CHARS} a token may have")
        types = md.int_list("tokenizer.ggml.token_type", n)
        if types is None:
            types = [NORMAL] * n
        pre = md.str("tokenizer.ggml.pre") or "default"
        if model == "gpt2":
            hf = _build_byte_level_bpe(tokens, types, md, pre, where)
            mode, strip, default_add_bos = "byte_level", False, pre in LLAMA3_PRE_NAMES
            defaults = {}
        elif model == "llama":
            add_space_prefix = md.bool("tokenizer.ggml.add_space_prefix", True)
            hf = _build_spm(tokens, types, md, add_space_prefix, where)
            mode, strip, default_add_bos = "spm", add_space_prefix, True
            defaults = {"bos": 1, "eos": 2}  # llama.cpp's defaults for SPM vocabularies
        else:
            raise TokenizerError(f"{where}tokenizer.ggml.model {model!r} is not supported (only 'gpt2' byte-level "
                                 f"BPE and 'llama' SentencePiece)")

        def special_id(name: str) -> int | None:
            v = md.int(f"tokenizer.ggml.{name}_token_id")
            v = defaults.get(name) if v is None else v
            if v is not None and not 0 <= v < n:
                raise TokenizerError(f"{where}tokenizer.ggml.{name}_token_id = {v} is outside the vocabulary "
                                     f"of {n} tokens")
            return v

        bos_id = special_id("bos")
        eos_ids = [special_id(k) for k in ("eos", "eot", "eom")]
        eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in EOG_TEXTS]
        return cls(hf, bos_id=bos_id, eos_ids=[i for i in eos_ids if i is not None],
                   add_bos=md.bool("tokenizer.ggml.add_bos_token", default_add_bos),
                   add_eos=md.bool("tokenizer.ggml.add_eos_token", False),
                   chat_template=md.str("tokenizer.chat_template"), decode_mode=mode, strip_first_space=strip)


def load_tokenizer(source: ModelSource) -> Tokenizer | None:
    """The tokenizer of an opened model: from a GGUF's metadata, or from an HF folder's tokenizer.json or
    SentencePiece tokenizer.model. None when the model carries none (then only token ids work)."""
    try:
        if source.format == "gguf":
            if "tokenizer.ggml.tokens" not in source.metadata:
                return None
            tok = Tokenizer.from_gguf_metadata(source.metadata, path=source.path, max_vocab=source.config.vocab_size)
        elif any(present(source.path / name) for name in ("tokenizer.json", "tokenizer.model")):
            tok = Tokenizer.from_hf_dir(source.path)
        else:
            return None
        if tok.vocab_size > source.config.vocab_size:  # ids past the table would read no embedding row
            raise TokenizerError(f"{source.path}: the tokenizer has {tok.vocab_size} tokens but the embedding "
                                 f"table only {source.config.vocab_size} rows")
    except ModelFormatError as e:
        if e.path is None:  # messages name the file already; the attribute says it too
            e.path = str(source.path)
        raise
    return tok


# -------------------------------------------------------------------- GGUF vocab -> tokenizers
def _vocab_and_added(tokens, types, where):
    from tokenizers import AddedToken
    vocab: dict[str, int] = {}
    dups = 0
    for i, t in enumerate(tokens):
        dups += t in vocab
        vocab[t] = i  # llama.cpp's token_to_id map: the last id of a repeated text wins
    if dups:
        warnings.warn(f"{where}{dups} repeated token texts in tokenizer.ggml.tokens; the last id of each is used")
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, UNKNOWN, USER_DEFINED) and vocab[t] == i and t:
            added.append(AddedToken(t, special=ty != USER_DEFINED, normalized=False))
    return vocab, added


def _build_byte_level_bpe(tokens, types, md, pre, where):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    raw = md.str_list("tokenizer.ggml.merges", required=True)
    merges = []
    for k, m in enumerate(raw):
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(f"{where}tokenizer.ggml.merges[{k}] = {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    vocab, added = _vocab_and_added(tokens, types, where)
    for k, (a, b) in enumerate(merges):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise TokenizerError(f"{where}tokenizer.ggml.merges[{k}] = {a + ' ' + b!r} uses or makes a token "
                                 f"that is not in tokenizer.ggml.tokens")
    regex = PRE_REGEXES.get(pre)
    if regex is None:
        warnings.warn(f"{where}unknown tokenizer.ggml.pre {pre!r}; splitting text with GPT-2's regex, which may "
                      f"not match the model's own tokenizer")
        regex = GPT2_REGEX
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRE_NAMES))
    except Exception as e:
        raise TokenizerError(f"{where}cannot build the BPE tokenizer: {e}") from e
    if pre in NFC_PRE_NAMES:
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_tokens(added)
    return hf


def _spm_merges(tokens, types, scores):
    """BPE merges equivalent to SentencePiece/llama.cpp's 'merge the pair making the best-scoring token'.

    Every normal token that splits into two normal tokens gives a merge ranked by its score (ties: lower
    token id first, then the ids of the halves), as HF's LlamaConverter orders them."""
    ids = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL}
    ranked = []
    for piece, pid in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = ids.get(left), ids.get(right)
            if li is not None and ri is not None:
                ranked.append((-scores[pid], pid, li, ri, left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _build_spm(tokens, types, md, add_space_prefix, where):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers
    scores = md.float_list("tokenizer.ggml.scores", len(tokens), required=True)
    vocab, added = _vocab_and_added(tokens, types, where)
    unk = next((t for t, ty in zip(tokens, types) if ty == UNKNOWN), None)
    if not any(ty == BYTE for ty in types):
        warnings.warn(f"{where}SentencePiece vocabulary has no byte tokens; characters outside it become "
                      f"{unk or 'nothing'}")
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, types, scores), unk_token=unk,
                                    fuse_unk=True, byte_fallback=True))
    except Exception as e:
        raise TokenizerError(f"{where}cannot build the SentencePiece tokenizer: {e}") from e
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    hf.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    hf.add_tokens(added)
    return hf


class _Meta:
    """Typed, checked access to GGUF metadata values."""

    def __init__(self, metadata: dict, where: str):
        self.md, self.where = metadata, where

    def _get(self, key, required):
        v = self.md.get(key)
        if v is None and required:
            raise TokenizerError(f"{self.where}GGUF metadata has no {key}")
        return v

    def _bad(self, key, what, v):
        return TokenizerError(f"{self.where}GGUF metadata {key} should be {what}, got {type(v).__name__}")

    def str(self, key, required=False):
        v = self._get(key, required)
        if isinstance(v, (bytes, bytearray)):
            v = bytes(v).decode("utf-8", errors="replace")
        if v is not None and not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def int(self, key):
        v = self._get(key, False)
        if v is None:
            return None
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, "an integer", v)
        return v

    def bool(self, key, default):
        v = self._get(key, False)
        if v is None:
            return default
        if hasattr(v, "item"):
            v = v.item()
        if not isinstance(v, (bool, int)):
            raise self._bad(key, "a bool", v)
        return bool(v)

    def _list(self, key, required):
        v = self._get(key, required)
        if v is None:
            return None
        if hasattr(v, "tolist"):
            v = v.tolist()
        if not isinstance(v, (list, tuple)):
            raise self._bad(key, "an array", v)
        return list(v)

    def str_list(self, key, required=False):
        v = self._list(key, required)
        if v is None:
            return None
        out = []
        for x in v:
            if isinstance(x, (bytes, bytearray)):
                x = bytes(x).decode("utf-8", errors="replace")
            if not isinstance(x, str):
                raise self._bad(key, "an array of strings", x)
            out.append(x)
        return out

    def _num_list(self, key, n, required, kind, what):
        v = self._list(key, required)
        if v is None:
            return None
        if len(v) != n:
            raise TokenizerError(f"{self.where}GGUF metadata {key} has {len(v)} entries but tokenizer.ggml.tokens "
                                 f"has {n}")
        try:
            return [kind(x) for x in v]
        except (TypeError, ValueError):
            raise TokenizerError(f"{self.where}GGUF metadata {key} should be {what}") from None

    def int_list(self, key, n, required=False):
        return self._num_list(key, n, required, int, "an array of integers")

    def float_list(self, key, n, required=False):
        return self._num_list(key, n, required, float, "an array of numbers")


# -------------------------------------------------------------------- HF folder helpers
def _read_json_opt(path: Path) -> dict:
    if not present(path):
        return {}
    raw = read_bounded(path, MAX_JSON_BYTES)
    try:
        v = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise TokenizerError(f"cannot read JSON: {str(e)[:200]}", path=path) from None
    return v if isinstance(v, dict) else {}


def _post_processor_first_special(tj: dict) -> str | None:
    """The special token a TemplateProcessing post-processor puts first, if any (how HF adds BOS)."""
    pp = tj.get("post_processor") or {}
    for p in pp.get("processors", [pp]):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if len(single) > 1 and "SpecialToken" in single[0]:
                return single[0]["SpecialToken"].get("id")
    return None


def _decode_mode(decoder) -> tuple[str, bool]:
    """('byte_level' | 'spm' | 'text', strips one leading space) from a tokenizer.json decoder."""
    steps = (decoder or {}).get("decoders") if (decoder or {}).get("type") == "Sequence" else [decoder or {}]
    kinds = [s.get("type") for s in steps]
    if "ByteLevel" in kinds:
        return "byte_level", False
    strip = any(s.get("type") == "Strip" and s.get("content") == " " and s.get("start", 0) >= 1 for s in steps)
    if "ByteFallback" in kinds or "Metaspace" in kinds:
        metaspace = [s for s in steps if s.get("type") == "Metaspace"]
        if metaspace and metaspace[0].get("prepend_scheme", "always") != "never":
            strip = True
        return "spm", strip
    return "text", False


def _hf_chat_template(path: Path, tcfg: dict) -> str | None:
    tmpl = tcfg.get("chat_template")
    if tmpl is None and present(path / "chat_template.jinja"):
        raw = read_bounded(path / "chat_template.jinja", MAX_TEMPLATE_BYTES)
        try:
            tmpl = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TokenizerError(f"cannot read the chat template: {e}", path=path / "chat_template.jinja") from None
    if tmpl is None and present(path / "chat_template.json"):
        tmpl = _read_json_opt(path / "chat_template.json").get("chat_template")
    if isinstance(tmpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default", next(iter(named.values()), None))
    return tmpl if isinstance(tmpl, str) else None
