"""A choice's output text on the host: incremental detokenization and stop strings.

Text that could still begin a stop string is held back until it cannot, so no part of a stop string
is ever handed out; the tokens are held back with the text they produced and released with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def find_stop(text: str, stops: tuple[str, ...], since: int = 0) -> int | None:
    """Index of the earliest stop string in text (searching from `since`), or None."""
    hits = [i for i in (text.find(s, since) for s in stops) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of text could still begin a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


@dataclass
class ChoiceText:
    """Feed sampled tokens with `push`; it returns what may be handed out now: (text, tokens, extras)
    with extras the per-token values given to push (logprobs), and whether a stop string matched."""
    decoder: object | None                 # text.tokenizer.StreamDecoder, or None (token ids only)
    stops: tuple[str, ...] = ()
    text: str = ""                         # everything decoded so far, cut at a matched stop
    sent: int = 0                          # how much of text was handed out
    stopped: bool = False
    _pending: list = field(default_factory=list)   # (token, extra, where its text begins, ends)

    def push(self, token: int, extra=None):
        if self.stopped:
            return "", [], [], True
        if self.decoder is None:
            return "", [token], [extra], False
        begin = len(self.text)
        self.text += self.decoder.push(token)
        self._pending.append((token, extra, begin, len(self.text)))
        # a stop string can only newly appear in text that ends past where the last search ended
        hit = find_stop(self.text, self.stops, max(0, begin - max((len(s) for s in self.stops), default=0)))
        if hit is not None:
            self.text, self.stopped = self.text[:hit], True
            return self._release(hit, cut=True)
        return self._release(len(self.text) - held_back(self.text, self.stops), cut=False)

    def flush(self):
        """At the end of a choice that did not stop on a string: everything left (the decoder's partial
        character included)."""
        if self.decoder is not None and not self.stopped:
            self.text += self.decoder.flush()
        return self._release(len(self.text), cut=True)

    def _release(self, end: int, cut: bool):
        """Hand out text[sent:end] and the tokens whose text ends within it (on a cut: every token
        whose text began before `end`; the others produced only stop-string text and are dropped)."""
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        out, keep = [], []
        for tok, extra, begin, stop_at in self._pending:
            if stop_at <= end or (cut and begin < end):
                out.append((tok, extra))
            elif not cut:
                keep.append((tok, extra, begin, stop_at))
        self._pending = keep
        return piece, [t for t, _ in out], [e for _, e in out], self.stopped
