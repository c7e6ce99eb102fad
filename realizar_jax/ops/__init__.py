"""The compute layer the models are written in: linear ops on any weight storage, the residual
stream's fused norm ops, and attention over the KV cache. Each op picks its route once (routes.py)."""
from .attention import DecodeAttention, PrefillAttention
from .fused import ACTIVATIONS, Stream, norm_linear, norm_mlp, rms_norm
from .linear import embedding, linear, linear_many, summed
from .routes import current, using

__all__ = ["ACTIVATIONS", "DecodeAttention", "PrefillAttention", "Stream", "current", "embedding", "linear",
           "linear_many", "norm_linear", "norm_mlp", "rms_norm", "summed", "using"]
