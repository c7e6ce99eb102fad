"""Run hostile inputs through load(), open_model and the CLI in a separate process, each bounded in time and memory.

`Worker` starts `python tests/hostile_worker.py` once and sends it one case at a time (a JSON line: op, path);
the worker answers with what happened. The parent watches the worker while a case runs: past `timeout`
seconds or `max_rss` bytes of resident memory it kills it (the case is then a 'timeout' or 'memory' result)
and starts a fresh one for the next case. The peak RSS of each case is the worker's VmHWM, reset before it.
Between two looks (20 ms) an allocation could outrun the watch, so the worker also runs under an address-space
limit (`max_vm`, RLIMIT_AS): past it an allocation fails at once, a MemoryError the parent reports as a
non-project error, instead of taking the machine's memory. Chat templates render with a 2 s budget
(RENDER_SECONDS, 10 s in use), so a template that runs into it ends well inside the case's time.

ops: 'open' (formats.open_model, then text.tokenizer.load_tokenizer: no JAX), 'load' (realizar_jax.load, then
encode a text and, when the model has a chat template, render a conversation with it), 'inspect'
(`realizar-jax inspect PATH --json`, in-process; an exception escaping it is a traceback).
Results: {"status": "ok" | "error" | "timeout" | "memory" | "died", "type", "project" (the error is a
RealizarError), "message", "traceback" (for non-project errors), "chat" ('ok', 'refused': a ChatTemplateError,
or absent: no template), "seconds", "peak_rss"}.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss(pid: int, key: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Worker:
    def __init__(self, timeout: float = 10.0, max_rss: int = 2 * 1024**3, max_vm: int = 6 * 1024**3):
        self.timeout, self.max_rss, self.max_vm, self.proc = timeout, max_rss, max_vm, None
        self.restarts = 0

    def _start(self):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HOSTILE_WORKER_MAX_VM": str(self.max_vm)}
        self.proc = subprocess.Popen([sys.executable, "-u", __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT), text=True, bufsize=1)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _kill(self):
        self.close()
        self.restarts += 1

    def run(self, op: str, path, timeout: float | None = None) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
            self._request({"op": "ping", "path": ""}, 120)  # imports, off the clock of the first case
        return self._request({"op": op, "path": str(path)}, timeout or self.timeout)

    def _request(self, req: dict, timeout: float) -> dict:
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM, so the peak below is this case's
        except OSError:
            pass
        start = time.monotonic()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        peak = 0
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.02)
            elapsed = time.monotonic() - start
            rss = _rss(pid)
            peak = max(peak, rss)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    code = self.proc.wait()
                    self._kill()
                    return {"status": "died", "message": f"exit code {code}", "seconds": elapsed, "peak_rss": peak}
                result = json.loads(line)
                result["seconds"] = elapsed
                result["peak_rss"] = max(peak, _rss(pid, "VmHWM"))
                return result
            if rss > self.max_rss:
                self._kill()
                return {"status": "memory", "message": f"{rss} bytes resident", "seconds": elapsed, "peak_rss": rss}
            if elapsed > timeout:
                self._kill()
                return {"status": "timeout", "message": f"past {timeout} s", "seconds": elapsed, "peak_rss": peak}


def problem(result: dict, path=None) -> str | None:
    """Why `result` breaks the promise (clean project error or success, in bounds), or None."""
    status = result["status"]
    if status in ("timeout", "memory", "died"):
        return f"{status}: {result['message']}"
    if status == "error" and not result.get("project"):
        return f"non-project {result['type']}: {result['message']}\n{result.get('traceback', '')}"
    if status == "traceback":
        return f"CLI traceback: {result['message']}\n{result.get('traceback', '')}"
    if status == "error" and path is not None and str(path) not in result["message"]:
        return f"error does not name {path}: {result['message']}"
    return None


# ---------------------------------------------------------------- the worker process
def _clip(text: str, n: int = 600) -> str:
    """Head and tail of a long message: the path is at its start, the reason at its end."""
    return text if len(text) <= 2 * n else f"{text[:n]} [...{len(text) - 2 * n} characters...] {text[-n:]}"


def _handle(req: dict) -> dict:
    import contextlib
    import io
    import traceback
    from realizar_jax.errors import RealizarError
    op, path = req["op"], req["path"]
    if op == "ping":
        import realizar_jax.formats  # noqa: F401
        import realizar_jax.text.tokenizer  # noqa: F401
        import realizar_jax.cli.inspect  # noqa: F401
        return {"status": "ok"}
    try:
        if op == "open":
            from realizar_jax.formats import open_model
            from realizar_jax.text.tokenizer import load_tokenizer
            load_tokenizer(open_model(path))
        elif op == "load":
            import realizar_jax as rj
            from realizar_jax.errors import ChatTemplateError
            model = rj.load(path, max_seq_len=64)
            if model.tokenizer is not None:
                model.tokenizer.encode("hello")
                if model.tokenizer.chat_template:
                    try:
                        model.encode_chat(CONVERSATION)
                        return {"status": "ok", "chat": "ok"}
                    except ChatTemplateError:  # a template that fails or overruns: refused cleanly, the model loads
                        return {"status": "ok", "chat": "refused"}
        elif op == "inspect":
            from realizar_jax.cli.inspect import inspect_main
            err = io.StringIO()
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    code = inspect_main([path, "--json"])
            except BaseException as e:  # escaped the CLI's error handling: the user would see a traceback
                return {"status": "traceback", "type": type(e).__name__, "message": str(e)[:500],
                        "traceback": traceback.format_exc()[-3000:]}
            if code == 0:
                return {"status": "ok"}
            return {"status": "error", "type": "exit", "project": True, "message": _clip(err.getvalue()),
                    "code": code}
        else:
            raise ValueError(f"unknown op {op!r}")
    except Exception as e:
        out = {"status": "error", "type": type(e).__name__, "project": isinstance(e, RealizarError),
               "message": _clip(str(e))}
        if not out["project"]:
            out["traceback"] = traceback.format_exc()[-3000:]
        return out
    return {"status": "ok"}


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello <s> {{ x }}"},
                {"role": "assistant", "content": "Hi! \u00e9\U0001f600"}, {"role": "user", "content": "again"}]


def _main():
    import resource
    import warnings
    max_vm = int(os.environ.get("HOSTILE_WORKER_MAX_VM", 0))
    if max_vm:
        resource.setrlimit(resource.RLIMIT_AS, (max_vm, max_vm))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # anything printed by libraries goes nowhere, not into the protocol
    sys.stdout = open(os.devnull, "w")
    warnings.simplefilter("ignore")
    import logging
    logging.disable(logging.CRITICAL)
    from realizar_jax.text import chat
    chat.RENDER_SECONDS = 2.0
    for line in sys.stdin:
        proto.write(json.dumps(_handle(json.loads(line))) + "\n")


if __name__ == "__main__":
    _main()
