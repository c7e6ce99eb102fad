"""Hostile config values (config.json, GGUF metadata, tokenizer files) give a ModelFormatError naming the file,
the key and the value: never a bare TypeError/OverflowError, never a model that loads and then computes NaN."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from realizar_jax.config import MAX_SIZE, ModelConfig, RopeScaling
from realizar_jax.errors import DamagedFileError, ModelFormatError, TokenizerError
from realizar_jax.formats import open_model
from realizar_jax.formats.gguf_file import config_from_gguf
from realizar_jax.text.tokenizer import load_tokenizer

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _copy(folder, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    return dst


def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))  # allow_nan: writes NaN / Infinity, which Python's json reads back


def _rope(**scaling):
    def edit(cfg):
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = scaling
    return edit


def _set(**changes):
    return lambda cfg: cfg.update(changes)


HF_CASES = [
    (_set(rms_norm_eps=10**400), r"rms_norm_eps = 1000.* must be a finite number > 0"),
    (_set(rms_norm_eps=math.inf), "rms_norm_eps = inf must be a finite"),
    (_set(rms_norm_eps=math.nan), "rms_norm_eps = nan must be a finite"),
    (lambda c: (_rope()(c), c.update(rope_theta=10**400)), r"rope_theta = 1000.* must be a finite"),
    (lambda c: (_rope()(c), c.update(rope_theta=math.inf)), "rope_theta = inf must be a finite"),
    (lambda c: (_rope()(c), c.update(rope_theta=math.nan)), "rope_theta = nan must be a finite"),
    (lambda c: (c.pop("model_type"), c.update(architectures={"LlamaForCausalLM": 1})), r'architectures = \{"Llama.* must be a list of strings'),
    (lambda c: (c.pop("model_type"), c.update(architectures=5)), "architectures = 5 must be a list of strings"),
    (_rope(**{**LLAMA3, "original_max_position_embeddings": math.inf}),
     "rope_scaling.original_max_position_embeddings = inf must be an integer"),
    (_rope(**{**LLAMA3, "original_max_position_embeddings": 0}), "original_max_position_embeddings = 0 must"),
    (_rope(**{**LLAMA3, "factor": math.inf}), "rope_scaling.factor = inf must be a finite"),
    (_rope(**{**LLAMA3, "factor": 0}), "rope_scaling.factor = 0 must be a finite"),
    (_rope(**{**LLAMA3, "factor": -2.0}), r"rope_scaling.factor = -2.0 must be a finite"),
    (_rope(**{**LLAMA3, "low_freq_factor": 4.0}), r"high_freq_factor = 4.0 must be greater than low_freq_factor"),
    (_rope(type="linear", factor=0), "rope_scaling.factor = 0 must be a finite"),
    (_rope(type="linear", factor=math.nan), "rope_scaling.factor = nan must be a finite"),
    (_rope(type="linear"), "has no factor"),
    (_set(hidden_size=0, intermediate_size=10**30), "hidden_size = 0 must be an integer in 1..16777216"),
    (_set(intermediate_size=10**99), r"intermediate_size = 1000.* must be an integer in"),
    (_set(num_attention_heads=10**99, hidden_size=10**99), r"hidden_size = 1000.* must be an integer in"),
    (_set(max_position_embeddings=2**63), "max_position_embeddings = 9223372036854775808 must be an integer"),
    (_set(max_position_embeddings=True), "max_position_embeddings = True must be an integer"),
    (_set(num_key_value_heads=3), "num_key_value_heads = 3 must divide num_heads"),
]


@pytest.mark.parametrize("edit,message", HF_CASES, ids=[f"hf{i}" for i in range(len(HF_CASES))])
def test_hostile_config_json_values(model_files, tmp_path, edit, message):
    folder = _copy(model_files.hf("llama"), tmp_path)
    _edit_json(folder / "config.json", edit)
    with pytest.raises(DamagedFileError, match=message) as info:
        open_model(folder)
    assert info.value.path == str(folder / "config.json")


def test_context_bound_is_documented_and_inclusive():
    base = dict(architecture="llama", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=4, intermediate_size=8)
    assert ModelConfig(**base, context_length=MAX_SIZE).context_length == 2**24
    with pytest.raises(ValueError, match="context_length"):
        ModelConfig(**base, context_length=MAX_SIZE + 1)
    assert RopeScaling("linear", factor=2).factor == 2.0 and isinstance(RopeScaling("linear", 2).factor, float)


@pytest.fixture(scope="module")
def llama3_gguf(model_files):
    return open_model(model_files.gguf("llama3", "f32"))


GGUF_CASES = [
    ("llama.attention.layer_norm_rms_epsilon", math.inf, "layer_norm_rms_epsilon = inf must be a finite"),
    ("llama.attention.layer_norm_rms_epsilon", math.nan, "layer_norm_rms_epsilon = nan must be a finite"),
    ("llama.rope.freq_base", math.inf, "llama.rope.freq_base = inf must be a finite"),
    ("llama.rope.freq_base", 0.0, "llama.rope.freq_base = 0.0 must be a finite"),
    ("llama.context_length", 2**63, "llama.context_length = 9223372036854775808 must be an integer in"),
    ("llama.feed_forward_length", 2**60, "llama.feed_forward_length = 1152921504606846976 must be"),
    ("realizar.rope.scaling.factor", math.nan, "realizar.rope.scaling.factor = nan must be a finite"),
    ("realizar.rope.scaling.original_context_length", 0, "original_context_length = 0 must be an integer"),
]


@pytest.mark.parametrize("key,value,message", GGUF_CASES, ids=[f"{c[0]}={c[1]}" for c in GGUF_CASES])
def test_hostile_gguf_metadata_values(llama3_gguf, key, value, message):
    src = llama3_gguf
    with pytest.raises(DamagedFileError, match=message) as info:
        config_from_gguf({**src.metadata, key: value}, src.tensors, src.path)
    assert info.value.path == str(src.path)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_gguf_rope_freqs_must_be_finite_positive(llama3_gguf, bad):
    src = llama3_gguf
    freqs = np.array(src.tensors["rope_freqs.weight"].data, np.float32)
    freqs[3] = bad
    tensors = {**src.tensors, "rope_freqs.weight": dataclasses.replace(src.tensors["rope_freqs.weight"], data=freqs)}
    with pytest.raises(DamagedFileError, match=r"rope_freqs.weight\[3\] = .* must be finite and > 0"):
        config_from_gguf(src.metadata, tensors, src.path)
    linear = {**src.metadata, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    with pytest.raises(DamagedFileError):  # checked whatever the scaling type says
        config_from_gguf(linear, tensors, src.path)


def _no_config_ids(cfg):
    cfg.pop("bos_token_id", None)
    cfg.pop("eos_token_id", None)


@pytest.mark.parametrize("edit", [
    lambda tj: tj.update(added_tokens="<s>"),
    lambda tj: tj.update(added_tokens=[1, 2]),
    lambda tj: tj["model"].update(vocab=list(tj["model"]["vocab"])),
    lambda tj: tj.update(model="BPE", post_processor={"type": "TemplateProcessing", "single": [5]}),
], ids=["added_str", "added_ints", "bpe_vocab_list", "model_str"])
def test_hostile_tokenizer_json(model_files, tmp_path, edit):
    """config.json reads tokenizer.json (for BOS/EOS) before the tokenizers library checks it: no crash there,
    then the library's refusal is a TokenizerError (a ModelFormatError) naming the file."""
    folder = _copy(model_files.hf("llama"), tmp_path)
    _edit_json(folder / "config.json", _no_config_ids)
    _edit_json(folder / "tokenizer.json", edit)
    source = open_model(folder)
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot load") as info:
        load_tokenizer(source)
    assert isinstance(info.value, ModelFormatError)


