"""The engine's drivers (generate / logits / batching / compilation) on models built in memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from realizar_jax.engine import Model

from model_helpers import config_from_hf, hf_logits, params_from_hf, tiny_hf_model


@pytest.fixture(scope="module")
def pair():
    hf = tiny_hf_model("llama", vocab=101, seed=3)
    config = config_from_hf(hf, "llama")
    model = Model(config, params_from_hf(hf, config), None, dtype=jnp.float32, max_seq_len=160)
    return hf, model


def test_logits_every_position_equal_hf(pair):
    hf, model = pair
    ids = list(np.random.default_rng(5).integers(0, 101, 19))
    ref = hf_logits(hf, ids)
    assert np.abs(model.logits(ids) - ref).max() / np.abs(ref).max() <= 1e-4


def test_greedy_generate_equals_hf_generate(pair):
    hf, model = pair
    ids = [int(i) for i in np.random.default_rng(9).integers(0, 101, 7)]
    ours = model.generate(ids, max_new_tokens=20, temperature=0).tokens
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert ours == ref


def test_batch_rows_equal_rows_alone(pair):
    _, model = pair
    rng = np.random.default_rng(11)
    prompts = [[int(i) for i in rng.integers(0, 101, n)] for n in (3, 12, 8)]
    batch = model.generate(prompts, max_new_tokens=12)
    for p, g in zip(prompts, batch):
        assert g.tokens == model.generate(p, max_new_tokens=12).tokens


def test_seed_determinism_and_variety(pair):
    _, model = pair
    ids = [5, 17, 42]
    kw = dict(max_new_tokens=24, temperature=1.5, top_k=50)
    a = model.generate(ids, seed=1, **kw).tokens
    assert a == model.generate(ids, seed=1, **kw).tokens
    assert any(model.generate(ids, seed=s, **kw).tokens != a for s in (2, 3, 4))


def test_decode_and_same_bucket_prefill_compile_nothing_new(pair):
    _, warm = pair
    model = Model(warm.config, warm.params, None, dtype=jnp.float32, max_seq_len=160)  # nothing compiled yet
    compiles = []
    listener = lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        model.generate([1, 2, 3, 4, 5], max_new_tokens=8, temperature=0.7, top_p=0.9)  # warm: compiles
        # the decode chunk's static variants (greedy / sampling, penalties or not) compile once each
        model.generate([1, 2, 3], max_new_tokens=8, temperature=0.0, repetition_penalty=1.1)
        model.generate([1, 2, 3], max_new_tokens=8, temperature=0.5, repetition_penalty=1.1)
        model.generate([1, 2, 3], max_new_tokens=8, temperature=0.0)
        before = len(compiles)
        assert before > 0  # the listener does see compilations
        # 100+ decode steps, a different prompt length in the same bucket (<= 16), other sampling values:
        model.generate([7] * 11, max_new_tokens=104, temperature=0.3, top_k=5, top_p=0.5, repetition_penalty=1.3)
        model.generate([9, 8, 7], max_new_tokens=9, temperature=0.0)
        assert len(compiles) == before, compiles[before:]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_bad_arguments_raise_clear_errors(pair):
    _, model = pair
    with pytest.raises(ValueError, match="out of range"):
        model.generate([1, 500], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([1] * 150, max_new_tokens=20)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([1, 2], max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate("text needs a tokenizer", max_new_tokens=2)


def _hf_perplexity(hf, ids, window, stride):
    """HF's sliding-window perplexity recipe, in torch."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_len = end - max(prev_end, begin + 1) if begin == 0 else end - prev_end
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for pos in range(end - target_len, end):
            nll -= float(logp[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return float(np.exp(nll / count))


@pytest.mark.parametrize("window,stride", [(64, 64), (24, 10)])
def test_perplexity_equals_hf_sliding_window(pair, window, stride):
    hf, model = pair
    ids = [int(i) for i in np.random.default_rng(13).integers(0, 101, 57)]
    ours = model.perplexity(ids, stride=stride, window=window)
    assert ours == pytest.approx(_hf_perplexity(hf, ids, window, stride), rel=1e-4)


def test_public_signatures_show_every_knob():
    """help(rj.load) / help(m.stream) show real signatures, not **kwargs."""
    import inspect

    import realizar_jax as rj
    load = inspect.signature(rj.load).parameters
    for name in ("dtype", "max_seq_len", "kv_dtype", "batch", "check_memory", "progress", "int8_activations",
                 "kernels"):
        assert name in load, name
    stream = inspect.signature(Model.stream).parameters
    assert list(stream) == list(inspect.signature(Model.generate).parameters)
    chat = inspect.signature(Model.chat).parameters
    assert [p for p in chat if p not in ("messages", "stream")] == [p for p in stream if p != "prompt"]
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in (*load.values(), *stream.values(), *chat.values()))


def test_max_seq_len_beyond_the_context_warns(model_files):
    import realizar_jax as rj
    path = model_files.gguf("llama", "f16")
    context = rj.load(path, max_seq_len=16).config.context_length
    with pytest.warns(UserWarning, match="beyond the model's context length"):
        m = rj.load(path, max_seq_len=context + 1)
    assert m.max_seq_len == context + 1


@pytest.fixture(scope="module")
def embedded():
    import realizar_jax as rj
    return rj.load(rj.default_model_path(), dtype="float32", max_seq_len=128)


def test_a_stop_string_across_tokens_never_leaks_and_ends_the_run(embedded):
    """A stop string that spans two tokens: generate() and the joined stream() both end right before
    it, and decoding stops there (fewer tokens than max_new_tokens)."""
    m, prompt, n = embedded, "def fibonacci(n):", 48
    full = m.generate(prompt, max_new_tokens=n)
    text, bounds, dec = "", [], m.tokenizer.stream_decoder()
    for tok in full.tokens:   # where each token's text ends: the token boundaries inside the text
        text += dec.push(tok)
        bounds.append(len(text))
    cut = next(b for b in bounds[4:-4] if 0 < b < len(text) - 1 and text.find(text[b - 1:b + 1]) == b - 1)
    stop = text[cut - 1:cut + 1]   # its last character ends one token's text, its second starts the next
    g = m.generate(prompt, max_new_tokens=n, stop=[stop])
    assert g.text == text[:cut - 1] and g.finish_reason == "stop"
    assert "".join(m.stream(prompt, max_new_tokens=n, stop=[stop])) == g.text
    assert len(g.tokens) < len(full.tokens)   # the run ended at the stop, not at max_new_tokens


def test_no_seed_is_fresh_randomness_a_seed_repeats(embedded):
    kw = dict(max_new_tokens=12, temperature=1.5)
    runs = {tuple(embedded.generate("import os\n", **kw).tokens) for _ in range(4)}
    assert len(runs) > 1
    assert embedded.generate("import os\n", seed=5, **kw).tokens == embedded.generate("import os\n", seed=5, **kw).tokens


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompt=[1.0, 2.0]), TypeError, "token ids must be integers, got float"),
    (dict(prompt=[True, 2]), TypeError, "token ids must be integers, got bool"),
    (dict(prompt=5), TypeError, "prompt must be"),
    (dict(prompt=[]), TypeError, "prompt must be"),
    (dict(max_new_tokens="8"), TypeError, "max_new_tokens must be an integer, got str"),
    (dict(max_new_tokens=None), TypeError, "max_new_tokens must be an integer"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer, got float"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be in"),
    (dict(seed=2**64), ValueError, "seed must be in"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed="1"), TypeError, "seed must be an integer"),
    (dict(stop=5), TypeError, "stop must be a string or a list of strings"),
    (dict(stop=["a", 3]), TypeError, "stop must be a string or a list of strings"),
    (dict(top_k=2**32 + 1), ValueError, "top_k must be below 2\\*\\*31"),
    (dict(stop_token_ids=[10**6]), ValueError, "stop_token_ids must be in"),
])
def test_generation_arguments_are_checked_by_name(pair, kwargs, error, match):
    _, model = pair
    kw = dict(prompt=[1, 2, 3], max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        model.generate(**kw)
    with pytest.raises(error, match=match):   # stream() checks the same, on its first piece at the latest
        list(model.stream(**kw)) if model.tokenizer is not None else model.generate(**kw)
    assert model.generate([1, 2, 3], max_new_tokens=2).tokens   # and the model still works


def test_text_prompts_must_be_valid_unicode(embedded):
    with pytest.raises(ValueError, match="not valid Unicode"):
        embedded.generate("def f(x):\ud800", max_new_tokens=2)


def test_load_arguments_are_checked(model_files):
    import realizar_jax as rj
    path = model_files.gguf("llama", "f16")
    for bad in (0, -3, 2.5, "16"):
        with pytest.raises(ValueError, match="max_seq_len must be a positive integer"):
            rj.load(path, max_seq_len=bad)
    with pytest.raises(ValueError, match="kv_dtype must be"):
        rj.load(path, max_seq_len=16, kv_dtype="int8")


def test_a_batch_whose_cache_cannot_fit_is_refused_before_allocating(pair, monkeypatch):
    from realizar_jax import memory
    from realizar_jax.errors import InsufficientMemoryError
    _, model = pair
    monkeypatch.setattr(memory, "free_device_memory", lambda: 2**20)   # 1 MiB free
    with pytest.raises(InsufficientMemoryError, match="slots need .* GiB"):
        model.generate([[1, 2]] * 3000, max_new_tokens=2)


def test_dense_weights_choice(model_files, monkeypatch):
    """dense_weights=None: dense on a CPU when the dequantized matrices fit (memory.dense_weights_fit),
    packed for the kernels; True/False force it; the memory check counts the form chosen."""
    import realizar_jax as rj
    from realizar_jax import engine, memory
    from realizar_jax.errors import InsufficientMemoryError
    from realizar_jax.formats import open_model
    from realizar_jax.kernels.tuning import KernelConfig
    path = model_files.gguf("llama", "q8_0")
    src, f32 = open_model(path), jnp.dtype("float32")
    dense = memory.weight_bytes_of(src, "float32", dequantized=True)
    choose = engine._choose_dense_weights
    assert choose(None, src, f32, KernelConfig(), None) and choose(None, src, f32, KernelConfig(), 4 * dense)
    assert not choose(None, src, f32, KernelConfig(), 4 * dense - 1)          # over a quarter of free memory
    assert not choose(None, src, f32, KernelConfig(pallas=True, interpret=True), None)   # the kernels' layout
    assert not choose(None, open_model(model_files.gguf("llama", "f16")), f32, KernelConfig(), None)  # nothing packed
    monkeypatch.setattr(memory, "DENSE_WEIGHTS_MAX_BYTES", dense - 1)
    assert not choose(None, src, f32, KernelConfig(), None)                   # over the absolute limit
    assert choose(True, src, f32, KernelConfig(), 1) and not choose(False, src, f32, KernelConfig(), None)
    with pytest.raises(TypeError, match="dense_weights must be True, False or None"):
        choose("yes", src, f32, KernelConfig(), None)
    packed = memory.weight_bytes_of(src, "float32")
    kv_and_work = memory.estimate_memory(src.config, 16, kv_dtype="float32", weight_bytes=0).total
    monkeypatch.setattr(memory, "free_device_memory", lambda: packed + kv_and_work + 1)
    assert not rj.load(path, dtype="float32", max_seq_len=16).dense_weights   # does not fit a quarter: packed
    with pytest.raises(InsufficientMemoryError):
        rj.load(path, dtype="float32", max_seq_len=16, dense_weights=True)
