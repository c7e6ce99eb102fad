"""The `realizar-jax generate` / `perplexity` commands on a fixture model, and their error paths."""
from __future__ import annotations

import subprocess
import sys

import pytest

from realizar_jax.cli.main import main


def test_generate_streams_text_and_prints_stats(model_files, capsys):
    path = model_files.gguf("llama", "q8_0")
    assert main(["generate", "--model", str(path), "--prompt", "def add(a, b):", "--max-new-tokens", "12",
                 "--temperature", "0.7", "--top-k", "20", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def add(a, b):") and len(out) > len("def add(a, b):\n")
    stats = err.strip().splitlines()[-1]
    for word in ("prompt", "prefill", "decode", "tok/s", "compile"):
        assert word in stats


def test_generate_is_deterministic_for_a_seed(model_files, capsys):
    path = str(model_files.gguf("qwen2", "f16"))
    args = ["generate", "--model", path, "--prompt", "x = ", "--max-new-tokens", "8", "--temperature", "1.0",
            "--seed", "5"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_chat_flag_uses_the_template(model_files, capsys):
    assert main(["generate", "--model", str(model_files.hf("qwen2")), "--prompt", "hi", "--chat",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_perplexity_command(model_files, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x * 2\n\nprint(f(21))\n" * 3)
    assert main(["perplexity", "--model", str(model_files.hf("llama")), str(text)]) == 0
    value = float(capsys.readouterr().out.strip())
    assert value > 1.0


@pytest.mark.parametrize("args,code,needle", [
    (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"], 1, "no such file"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], 2, "must be >= 1"),
    (["generate", "--max-new-tokens", "3"], 2, "--prompt"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_arguments_give_one_line_and_exit_code(args, code, needle, capsys):
    with pytest.raises(SystemExit) if code == 2 else _nothing() as exc:
        rc = main(args)
    rc = exc.value.code if code == 2 else rc
    err = capsys.readouterr().err.strip()
    assert rc == code and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_damaged_model_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1


def test_console_script_runs_in_a_subprocess(model_files):
    path = model_files.gguf("llama", "q4_k")
    proc = subprocess.run([sys.executable, "-m", "realizar_jax.cli.main", "generate", "--model", str(path), "--prompt",
                           "import os", "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("import os") and "decode" in proc.stderr


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
