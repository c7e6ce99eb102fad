"""Text: tokenizers built from what formats/ reads (GGUF metadata, HF tokenizer files) and chat templates."""
from .chat import render_chat
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "render_chat"]
