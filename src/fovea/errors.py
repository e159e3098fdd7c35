"""Errors every part of fovea may raise (one small module, imported from anywhere without cycles)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad key or value in a config file, an override or a command-line option (the message names it)."""
