"""A stage's optimizer and learning-rate schedule: built from its settings, restored
from a checkpoint."""

from __future__ import annotations

from typing import Any

from fastsd.train.settings import TrainSettings


def build_optimizer(params: list, cfg: dict[str, Any], settings: TrainSettings, device):
    """The optimizer and learning-rate schedule of a stage: 8-bit AdamW (bitsandbytes, which
    has CPU kernels too) when asked, else torch's fused AdamW (one kernel for all tensors)."""
    import torch
    from diffusers.optimization import get_scheduler

    if settings.adam_8bit and device.type in ("cuda", "cpu"):
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg["lr"], weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=settings.weight_decay,
                                      fused=settings.fused_adam and device.type in ("cpu", "cuda"))
    schedule = get_scheduler(cfg["schedule"], optimizer, num_warmup_steps=cfg["warmup"],
                             num_training_steps=cfg["steps"])
    return optimizer, schedule


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
