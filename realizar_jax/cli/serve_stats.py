"""Pure statistics of `realizar-jax bench-serve`: percentiles and one load level's summary.

Kept apart from the HTTP code so the numbers can be checked against numpy without a server.
A request record is a dict (the JSON's `requests` entries): start_s / end_s (seconds since the run
began), ttft_s, e2e_s, completion_tokens, itl_s (list), error (None or a kind such as "429").
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as numpy's
    default method; None for no values (a level where every request failed has no latencies)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    # the a + (b - a) * t form, as numpy's: exact when a == b, and never outside [a, b]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def decode_rate(record: dict) -> float | None:
    """A stream's own decode speed: tokens after the first over the time after the first token."""
    n, ttft, e2e = record["completion_tokens"], record["ttft_s"], record["e2e_s"]
    if n is None or n < 2 or ttft is None or e2e is None or e2e <= ttft:
        return None
    return (n - 1) / (e2e - ttft)


def summarise(records: Sequence[dict], max_tokens: int | None = None) -> dict:
    """One level's results. Throughput counts successful requests only; the wall time runs from the
    first send to the last completion of any request, failed ones included (they took the time too).
    With max_tokens, `short` counts successful requests that generated fewer tokens (a server that
    ignored ignore_eos and stopped early, which would flatter its latencies)."""
    ok = [r for r in records if r["error"] is None]
    wall = (max(r["end_s"] for r in records) - min(r["start_s"] for r in records)) if records else 0.0
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    errors: dict[str, dict] = {}
    for r in records:
        if r["error"] is not None:
            e = errors.setdefault(r["error"], {"count": 0, "first": r.get("error_message")})
            e["count"] += 1
    prompt = [r["prompt_tokens"] for r in ok if r.get("prompt_tokens") is not None]

    def p(xs, q):
        return percentile([x for x in xs if x is not None], q)

    return {
        "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
        "wall_s": wall, "generated_tokens": tokens,
        "gen_tok_s": tokens / wall if wall > 0 else None,
        "req_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50_s": p((r["ttft_s"] for r in ok), 50), "ttft_p99_s": p((r["ttft_s"] for r in ok), 99),
        "itl_p50_s": p((x for r in ok for x in r["itl_s"]), 50),
        "itl_p99_s": p((x for r in ok for x in r["itl_s"]), 99),
        "e2e_p50_s": p((r["e2e_s"] for r in ok), 50),
        "decode_tok_s_p50": p((decode_rate(r) for r in ok), 50),
        "prompt_tokens_mean": sum(prompt) / len(prompt) if prompt else None,
        "short": (sum(1 for r in ok if (r["completion_tokens"] or 0) < max_tokens)
                  if max_tokens is not None else None),
        "malformed_lines": sum(r.get("malformed_lines", 0) for r in records),
        "errors": errors,
    }
