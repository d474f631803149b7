"""The building blocks every configurable part shares: the config error, ``opt`` fields, and the dtype parser.

Kept apart from ``config.py`` so that methods (whose dataclasses are config sections) and models import these
without importing the config tree, and ``config.py`` can import the method registry at the top.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key at fault."""


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, *,  # noqa: A002
        ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A dataclass field with a default, a help text, optional allowed values and an optional numeric range
    (``ge``: at least, ``gt``: above, ``le``: at most), checked when a config is loaded."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_PRECISIONS = {"no": "float32", "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def parse_dtype(name: Any) -> Any:
    """``"float32"``, ``"bfloat16"``, a mixed-precision name (``no``, ``fp16``, ``bf16``) or a torch dtype -> a
    floating torch dtype. The one place config strings become dtypes."""
    import torch

    value = getattr(torch, _PRECISIONS.get(name, name), None) if isinstance(name, str) else name
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as 'float32' or 'bfloat16'; got {name!r}")
    return value
