"""The `realizar-jax` command (main.py) and its subcommands: inspect, convert, bench, with summary and synth."""
