"""The method protocol: what every alignment method declares, written down once.

A method is a dataclass (its fields are the ``method.*`` config section, with ``name`` first) deriving from
:class:`Method`, which fixes what the rest of the package may rely on:

    needs_reference   the trainer keeps a reference: adapters disabled (LoRA) or a frozen copy (full fine-tuning)
    data              "pairs": preference pairs (cached or not); "prompts": a prompt list (AlignProp, online RL)
    many_grad_calls   the loss calls the denoiser with gradient more than once per backward, so the trainer runs
                      every micro-batch under no_sync and all-reduces the gradients itself
    loss(model, batch) -> (loss, metrics)   metrics: detached scalar tensors, averaged over accumulation

A method sees only the model contract (``models/base.py``) and ``model.schedule``; it never names a model
family, a network class or a schedule type (``tests/test_layering.py`` checks this).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from diffalign.models.base import DiffusionModel


class Method:
    needs_reference: ClassVar[bool] = False
    data: ClassVar[str] = "pairs"
    many_grad_calls: ClassVar[bool] = False

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError
