"""The `realizar-jax` command (main.py) and its subcommands: inspect, convert, bench, bench-serve
(bench_serve.py, its statistics in serve_stats.py), with summary and synth."""
