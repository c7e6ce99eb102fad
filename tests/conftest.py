"""Session fixtures shared by the test files: tiny HF models and their GGUF conversions (tests/fixtures.py)."""
from __future__ import annotations

import pytest

from realizar_jax.compile_cache import CACHE_DIR_ENV

from fixtures import ModelFiles


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> ModelFiles:
    """`model_files.hf("qwen3")`, `model_files.gguf("llama", "q4_k_m")`: built once per session, then cached."""
    return ModelFiles(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session", autouse=True)
def compile_cache_dir(tmp_path_factory):
    """The persistent compilation cache of this session's load()s and the processes they start: a
    directory of each test process's own (never the user's ~/.cache; no two workers write one at once)."""
    path = tmp_path_factory.mktemp("realizar-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_DIR_ENV, str(path))
        yield path


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default): one worker per core, except for GPU tests, which share one device
    (every worker's JAX would claim its memory): those run in one process."""
    expr = (config.getoption("markexpr", "") or "").replace("not gpu", "")
    return 0 if "gpu" in expr else None
