"""Errors that name the problem and the fix.

Every user-facing check raises one of these, so a caller can catch the family (``DynMoEError``) while the message
says which setting was wrong, what it was, and what is allowed.
"""

from __future__ import annotations


class DynMoEError(Exception):
    """Base class of every error dynmoe_dist raises on purpose."""


class ConfigError(DynMoEError, ValueError):
    """A setting is outside its allowed values."""

    def __init__(self, setting: str, value: object, allowed: str) -> None:
        self.setting = setting
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {setting}={value!r}: allowed {allowed}")


class ShapeError(DynMoEError, ValueError):
    """A tensor does not have the shape the layer was built for."""


class NonFiniteError(DynMoEError, FloatingPointError):
    """NaN or Inf found where the finite-value check is enabled."""


def check(condition: bool, setting: str, value: object, allowed: str) -> None:
    """Raise ``ConfigError`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(setting, value, allowed)
