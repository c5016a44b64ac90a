"""keyrelay: OAuth token broker (auth service) and Messages API gateway."""

__version__ = "0.1.0"
