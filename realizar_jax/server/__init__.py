"""The OpenAI-compatible HTTP server over realizar_jax.serving.Engine: request/response schema
(schema.py), the FastAPI app (app.py) and its Prometheus metrics (metrics.py). `realizar-jax serve`
(cli/serve.py) runs it under uvicorn."""
from .app import create_app

__all__ = ["create_app"]
