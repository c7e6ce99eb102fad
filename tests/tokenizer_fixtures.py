"""Tiny real tokenizers trained offline, saved as HF model folders (tokenizer files only).

* `make_bpe_dir(path, style)`: a byte-level BPE trained with `tokenizers`, pre-tokenized like
  Llama 3 ('llama3'), Qwen2 ('qwen2', with its NFC normaliser), GPT-2 ('gpt2') or o200k ('o200k', gpt-oss's
  split, adding nothing); special tokens '<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>' and a non-special added token; Llama 3's
  post-processor adds BOS, the others add nothing (as Qwen2 does).
* `make_spm_dir(path)`: a SentencePiece BPE model with byte fallback trained with the `sentencepiece`
  trainer using Llama 2's settings (identity normalisation, dummy prefix, digits split, whitespace kept),
  saved as tokenizer.model + tokenizer_config.json.

Training takes about a second each. The text is hand-written plus Python stdlib source, so the
vocabularies hold code, English, a little of other scripts; the rest of Unicode goes to bytes.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPM_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                     "{% endfor %}")

PROSE = """\
The quick brown fox jumps over the lazy dog. It's 2024, and we've got 1234567 reasons (maybe 89.5%) to test.
Don't stop: she'll say "I'd rather not", they're sure we're right, you'll see.
Numbers: 0 1 12 123 1234 12345 3.14159 2.71828 1e-10 0x1F 0b1011 -42 +7 1,000,000.
Café naïve résumé façade coöperate über Straße Ærø smörgåsbord jalapeño piñata.
Привет, как дела? Всё хорошо, спасибо. Ελληνικά γράμματα και λέξεις.
日本語のテキストと中文文本。你好，世界！こんにちは世界。한국어 텍스트입니다.
مرحبا بالعالم. שלום עולם. नमस्ते दुनिया. สวัสดีชาวโลก.
Emoji: 😀 😃 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 🎉🎉🎉
	Tabs	and    multiple     spaces, trailing spaces   
and blank lines


def main(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            print(f"option {i}: {arg!r}")
    return 0
"""


def training_text() -> list[str]:
    """A few hundred KB of lines: PROSE repeated plus the source of a handful of stdlib modules."""
    import argparse, json as _json, textwrap, string, difflib, fractions  # noqa: E401
    lines = PROSE.splitlines() * 20
    for mod in (argparse, _json.decoder, textwrap, string, difflib, fractions):
        lines.extend(inspect.getsource(mod).splitlines())
    return [ln for ln in lines if ln.strip()] + ["", "  ", "\t\t"]


BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
USER_TOKEN = "<tool>"  # an added token that is not special (llama.cpp: USER_DEFINED)


def make_bpe_dir(path, style: str = "llama3", vocab_size: int = 700) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    from realizar_jax.formats.gguf_tokenizer import GPT4O_REGEX, LLAMA3_REGEX, QWEN2_REGEX

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(ignore_merges=(style == "llama3")))
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX, "o200k": GPT4O_REGEX}[style]
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_tokens([AddedToken(USER_TOKEN, normalized=False, special=False)])
    bos, eos = BPE_SPECIALS[0], BPE_SPECIALS[1]
    if style == "llama3":
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": bos, "eos_token": BPE_SPECIALS[2] if style == "llama3" else eos,
           "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
           "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if style in ("qwen2", "o200k"):
        cfg["add_bos_token"] = False
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return path


def make_spm_dir(path, vocab_size: int = 600) -> Path:
    import io

    import sentencepiece as spm

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
        max_sentence_length=100000, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
           "add_eos_token": False, "chat_template": SPM_CHAT_TEMPLATE, "legacy": True,
           "tokenizer_class": "LlamaTokenizer", "model_max_length": 4096}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return path


HARD_TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a", " a", "a ", "  a  b   c    ",
    "Hello world", " Hello world", "Hello  world", "Hello\nworld\n", "Hello\r\nworld\r\n",
    "The quick brown fox jumps over the lazy dog.", "It's we've they're I'd you'll SHE'S 'S",
    "1 12 123 1234 12345 123456789 3.14159 1e-10 0x1F -42", "٣٤٥ ① Ⅻ ½ ²³",
    "Café naïve résumé Straße ß ẞ ﬁ ﬀ Å Å é é", "Привет мир", "日本語のテキスト", "你好，世界！",
    "한국어", "مرحبا بالعالم", "नमस्ते", "สวัสดี",
    "😀👍🏽👨‍👩‍👧‍👦🏳️‍🌈❤️🇫🇷", "emoji 👨‍👩‍👧‍👦 in text 🎉🎉", "\u200b\u200d\ufeff zero width",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b) { c[i] = d->e; }\t// done",
    "<|begin_of_text|>hi<|eot_id|>", "a <tool> b <tool>", "<s> </s> <unk> <0x41>",
    "<|end_of_text|><|end_of_text|>", "\x00\x01\x7f", "\U0010ffff\ue000", "a" * 300, " " * 50,
    "ſ 'ſ 'S 'Ş", "   leading and trailing   ", "line\n\n  indented\n\tTabbed",
]

# Text that stresses pre-tokenisers: whitespace runs, digits, contractions, scripts, emoji with ZWJ/modifiers.
_TRICKY = list(" \t\n\r  0123456789'sSdtTmll.,;:!?()[]{}<>=+-*/\\\"#_`~") + list(
    "aZéßſİıﬁÅ\u0301\u0308ñЖжλ日本語中文字한국ㄱあア٣١ह्िา\u200b\u200c\u200d\ufe0f\U0001F600\U0001F468"
    "\U0001F469\U0001F467\U0001F3FD\U0001F1EB\U0001F1F7\u2764\U0010FFFF\x00\x7f\u2581▁Ġ")


def hard_text_strategy():
    """Hypothesis strategy for text that stresses tokenizers."""
    from hypothesis import strategies as st
    return st.one_of(
        st.text(max_size=80),
        st.text(alphabet=_TRICKY, max_size=80),
        st.lists(st.sampled_from(HARD_TEXTS[:-12]), max_size=6).map("".join),
    )
