"""load() and the Model facade: validate the file, check memory, build the pytree, and hand the
pure functions (models/, generate.py) what they need. generate/stream/chat/logits/perplexity are
host-side drivers of the jitted steps."""
from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from .cache import KVCache, init_cache
from .config import ModelConfig
from .generate import Generation, GenerationStats, Steps, generation_stats, pad_prompts
from .kernels.tuning import KernelConfig
from .weights import Params

Prompt = Union[str, Sequence[int]]
MAX_SEQ_LEN_DEFAULT = 4096
GENERATE_SLOTS = 32   # generate() with a longer list of prompts queues the rest
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def default_dtype() -> str:
    return "bfloat16" if jax.default_backend() in ACCELERATORS else "float32"


class Model:
    """A loaded model: `config` (ModelConfig), `params` (the role-keyed weights pytree), `tokenizer`,
    `kernels` (KernelConfig), `dense_weights` (whether load() dequantized the packed matrices) and
    the generation methods. Build one with `realizar_jax.load`."""

    def __init__(self, config: ModelConfig, params: Params, tokenizer, *, dtype, max_seq_len: int,
                 kv_dtype=None, path=None, source_format=None, kernels: KernelConfig | None = None,
                 dense_weights: bool = False):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.dtype = jnp.dtype(dtype)
        self.kv_dtype = jnp.dtype(kv_dtype or dtype)
        self.max_seq_len = int(max_seq_len)
        self.path = path
        self.source_format = source_format
        self.kernels = kernels or KernelConfig.from_env()
        self.dense_weights = bool(dense_weights)   # load() dequantized the file's packed matrices
        self.steps = Steps(config, self.dtype, self.kernels)
        self.last_stats: GenerationStats | None = None
        self._slot_steps = None
        self._generate_engine = None
        self._engine_lock = threading.Lock()

    def new_cache(self, batch: int = 1) -> KVCache:
        return init_cache(self.config, batch, self.max_seq_len, self.kv_dtype)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"a prompt is a string or a list of token ids, got {type(ids).__name__} {ids!r:.80}")
        ids = list(ids)
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"token ids must be integers, got {type(i).__name__} {i!r:.40}")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.config.vocab_size})")
        return ids

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text (through the tokenizer) or of a list of ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"prompt is not valid Unicode text: {e.reason} at index {e.start}") from None
            return self.tokenizer.encode(prompt)
        return self._check_ids(prompt)

    def logits(self, token_ids: Prompt) -> np.ndarray:
        """float32 [len(token_ids), vocab]: the logits at every position, from the jitted prefill."""
        ids = self.encode(token_ids)
        tokens, lengths = pad_prompts([ids], self.max_seq_len)
        logits, _ = self.steps.prefill(self.params, self.new_cache(1), tokens, lengths, all_logits=True)
        return np.asarray(logits[0, :len(ids)], dtype=np.float32)

    def perplexity(self, text: Prompt, stride: int | None = None, window: int | None = None) -> float:
        """exp(mean NLL) of the text's tokens, scored with sliding windows of the jitted prefill (as HF's
        perplexity recipe: each window of `window` tokens scores only the tokens not scored before)."""
        ids = self.encode(text)
        if len(ids) < 2:
            raise ValueError("perplexity needs at least 2 tokens")
        window = min(window or self.max_seq_len, self.max_seq_len)
        stride = stride or window
        if not 0 < stride <= window:
            raise ValueError(f"stride must be in (0, {window}], got {stride}")
        nll, count, scored_to = 0.0, 0, 1  # token 0 has no context and is never scored
        begin = 0
        while scored_to < len(ids):
            end = min(begin + window, len(ids))
            logits = self.logits(ids[begin:end])
            logp = logits - _logsumexp(logits)
            for pos in range(max(scored_to, begin + 1), end):
                nll -= float(logp[pos - begin - 1, ids[pos]])
                count += 1
            scored_to = end
            if end == len(ids):
                break
            begin += stride
        return math.exp(nll / count)

    # ---- generation ---------------------------------------------------------------------------------
    def _prompts(self, prompt) -> tuple[list[list[int]], bool]:
        if isinstance(prompt, str):
            return [self.encode(prompt)], False
        if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) and all(
                isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt):
            return [self.encode(p) for p in prompt], True
        if isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt):
            return [self.encode(prompt)], False
        raise TypeError(f"prompt must be a string, a list of token ids, or a non-empty list of those; got "
                        f"{type(prompt).__name__} {prompt!r:.80}")

    @property
    def slot_steps(self):
        """The serving engine's jitted steps of this model (compiled per shape, shared by its Engines)."""
        if self._slot_steps is None:
            from .serving.state import SlotSteps
            self._slot_steps = SlotSteps(self.config, self.dtype, self.kv_dtype, self.kernels)
        return self._slot_steps

    def engine(self, max_slots: int = 32, max_queue: int = 256, **kw):
        """A serving Engine over this model: continuous batching of up to max_slots sequences, at most
        max_queue requests waiting. submit() returns a handle to iterate, await or cancel; close() it
        (or use it as a context manager) to free its KV cache. See realizar_jax.serving.Engine."""
        from .serving.scheduler import Engine
        return Engine(self, max_slots=max_slots, max_queue=max_queue, **kw)

    def _engine_for(self, rows: int):
        """The private engine generate()/stream() run on: slots for `rows` prompts at once (a power of
        two, at most GENERATE_SLOTS; more prompts queue), replaced when a different size is needed."""
        slots = min(1 << max(0, rows - 1).bit_length(), GENERATE_SLOTS)
        with self._engine_lock:
            if self._generate_engine is None or self._generate_engine.max_slots != slots:
                if self._generate_engine is not None:
                    self._generate_engine.close(drain=True)
                    self._generate_engine = None
                self._generate_engine = self.engine(max_slots=slots, max_queue=1 << 20)
            return self._generate_engine

    def close(self) -> None:
        """Stop the private engine generate()/stream() run on and free its KV cache (it is made again
        on the next call). Engines from engine() are closed by their owners."""
        with self._engine_lock:
            if self._generate_engine is not None:
                self._generate_engine.close(drain=False)
                self._generate_engine = None

    def _submit(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                stop_token_ids):
        from .generate import _check_int
        from .sampling import make_sampling_params
        from .serving.requests import SamplingOptions, check_stop_strings
        _check_int("max_new_tokens", max_new_tokens, 1)
        if seed is not None:
            _check_int("seed", seed, 0, 2**63 - 1)
        for t in stop_token_ids or ():
            _check_int("stop_token_ids", t, 0, self.config.vocab_size - 1)
        make_sampling_params(1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty)   # the checks, with their messages
        try:
            stop = check_stop_strings(stop)
        except ValueError as e:
            raise TypeError(f"stop must be a string or a list of strings, got {stop!r:.80}") from e
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.max_seq_len}; load with a larger max_seq_len")
        engine = self._engine_for(len(prompts))
        handles = []
        for i, p in enumerate(prompts):
            opts = SamplingOptions(max_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                                   top_p=float(top_p), min_p=float(min_p),
                                   repetition_penalty=float(repetition_penalty),
                                   seed=None if seed is None else seed + i, stop=stop,
                                   stop_token_ids=tuple(int(t) for t in stop_token_ids or ()))
            handles.append(engine.submit(p, opts))
        return handles

    def generate(self, prompt: Prompt | Sequence[Prompt], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None) -> Generation | list[Generation]:
        """Generate from a prompt (text or token ids), or from a list of prompts (then a list of
        Generations comes back; they run continuously batched on the serving engine, so short ones
        finish early). temperature=0 is greedy; top_k=0, top_p=1, min_p=0 and repetition_penalty=1
        turn those filters off. seed: an int makes sampling reproducible (the i-th prompt of a list
        uses seed + i); None (the default) draws fresh randomness. Generation stops at
        max_new_tokens, an EOS id (the model's and stop_token_ids) or the first `stop` string (cut
        from the text, and decoding ends there)."""
        prompts, batched = self._prompts(prompt)
        handles = self._submit(prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                               stop, stop_token_ids)
        try:
            for h in handles:
                h.result()
        except BaseException:   # Ctrl-C in a notebook: nothing keeps decoding for a caller who left
            for h in handles:
                h.cancel()
            raise
        results = []
        for h in handles:
            done = h.result()
            if h.error is not None:
                raise RuntimeError(f"generation failed: {h.error}")
            c = done.choices[0]
            results.append(Generation(text=c.text if self.tokenizer is not None else "", tokens=list(c.token_ids),
                                      prompt_tokens=list(done.prompt_token_ids), finish_reason=c.finish_reason,
                                      stats=generation_stats([h])))
        self.last_stats = generation_stats(handles)
        return results if batched else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] | None = None) -> Iterator[str]:
        """Yield text pieces of one prompt as they are produced (never a broken UTF-8 character, never
        part of a stop string); the arguments are generate()'s. Closing the iterator early cancels
        the request. The run's stats are in `last_stats` afterwards."""
        prompts, batched = self._prompts(prompt)
        if batched:
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        if self.tokenizer is None:
            raise ValueError("stream() needs a tokenizer; this model has none")
        handle, = self._submit(prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                               stop, stop_token_ids)
        return self._pieces(handle)

    def _pieces(self, handle) -> Iterator[str]:
        try:
            for ev in handle:
                if ev.error:
                    raise RuntimeError(f"generation failed: {ev.error}")
                if ev.text:
                    yield ev.text
            self.last_stats = generation_stats([handle])
        finally:
            handle.cancel()

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The messages ([{"role": ..., "content": ...}]) rendered with the model's own Jinja chat template."""
        from .errors import ChatTemplateError
        from .text.chat import render_chat
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if not template:
            raise ChatTemplateError(f"{self.path}: this model has no chat template "
                                    f"(no tokenizer.chat_template in GGUF / tokenizer_config.json)")
        tok = self.tokenizer
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else "",
                           eos_token=tok.id_to_piece(tok.eos_ids[0]) if tok.eos_ids else "")

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the messages rendered with the chat template (what chat() and the server's
        /v1/chat/completions feed the model)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        tok = self.tokenizer
        bos_piece = tok.id_to_piece(tok.bos_id) if tok.bos_id is not None else None
        # The template decides about BOS when it writes one; otherwise the model's add_bos rule applies.
        return tok.encode(text, add_bos=False) if bos_piece and text.startswith(bos_piece) else tok.encode(text)

    def chat(self, messages: Sequence[dict], stream: bool = False, max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             repetition_penalty: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None) -> Generation | Iterator[str]:
        """Render messages with the model's chat template and generate the assistant's reply: a
        Generation, or (stream=True) an iterator of text pieces. The other arguments are generate()'s."""
        ids = self.encode_chat(messages)
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=stop, stop_token_ids=stop_token_ids)
        return self.stream(ids, **kw) if stream else self.generate(ids, **kw)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.architecture}, layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/"
                f"{c.num_kv_heads}, vocab={c.vocab_size}, dtype={self.dtype.name}, max_seq_len={self.max_seq_len}, "
                f"path={self.path})")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def load(path: str | Path, dtype: str | None = None, max_seq_len: int | None = None, *, kv_dtype: str | None = None,
         batch: int = 1, check_memory: bool = True, progress: bool | None = None, int8_activations: bool = True,
         kernels: KernelConfig | None = None, quantize: str | None = None, dense_weights: bool | None = None,
         compile_cache: bool = True) -> Model:
    """Load a .gguf file or an HF model folder: validate it, check memory, build the role-keyed pytree.

    dtype: compute dtype, "float32", "bfloat16" or "float16" (default: bfloat16 on a GPU/TPU, float32
    on a CPU). max_seq_len: KV-cache length (default: the model's context, at most 4096). kv_dtype:
    the cache's dtype (default: dtype). batch: sequences the memory check reserves cache for.
    check_memory: raise InsufficientMemoryError before any upload when weights + cache do not fit.
    progress: a progress bar on stderr (None: for files of 256 MiB or more). int8_activations: on a GPU,
    decode matmuls on Q4_K/Q6_K/Q8_0 weights round bf16/f16 activations to int8 per block (dp4a, as
    llama.cpp's CUDA path; ~0.5-1% relative error per matmul); False keeps them float32. kernels: a
    KernelConfig to use instead (tests, benchmarks); it overrides int8_activations. quantize: for an
    HF folder, quantize the weights as they load, exactly as `realizar-jax convert --quant QUANT` would
    store them ("q8_0", "q4_k_m", "q6_k", ...; formats.gguf_writer.QUANT_CHOICES), without a file.
    dense_weights: hold the quantized matrices dequantized to dtype (the file's values, expanded
    once) instead of packed. None (default): on a CPU when the dense weights fit (under 2 GiB and a
    quarter of the free memory: memory.dense_weights_fit), where XLA reads a dense matrix faster
    than it dequantizes a packed one every step; packed on a GPU/TPU, where the kernels read the
    blocks. True/False forces either. The memory check counts the form chosen.
    compile_cache: keep compiled programs in the persistent cache under the user's cache directory
    (see realizar_jax.compile_cache; REALIZAR_NO_COMPILE_CACHE=1 also turns it off); the setting is
    JAX's and so holds for the whole process.
    """
    from .formats import open_model
    from .memory import check_fits, estimate_memory, free_device_memory, weight_bytes_of
    from .kernels.layout import repack_for_gpu
    from .text.tokenizer import load_tokenizer
    from .compile_cache import configure as configure_compile_cache
    from .weights import build_params, dequantizer
    path = Path(path)
    if not path.exists():
        from .errors import MissingTensorError
        from .formats.files import open_regular, present
        if present(path):   # a symlink loop (DamagedFileError) or a dangling link: say which
            try:
                open_regular(path, "the model path")[0].close()
            except MissingTensorError as e:
                raise FileNotFoundError(str(e)) from None
        raise FileNotFoundError(f"{path}: no such file or directory")
    source = open_model(path)
    if quantize is not None:
        from .formats.quantized import quantized_source
        source = quantized_source(source, quantize)
    config = source.config
    dtype = jnp.dtype(dtype or default_dtype())
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if max_seq_len is None:
        max_seq_len = min(config.context_length, MAX_SEQ_LEN_DEFAULT)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, np.integer)) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    max_seq_len = int(max_seq_len)
    if max_seq_len > config.context_length:
        warnings.warn(f"{path.name}: max_seq_len={max_seq_len} is beyond the model's context length "
                      f"({config.context_length}); positions past it were never trained", stacklevel=2)
    kv = jnp.dtype(kv_dtype or dtype)
    if kv not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"kv_dtype must be float32, bfloat16 or float16, got {kv_dtype!r}")
    kernels = kernels or KernelConfig.from_env(int8_activations=int8_activations)
    free = free_device_memory() if check_memory or dense_weights is None else None
    dense = _choose_dense_weights(dense_weights, source, dtype, kernels, free)
    if check_memory:
        est = estimate_memory(config, max_seq_len, batch, kv.name,
                              weight_bytes=weight_bytes_of(source, dtype.name, dequantized=dense))
        if free is not None:
            check_fits(est, free, path)
    configure_compile_cache(bool(compile_cache))
    transform = dequantizer(dtype) if dense else repack_for_gpu if kernels.pallas else None
    params = build_params(source, dtype, transform_matrix=transform, transform_experts=dequantizer(dtype) if dense
                          else None, progress=progress, max_seq_len=max_seq_len)
    return Model(config, params, load_tokenizer(source), dtype=dtype, max_seq_len=max_seq_len, kv_dtype=kv,
                 path=path, source_format=source.format, kernels=kernels, dense_weights=dense)


def _choose_dense_weights(requested, source, dtype, kernels: KernelConfig, free: int | None) -> bool:
    """load()'s dense_weights: as requested, else dense on a CPU backend (no Pallas kernels) when the
    file has packed matrices and their dense form fits (memory.dense_weights_fit)."""
    from .memory import dense_weights_fit, weight_bytes_of
    from .quant.types import qtype_info
    if requested is not None:
        if not isinstance(requested, (bool, np.bool_)):
            raise TypeError(f"dense_weights must be True, False or None, got {requested!r}")
        return bool(requested)
    if kernels.pallas or jax.default_backend() in ACCELERATORS:   # the kernels read the packed blocks
        return False
    if all(qtype_info(t.qtype).is_dense for t in source.tensors.values()):
        return False
    return dense_weights_fit(weight_bytes_of(source, dtype.name, dequantized=True), free)

