"""A stage's optimizer and learning-rate schedule: built from its settings, restored
from a checkpoint."""

from __future__ import annotations

from typing import Any

from fastsd.train.settings import TrainSettings


def build_optimizer(params: list, cfg: dict[str, Any], settings: TrainSettings, device,
                    num_processes: int = 1):
    """The optimizer and learning-rate schedule of a stage: 8-bit AdamW (bitsandbytes, which
    has CPU kernels too) when asked, else torch's fused AdamW (one kernel for all tensors),
    over one flat buffer where the trained tensors are small (:mod:`fastsd.train.flat`)."""
    import torch
    from diffusers.optimization import get_scheduler

    from fastsd.train import flat

    if settings.adam_8bit and device.type in ("cuda", "cpu"):
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg["lr"], weight_decay=settings.weight_decay)
    else:
        kind = flat.FlatAdamW if flat.wanted(params, num_processes) else torch.optim.AdamW
        optimizer = kind(params, lr=cfg["lr"], weight_decay=settings.weight_decay,
                         fused=settings.fused_adam and device.type in ("cpu", "cuda"))
    schedule = get_scheduler(cfg["schedule"], optimizer, num_warmup_steps=cfg["warmup"],
                             num_training_steps=cfg["steps"])
    return optimizer, schedule


def trained_tensors(optimizer) -> list:
    """The tensors ``optimizer`` steps (for clipping their gradients): the trained
    parameters, or the one flat buffer that holds them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def drop_gradients(optimizer, params: list) -> None:
    """Free the stage's gradients when it ends: the trained parameters' and, where the
    optimizer steps one flat buffer, the buffer's (of which theirs are views)."""
    for p in [*params, *trained_tensors(optimizer)]:
        p.grad = None


def restore_optimizer(optimizer, schedule, objects: dict[str, Any], extended: bool) -> None:
    """Load a checkpoint's optimizer and schedule. After a change of the stage's step count
    the schedule (built for the new total) sets the learning rate of the step reached."""
    import warnings

    optimizer.load_state_dict(objects["optimizer"])
    schedule.load_state_dict(objects["lr_scheduler"])
    if extended:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lrs = schedule.get_lr()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        schedule._last_lr = lrs
