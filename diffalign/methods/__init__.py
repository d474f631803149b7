"""Alignment methods. Each is a config dataclass whose ``loss(model, batch)`` returns ``(loss, metrics)``.

A method sees only the model contract (``diffalign.models.base``) and batches already in latent space; it
never names a model family. ``METHODS`` maps ``method.name`` to its class.
"""

from __future__ import annotations

from diffalign.config import ConfigError
from diffalign.methods.alignprop import AlignProp
from diffalign.methods.dpo import DiffusionDPO
from diffalign.methods.inpo import DDIMInPO
from diffalign.methods.mapo import MaPO

METHODS: dict[str, type] = {
    "dpo": DiffusionDPO,
    "mapo": MaPO,
    "inpo": DDIMInPO,
    "alignprop": AlignProp,
}


def method_config_class(name: str, source: str = "<config>") -> type:
    if name not in METHODS:
        raise ConfigError(f"{source}: unknown method.name {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
