"""Parsing of repeated `--param key=value` options, shared by the commands that take them."""

from __future__ import annotations

from collections.abc import Sequence

from nbpipeline.errors import ConfigError


def parse_params(pairs: Sequence[str] | None) -> dict[str, str]:
    """`key=value` strings -> dict; a malformed pair is a ConfigError naming it."""
    params: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"invalid --param {pair!r}: expected key=value")
        params[key.strip()] = value
    return params
