"""AdamW over one flat buffer: the trained weights, their gradients and the moments each
live in one contiguous tensor, so that a step is a few calls on one tensor instead of
the same calls on each of hundreds.

What it is for: a stage trains hundreds of tensors (684 in an SD 1.x UNet, a few hundred
LoRA adapters), and the clipping, the optimizer step and the zeroing of the gradients each
cost a little per tensor on top of their arithmetic. Where the tensors are small (LoRA
adapters, the tiny models) that overhead is most of those calls' time: on the race's tiny
UNet (``benchmarks/bench_race.py``) they took about 9 ms of a 39 ms step on the CPU, about
3 ms over one buffer.

How: each trained parameter's ``.data`` becomes a view into the flat weight buffer and its
``.grad`` a view into the flat gradient buffer, so the model and the backward pass are
unchanged (backward adds into the views), and the optimizer sees one parameter, the whole
buffer. The gradients are zeroed in place after each step, freed only at the stage's end,
so they hold their memory through the next forward pass: that is why :func:`wanted` keeps
the buffer to trained weights of at most ``MAX_BYTES`` (LoRA adapters, small models), and a
full fine-tune of a real model keeps torch's per-tensor AdamW (whose gradients are freed
after each step).

The state dict has the per-tensor layout of ``torch.optim.AdamW`` (one entry per trained
tensor, in order), so a checkpoint resumes with either optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

#: trained weights up to this size go into one buffer (the gradients, of the same size,
#: stay allocated through the forward pass)
MAX_BYTES = 512 << 20


def wanted(params: list, num_processes: int) -> bool:
    """Whether the flat buffer suits these trained parameters: one process (a multi-GPU
    run's gradient reduction writes the gradients itself), one dtype and device, dense
    tensors that share no memory, and at most ``MAX_BYTES`` in all."""
    if num_processes != 1 or not params:
        return False
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device or p.is_sparse
           or not p.is_floating_point() for p in params):
        return False
    if len({p.data_ptr() for p in params}) != len(params):
        return False
    return sum(p.numel() for p in params) * first.element_size() <= MAX_BYTES


class FlatAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` over ``params`` packed into one buffer (see the module)."""

    def __init__(self, params: list, **kwargs: Any) -> None:
        self.members = list(params)
        first = self.members[0]
        total = sum(p.numel() for p in self.members)
        weights = torch.empty(total, dtype=first.dtype, device=first.device)
        grads = torch.zeros_like(weights)
        self.spans: list[tuple[int, int]] = []
        offset = 0
        for p in self.members:
            n = p.numel()
            weights[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = weights[offset:offset + n].view_as(p)
            p.grad = grads[offset:offset + n].view_as(p)
            self.spans.append((offset, n))
            offset += n
        self.flat = torch.nn.Parameter(weights)
        self.flat.grad = grads
        self._checked = False
        super().__init__([self.flat], **kwargs)

    def linked(self) -> bool:
        """Whether every trained tensor and its gradient are still views of the buffers (a
        module moved to another device or dtype has left them, and would not be trained)."""
        w, g = self.flat.data_ptr(), self.flat.grad.data_ptr() if self.flat.grad is not None else 0
        size = self.flat.element_size()
        return all(p.data_ptr() == w + offset * size and p.grad is not None
                   and p.grad.data_ptr() == g + offset * size
                   for p, (offset, _) in zip(self.members, self.spans))

    @torch.no_grad()
    def step(self, closure=None):
        if not self._checked:  # once: a model moved after packing would silently not learn
            if not self.linked():
                raise RuntimeError("the trained weights were moved after their optimizer was "
                                   "built; build it after placing the model")
            self._checked = True
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer in place: the parameters' gradients are views of it."""
        if self.flat.grad is not None:
            self.flat.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The per-tensor layout of ``torch.optim.AdamW``: each trained tensor's moments (views
        of the buffers, copied by whoever keeps them) and its own copy of the step count (an
        optimizer that loads them steps each count once per tensor)."""
        packed = super().state_dict()
        group = {**packed["param_groups"][0], "params": list(range(len(self.members)))}
        whole = packed["state"].get(0)
        state = {}
        if whole:
            for i, (p, (offset, n)) in enumerate(zip(self.members, self.spans)):
                state[i] = {k: v[offset:offset + n].view_as(p) if self._is_buffer(v)
                            else v.clone() if isinstance(v, torch.Tensor) else v
                            for k, v in whole.items()}  # a step count each, as torch's has
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict in the per-tensor layout (from this or from torch's AdamW)."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.members):
            raise ValueError(
                f"the checkpoint's optimizer has {sum(len(g['params']) for g in groups)} "
                f"tensors in {len(groups)} group(s); this stage trains {len(self.members)} in "
                "one. Resume with the settings the run was started with.")
        states = [state_dict["state"].get(i) for i in groups[0]["params"]]
        whole: dict[str, Any] = {}
        if any(s is not None for s in states):
            if any(s is None for s in states):
                raise ValueError("the checkpoint's optimizer state is missing some tensors' "
                                 "moments; it is damaged. Resume from an earlier checkpoint.")
            for key, value in states[0].items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0:
                    whole[key] = value.clone() if isinstance(value, torch.Tensor) else value
                    continue
                parts = [s[key] for s in states]
                for part, p in zip(parts, self.members):
                    if part.shape != p.shape:
                        raise ValueError(f"the checkpoint's optimizer state holds a tensor of "
                                         f"shape {tuple(part.shape)} where this stage trains "
                                         f"one of {tuple(p.shape)}: another model or LoRA rank.")
                whole[key] = torch.cat([t.reshape(-1).to(self.flat.device) for t in parts])
        super().load_state_dict({"state": {0: whole} if whole else {},
                                 "param_groups": [{**groups[0], "params": [0]}]})

    def _is_buffer(self, v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() == self.flat.numel()
