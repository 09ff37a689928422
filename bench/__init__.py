"""livesend's benchmark against DVCLive's own Studio posting: `python -m bench [--quick]` (see run.py)."""
