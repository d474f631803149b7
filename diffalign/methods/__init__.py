"""Alignment methods: config dataclasses following the protocol in ``methods/base.py``.

``METHODS`` maps ``method.name`` to its class.
"""

from __future__ import annotations

from diffalign.methods.alignprop import AlignProp
from diffalign.methods.dpo import DiffusionDPO
from diffalign.methods.grpo import GRPO
from diffalign.methods.inpo import DDIMInPO
from diffalign.methods.mapo import MaPO
from diffalign.methods.nft import DiffusionNFT
from diffalign.methods.raft import RAFT
from diffalign.options import ConfigError

METHODS: dict[str, type] = {
    "dpo": DiffusionDPO,
    "mapo": MaPO,
    "inpo": DDIMInPO,
    "alignprop": AlignProp,
    "grpo": GRPO,
    "raft": RAFT,
    "nft": DiffusionNFT,
}


def method_config_class(name: str, source: str = "<config>") -> type:
    if name not in METHODS:
        raise ConfigError(f"{source}: unknown method.name {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