def test_unigram_vocab_list_is_valid(model_files, tmp_path):
    from tokenizers import Tokenizer, models
    folder = _copy(model_files.hf("llama"), tmp_path)
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(c, -1.0 - i) for i, c in enumerate("abcdefgh ")]
    Tokenizer(models.Unigram(pieces, unk_id=0)).save(str(folder / "tokenizer.json"))
    _edit_json(folder / "config.json", _no_config_ids)
    _edit_json(folder / "tokenizer_config.json", lambda t: t.update(bos_token="<s>", eos_token="</s>"))
    source = open_model(folder)
    assert (source.config.bos_token_id, source.config.eos_token_ids) == (1, (2,))
    assert load_tokenizer(source).encode("abc", add_bos=False)


def test_tokenizer_longer_than_embedding(model_files, tmp_path):
    folder = _copy(model_files.hf("llama"), tmp_path)
    n = open_model(folder).config.vocab_size
    _edit_json(folder / "tokenizer.json", lambda tj: tj["added_tokens"].append(
        {"id": n, "content": "<extra>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}))
    with pytest.raises(TokenizerError, match=f"tokenizer has {n + 1} tokens but the embedding table only {n} rows"):
        load_tokenizer(open_model(folder))


def test_chat_template_not_utf8(model_files, tmp_path):
    folder = _copy(model_files.hf("llama"), tmp_path)
    _edit_json(folder / "tokenizer_config.json", lambda t: t.pop("chat_template", None))
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    source = open_model(folder)
    with pytest.raises(TokenizerError, match="chat_template.jinja: cannot read the chat template"):
        load_tokenizer(source)
    (folder / "tokenizer_config.json").write_bytes(b'{"chat_template": "\xff\xfe"}')
    with pytest.raises(DamagedFileError, match="tokenizer_config.json is not valid JSON") as info:
        open_model(folder)
    assert info.value.path == str(folder / "tokenizer_config.json")


@pytest.fixture
def spm_folder(model_files, tmp_path):
    """The llama fixture with a SentencePiece tokenizer.model instead of tokenizer.json."""
    from hostile_inputs import spm_model_bytes
    folder = _copy(model_files.hf("llama"), tmp_path)
    (folder / "tokenizer.json").unlink()
    pieces = ([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
              + [(c, -1.0, 1) for c in "abcdefgh"])
    (folder / "tokenizer.model").write_bytes(spm_model_bytes(pieces))
    return folder


def test_sentencepiece_folder_chat_template_not_utf8(spm_folder):
    """Found by the slow fuzz: gguf's SpecialVocab read chat_template.jinja itself and let UnicodeDecodeError out."""
    _edit_json(spm_folder / "tokenizer_config.json", lambda t: t.pop("chat_template", None))
    (spm_folder / "chat_template.jinja").write_bytes(b"\x80{{ messages }}")
    with pytest.raises(TokenizerError, match="chat_template.jinja: cannot read the chat template"):
        load_tokenizer(open_model(spm_folder))


@pytest.mark.parametrize("named", [[None], [{"name": 1, "template": "x"}], [{"name": "default"}],
                                   [{"name": "default", "template": "T {{ messages }}"}, 5, "x"]])
def test_sentencepiece_folder_malformed_named_chat_templates(spm_folder, named):
    """Found by the slow fuzz: gguf-py's writer took every entry of a named-template list as a dict of strings
    (AttributeError on [None]). Malformed entries are skipped, as the tokenizer.json path does."""
    _edit_json(spm_folder / "tokenizer_config.json", lambda t: t.update(chat_template=named))
    tok = load_tokenizer(open_model(spm_folder))
    assert tok.chat_template == ("T {{ messages }}" if len(named) == 3 else None)


@pytest.mark.parametrize("where", ["added_tokens.json", "tokenizer_config.json"])
def test_added_token_with_a_lone_surrogate(spm_folder, where):
    """Found by the fuzz: JSON's "\\ud800" is a lone surrogate, which the tokenizers library cannot encode."""
    if where == "added_tokens.json":
        (spm_folder / where).write_text('{"\\ud800x": 11}')
    else:
        _edit_json(spm_folder / where, lambda t: t.update(added_tokens_decoder={"11": {"content": "\ud800"}}))
    with pytest.raises(TokenizerError, match=f"{where}: .*lone surrogate"):
        load_tokenizer(open_model(spm_folder))


def test_gguf_linear_factor_zero_or_nan(llama3_gguf):
    src = llama3_gguf
    tensors = {k: v for k, v in src.tensors.items() if k != "rope_freqs.weight"}
    for bad in (0.0, math.nan):
        meta = {**src.metadata, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": bad}
        with pytest.raises(DamagedFileError, match=f"llama.rope.scaling.factor = {bad} must be a finite"):
            config_from_gguf(meta, tensors, src.path)


CONFIG_KEYS = ["rms_norm_eps", "rope_theta", "hidden_size", "num_attention_heads", "num_key_value_heads",
               "num_hidden_layers", "intermediate_size", "head_dim", "max_position_embeddings", "vocab_size",
               "architectures", "model_type", "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id",
               "tie_word_embeddings", "attention_bias"]


def _values():
    from hypothesis import strategies as st
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 2**63, 10**400])
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
    rope = st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "llama3", "default", 5])},
                                 optional={k: scalars for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                                "original_max_position_embeddings", "rope_theta")})
    return scalars | rope | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)


