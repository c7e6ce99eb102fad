"""Text: tokenizers built from what formats/ reads (GGUF metadata, HF tokenizer files) and chat templates."""
from .chat import render_chat
from .tokenizer import StreamDecoder, Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "render_chat"]
