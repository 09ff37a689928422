"""livesend: stream DVCLive output from a running command to Iterative Studio, live."""

__version__ = "0.1.0"
