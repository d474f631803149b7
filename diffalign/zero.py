"""Whole state of a DeepSpeed ZeRO engine's trainable weights and Adam state, and setting it back.

ZeRO keeps fp32 master weights and Adam moments partitioned over the processes (stage 3 partitions the module's
own parameters too). A checkpoint gathers them whole through DeepSpeed's ``safe_get_full_*`` accessors into the
files an unsharded run writes (the LoRA file or the denoiser folder) plus a name-keyed optimizer file, as the
FSDP2 path does; DeepSpeed's own per-rank pickles are never written or read. Every function here is a collective
(the accessors all-reduce each fragment): every process calls it, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def _inner(engine: Any) -> torch.optim.Optimizer:
    """The client torch optimizer under ZeRO's wrapper: its groups hold the flat fp32 partitions."""
    return engine.optimizer.optimizer


def _full(param: torch.nn.Parameter, moment: str | None = None) -> torch.Tensor:
    """The whole fp32 master (or Adam moment) of one parameter, on its device: a collective."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if moment is None else safe_get_full_optimizer_state(param, moment)
    if value is None:
        raise RuntimeError("DeepSpeed holds no fp32 master for a trainable parameter; is the optimizer ZeRO's?")
    return value.detach()


def _cpu(value: torch.Tensor) -> torch.Tensor:
    return value.to("cpu", torch.float32)


def _flat_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """This process's flat fp32 partitions, the tensors Adam's state is keyed by (DeepSpeed internals: stage 3
    names them ``fp32_partitioned_groups_flat``, stages 1 and 2 ``single_partition_of_fp32_groups``)."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        if hasattr(zero_optimizer, name):
            return list(getattr(zero_optimizer, name))
    raise RuntimeError(f"this DeepSpeed version's {type(zero_optimizer).__name__} has neither "
                       "fp32_partitioned_groups_flat nor single_partition_of_fp32_groups; resume needs one")


def full_weights(engine: Any, trainable_only: bool, keep: bool) -> dict[str, torch.Tensor]:
    """The fp32 masters of the trainable parameters by name, whole on the CPU of the process with ``keep`` (an
    empty dict on the others, which only take part); with ``trainable_only=False`` also the frozen parameters and
    the buffers, so the dict is the module's state."""
    from deepspeed import zero

    module, out = engine.module, {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            value = _full(param)
        elif not trainable_only:
            with zero.GatheredParameters([param]):      # a no-op below stage 3
                value = param.detach().to("cpu").clone()
        else:
            continue
        if keep:
            out[name] = _cpu(value)
    if keep and not trainable_only:
        keys = module.state_dict().keys()
        out.update({k: b.detach().to("cpu").clone() for k, b in module.named_buffers() if k in keys})
    return out


def full_optimizer_state(engine: Any, keep: bool) -> dict[str, Any]:
    """Adam's moments whole and keyed by parameter name, with the step count and the group settings: the layout
    ``torch.distributed.checkpoint`` gives an FSDP2 run. Whole on the CPU of the process with ``keep`` only."""
    inner = _inner(engine)
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    state = {}
    if steps:                                            # before the first update Adam has no state yet
        step = torch.as_tensor(steps[0], dtype=torch.float32).detach().cpu()
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                moments = {m: _full(param, m) for m in ADAM_MOMENTS}        # every process takes part
                if keep:
                    state[name] = {"step": step.clone(), **{m: _cpu(v) for m, v in moments.items()}}
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names} for g in inner.param_groups]
    return {"state": state, "param_groups": groups}


def load_weights(engine: Any, weights: dict[str, torch.Tensor], trainable_only: bool) -> list[str]:
    """Set the fp32 masters and the module's own copies from whole tensors (every process passes the same dict);
    returns the module's names that ``weights`` lacks (frozen ones too unless ``trainable_only``)."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param

    missing = []
    for name, param in engine.module.named_parameters():
        if name not in weights:
            if param.requires_grad or not trainable_only:
                missing.append(name)
            continue
        if trainable_only and not param.requires_grad:
            continue
        value = weights[name].to(param.device, torch.float32)
        if param.requires_grad:
            safe_set_full_fp32_param(param, value)
        with zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():   # stage 3: re-partitioned
            param.copy_(value.to(param.dtype))                                      # on leaving
    return missing


def _make_adam_state(zero_optimizer: Any, inner: torch.optim.Optimizer, step: torch.Tensor) -> None:
    """Adam's state for every flat partition, made when no step has run yet (kept where it exists), at ``step``.
    ZeRO-3 with NVMe optimizer offload keeps a subgroup's fp32 partition and Adam state on disk: it is swapped in
    to read its size and out again, which also registers the state made here with the swapper (DeepSpeed
    internals)."""
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    on_disk = getattr(zero_optimizer, "_swappable_optimizer_subgroup", lambda i: False)
    for i, flat in enumerate(_flat_partitions(zero_optimizer)):
        if on_disk(i):
            zero_optimizer._optimizer_states_and_gradient_swap_in(i)
        slot = inner.state[flat]
        for m in ADAM_MOMENTS:
            slot.setdefault(m, torch.zeros_like(flat, memory_format=torch.preserve_format))
        slot["step"] = step.clone().to(flat.device if on_device else "cpu")
        if on_disk(i):
            zero_optimizer._optimizer_states_and_gradient_swap_out(i)


def load_optimizer_state(engine: Any, state: dict[str, Any]) -> None:
    """Put a :func:`full_optimizer_state` back: the group settings, the step, and each parameter's moments."""
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _inner(engine)
    for group, saved in zip(inner.param_groups, state["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    if not state["state"]:
        return
    _make_adam_state(engine.optimizer, inner, next(iter(state["state"].values()))["step"])
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:                                 # stage 1 / 2 point each parameter at its slice of it
        link()
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            for m in ADAM_MOMENTS:
                safe_set_full_optimizer_state(param, state["state"][name][m].to(param.device, torch.float32), m)