def test_fuzzed_config_values_give_only_model_format_errors(model_files, tmp_path):
    """Any value at any key config.json's reader uses: the folder opens or a ModelFormatError names config.json."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    folder = _copy(model_files.hf("llama"), tmp_path)
    original = json.loads((folder / "config.json").read_text())

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.sampled_from(CONFIG_KEYS), _values(), min_size=1, max_size=3))
    def check(changes):
        (folder / "config.json").write_text(json.dumps({**original, **changes}))
        try:
            config = open_model(folder).config
        except ModelFormatError as e:
            assert str(folder) in str(e)
            return
        assert math.isfinite(config.norm_eps) and math.isfinite(config.rope_theta)
        assert config.context_length <= MAX_SIZE

    check()


@pytest.mark.parametrize("file,key,value,message", [
    ("config.json", "tie_word_embeddings", "false", 'tie_word_embeddings = "false" must be true or false'),
    ("config.json", "attention_bias", 1, "attention_bias = 1 must be true or false"),
    ("config.json", "rope_scaling", [1, 2], r"rope_scaling = \[1, 2\] must be an object"),
    ("config.json", "rope_parameters", "linear", 'rope_parameters = "linear" must be an object'),
    ("config.json", "num_hidden_layers", [2], r"num_hidden_layers = \[2\] must be an integer"),
    ("config.json", "hidden_size", "256", "hidden_size = '256' must be an integer"),
    ("config.json", "bos_token_id", "0", 'bos_token_id = "0" must be an integer'),
    ("config.json", "eos_token_id", [2, "x"], r'eos_token_id = \[2, "x"\] must be an integer or a list'),
    ("config.json", "eos_token_id", 10**6, "eos_token_id = 1000000 must be a token id in 0..700"),
    ("generation_config.json", "eos_token_id", 2.0, "eos_token_id = 2.0 must be an integer or a list"),
    ("tokenizer_config.json", "add_bos_token", "yes", 'add_bos_token = "yes" must be true or false'),
    ("tokenizer_config.json", "bos_token", 5, "bos_token = 5 must be a string or an object"),
])
def test_wrong_json_type_names_the_key(model_files, tmp_path, file, key, value, message):
    folder = _copy(model_files.hf("llama"), tmp_path)
    if not (folder / file).is_file():
        (folder / file).write_text("{}")
    _edit_json(folder / file, _set(**{key: value}))
    with pytest.raises(DamagedFileError, match=message) as info:
        open_model(folder)
    expected = folder / ("config.json" if "must be a token id" in message else file)
    assert info.value.path == str(expected)


def test_tied_embeddings_beside_an_lm_head(model_files, tmp_path):
    """Decision: a byte copy of the embedding is accepted (tied; the copy is dropped), a different lm_head.weight
    is refused naming it -- the file means two different models to transformers and to other tools."""
    from safetensors.numpy import load_file, save_file
    folder = _copy(model_files.hf("llama"), tmp_path)
    _edit_json(folder / "config.json", _set(tie_word_embeddings=True))
    with pytest.raises(DamagedFileError, match="tie_word_embeddings=true.*differs") as info:
        open_model(folder)
    assert info.value.tensor == "lm_head.weight"
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, folder / "model.safetensors")
    source = open_model(folder)
    assert source.config.tie_embeddings and "lm_head.weight" not in source.tensors


def test_fifo_config_on_the_real_cli(model_files, tmp_path):
    """`realizar-jax inspect` on a FIFO config.json, as a user runs it: one error line, exit 1, no traceback."""
    import os
    import subprocess
    import sys
    folder = _copy(model_files.hf("llama"), tmp_path)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    run = subprocess.run([sys.executable, "-c", "import sys; from realizar_jax.cli.main import main; "
                          "sys.exit(main(sys.argv[1:]))", "inspect", str(folder)],
                         capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parent.parent))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"realizar-jax inspect: error: {folder / 'config.json'}: config.json is a FIFO, not a regular file"]
