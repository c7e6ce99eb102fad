"""The `realizar-jax` commands on fixture models, and their one error format: `realizar-jax CMD: error: ...` on
stderr, exit 2 for a bad command line and 1 for a failure while running, nothing on stdout before it."""
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


def _run(argv, capsys):
    """(exit code, stdout, stderr) of main(argv); argparse's errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_error_line(err: str, command: str | None, needle: str):
    prefix = f"realizar-jax {command}: error: " if command else "realizar-jax: error: "
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and needle in lines[0], err
    assert "usage:" not in err and "Traceback" not in err and ".tmp" not in err


@pytest.mark.parametrize("argv,command,needle", [
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "generate", "must be >= 1"),
    (["generate", "--max-new-tokens", "3"], "generate", "--prompt"),
    (["generate", "--prompt", "x", "--dtype", "int4"], "generate", "invalid choice"),
    (["perplexity"], "perplexity", "file"),
    (["frobnicate"], None, "invalid choice"),
    ([], None, "required"),
    (["inspect"], "inspect", "path"),
    (["inspect", "x.gguf", "--batch", "0"], "inspect", "must be >= 1"),
    (["inspect", "x.gguf", "--kv-dtype", "float7"], "inspect", "invalid choice"),
    (["convert", "only_one_path"], "convert", "out"),
    (["convert", "a", "b", "--quant", "q2_k"], "convert", "invalid choice"),
    (["bench", "--gen", "1"], "bench", "--gen >= 2"),
    (["bench", "--ab", "NOT_A_SWITCH"], "bench", "--ab"),
    (["bench", "--shape", "no-such-shape"], "bench", "invalid choice"),
])
def test_usage_errors_exit_2_with_one_line(argv, command, needle, capsys):
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    _assert_error_line(err, command, needle)


@pytest.mark.parametrize("command", ["generate", "perplexity", "inspect", "convert", "bench"])
def test_missing_files_exit_1_with_one_line(command, tmp_path, capsys):
    missing = str(tmp_path / "missing.gguf")
    argv = {"generate": ["generate", "--model", missing, "--prompt", "x"], "perplexity": ["perplexity", missing],
            "inspect": ["inspect", missing], "convert": ["convert", missing, str(tmp_path / "o.gguf")],
            "bench": ["bench", "--model", missing]}[command]
    code, out, err = _run(argv, capsys)
    assert code == 1 and out == ""
    _assert_error_line(err, command, missing)


def test_convert_output_errors_name_the_output_not_the_temp_file(model_files, tmp_path, capsys):
    hf = str(model_files.hf("llama"))
    (tmp_path / "a_dir").mkdir()
    for out, needle in [(tmp_path / "no" / "such" / "x.gguf", "No such file"), (tmp_path / "a_dir", "directory")]:
        code, stdout, err = _run(["convert", "--no-progress", hf, str(out)], capsys)
        assert code == 1 and stdout == ""
        _assert_error_line(err.splitlines()[-1], "convert", f"{out}: ")
        assert needle in err and ".tmp" not in err
    assert list(tmp_path.rglob("*.tmp")) == []


def test_a_refused_prompt_writes_nothing_to_stdout(model_files, capsys):
    """The prompt is echoed only once the model accepts it (before, it reached stdout ahead of the error)."""
    code, out, err = _run(["generate", "--model", str(model_files.gguf("llama", "q8_0")), "--max-seq-len", "16",
                           "--prompt", "def f(x):\n    return x * 2\n" * 8], capsys)
    assert code == 1 and out == ""
    _assert_error_line(err.splitlines()[-1], "generate", "exceeds max_seq_len=16")


def test_version(capsys):
    import realizar_jax
    code, out, err = _run(["--version"], capsys)
    assert code == 0 and out == f"realizar-jax {realizar_jax.__version__}\n" and err == ""


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
