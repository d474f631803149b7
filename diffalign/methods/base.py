"""The method protocol: what every alignment method declares, written down once.

A method is a dataclass (its fields are the ``method.*`` config section, with ``name`` first) deriving from
:class:`Method`, which fixes what the rest of the package may rely on:

    needs_reference   the trainer keeps a reference: adapters disabled (LoRA) or a frozen copy (full fine-tuning)
    data              "pairs": preference pairs (cached or not); "prompts": a prompt list (AlignProp, online RL)
    many_grad_calls   the loss calls the denoiser with gradient more than once per backward, so the trainer runs
                      every micro-batch under no_sync and all-reduces the gradients itself
    loss(model, batch) -> (loss, metrics)   metrics: detached scalar tensors, averaged over accumulation
    loss_parts(model, batch)   what the trainer calls: (loss, metrics) terms, each backpropagated as soon as it is
                      made (their losses sum to the loss, their metrics add up); by default the one term loss().
                      GRPO yields one term per trained step, so one step's graph is alive at a time

Online methods add a collection phase, which the trainer runs for them:

    prepare(model, batch) -> batch   once per drawn micro-batch, without gradient, in the training precision
                      (GRPO: sample, score, advantages); the batch it returns is what ``loss`` receives
    updates_per_batch the optimizer steps taken on each prepared batch (GRPO's updates per rollout); the trainer
                      holds the prepared batches in between, in its checkpoints too (keys starting with "_" are
                      transient: not saved, so ``loss`` rebuilds them when missing)
    minibatches       M: the trainer prepares M steps' worth of micro-batches before the first update, then each
                      of M optimizer steps trains on the next step's worth (ddpo-pytorch: sample 32, update on
                      4 x 8); the M steps repeat ``updates_per_batch`` times
    state_dict() / load_state_dict(state)   state carried across steps (DDPO's per-prompt statistics), saved
                      with each checkpoint
    gather(tensor)    set by the trainer: the tensor concatenated over all processes in rank order (identity
                      with one process), for statistics over the global batch

Batches carry ``seeds``: one integer per example from (train.seed, the epoch, the example's index;
``data.sampler.example_seeds``), so a method can draw an example's noise the same way whatever the process
count or batch layout, and ahead of training (precomputed reference errors).

A method sees only the model contract (``models/base.py``) and ``model.schedule``; it never names a model
family, a network class or a schedule type (``tests/test_layering.py`` checks this).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from diffalign.models.base import DiffusionModel


class Method:
    needs_reference: ClassVar[bool] = False
    data: ClassVar[str] = "pairs"
    many_grad_calls: ClassVar[bool] = False
    updates_per_batch: ClassVar[int] = 1
    minibatches: ClassVar[int] = 1

    def loss(self, model: DiffusionModel, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def loss_parts(self, model: DiffusionModel, batch: dict) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        yield self.loss(model, batch)

    def prepare(self, model: DiffusionModel, batch: dict) -> dict:
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    @staticmethod
    def gather(tensor: Tensor) -> Tensor:
        return tensor
