"""One process of tests/test_compile_cache.py: `python tests/compile_cache_worker.py SCENARIO [ARGS]`.

The cache directory comes from the environment the test gives (REALIZAR_CACHE_DIR). Prints one JSON
line per phase: {"phase", "compile_s" (the stats' compile seconds), "hits" / "writes" (JAX's
persistent-cache events during the phase), "entries" (compiled programs in the directory after it)}.

generate                  load the embedded model, generate 4 tokens
variants TINY_GGUF        the embedded model's prefill, then the same again (a new Model: hits), then
                          a changed KernelConfig, another model, another shape, another jaxlib version
off                       load(compile_cache=False), then REALIZAR_NO_COMPILE_CACHE=1, then on again;
                          then a JAX cache directory of the user's own, which load() leaves alone
"""
from __future__ import annotations

import json
import os
import sys

import jax

import realizar_jax as rj
from realizar_jax import compile_cache

EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}
counts = {"hits": 0, "writes": 0}


def _listen(event: str, **_):
    if event in EVENTS:
        counts[EVENTS[event]] += 1


def phase(name: str, model, run) -> None:
    counts.update(hits=0, writes=0)
    compile_s = run(model)
    print(json.dumps({"phase": name, "compile_s": compile_s, **counts, "entries": compile_cache.info()["entries"]}),
          flush=True)


def generate(m) -> float:
    m.generate("def fibonacci(n):", max_new_tokens=4)
    m.close()
    return m.last_stats.compile_s


def logits(m) -> float:
    m.logits([1, 2, 3])
    return m.steps.compile_seconds


def main(scenario: str, *args: str) -> None:
    jax.monitoring.register_event_listener(_listen)
    embedded = rj.default_model_path()
    if scenario == "generate":
        phase("generate", rj.load(embedded), generate)
    elif scenario == "variants":
        phase("base", rj.load(embedded, max_seq_len=64), logits)
        phase("again", rj.load(embedded, max_seq_len=64), logits)
        kernels = rj.KernelConfig(pallas=True, interpret=True)
        phase("kernels", rj.load(embedded, max_seq_len=64, kernels=kernels), logits)
        phase("model", rj.load(args[0], max_seq_len=64), logits)
        phase("shape", rj.load(embedded, max_seq_len=32), logits)
        import jax._src.cache_key as cache_key   # what another jaxlib would hash into the key
        cache_key.jaxlib_version_str = cache_key.jaxlib_version_str + ".test"
        phase("jaxlib", rj.load(embedded, max_seq_len=64), logits)
    elif scenario == "off":
        assert not compile_cache.cache_dir().exists(), "importing realizar_jax touched the cache directory"
        phase("argument", rj.load(embedded, max_seq_len=64, compile_cache=False), logits)
        os.environ[compile_cache.NO_CACHE_ENV] = "1"   # read at load(), not at import
        phase("env", rj.load(embedded, max_seq_len=64), logits)
        del os.environ[compile_cache.NO_CACHE_ENV]
        phase("on", rj.load(embedded, max_seq_len=64), logits)
        theirs = args[0]
        jax.config.update("jax_compilation_cache_dir", theirs)
        for on in (True, False):
            rj.load(embedded, max_seq_len=64, compile_cache=on)
            assert jax.config.jax_compilation_cache_dir == theirs
        print(json.dumps({"phase": "theirs", "dir": jax.config.jax_compilation_cache_dir}), flush=True)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
