"""The serving engine: slot state stepped by pure jitted functions (state.py), a scheduler thread
that batches requests continuously over it (scheduler.py), and the request/response types
(requests.py). Model.generate/stream/chat and the HTTP server are clients of it."""
from .requests import (Choice, Completion, ContextLengthError, EngineClosedError, Event, OptionError,
                       QueueFullError, RequestStats, SamplingOptions, TokenLogprob)

__all__ = ["Choice", "Completion", "ContextLengthError", "Engine", "EngineClosedError", "Event", "OptionError",
           "QueueFullError", "RequestHandle", "RequestStats", "SamplingOptions", "TokenLogprob"]


def __getattr__(name):
    if name in ("Engine", "RequestHandle", "EngineMetrics"):
        from . import scheduler
        return getattr(scheduler, name)
    raise AttributeError(name)
