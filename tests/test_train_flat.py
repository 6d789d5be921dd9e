"""The flat AdamW (fastsd.train.flat): the same steps as torch's AdamW, checkpoints in
torch's layout that resume with either, the cases it stays out of, and the training run
that uses it."""

from __future__ import annotations

import copy

import pytest
import torch

from fastsd.train import flat
from fastsd.train.optim import drop_gradients, trained_tensors


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                               torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))


def train_steps(m: torch.nn.Module, opt, steps: int, seed: int = 1) -> None:
    """Steps as the trainer takes them: backward, clip the optimizer's tensors, step, zero."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        m(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(trained_tensors(opt), 0.05)
        opt.step()
        opt.zero_grad(set_to_none=True)


def weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def close(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


KW = dict(lr=1e-2, weight_decay=1e-2, fused=True)


def test_flat_adamw_takes_the_steps_torchs_adamw_takes():
    a, b = model(), model()
    start = weights(a)
    opt_a = torch.optim.AdamW(list(a.parameters()), **KW)
    opt_b = flat.FlatAdamW(list(b.parameters()), **KW)
    assert len(trained_tensors(opt_b)) == 1  # the one buffer is what is clipped and stepped
    train_steps(a, opt_a, 6)
    train_steps(b, opt_b, 6)
    assert not close(weights(a), start)  # it trained
    assert close(weights(a), weights(b))
    # the model's own tensors are the buffer: the optimizer's update is the model's
    assert opt_b.linked()
    assert b[0].weight.data_ptr() == opt_b.flat.data_ptr()


def test_its_checkpoint_has_torchs_layout_and_resumes_with_either_optimizer():
    a, b = model(), model()
    opt_a = torch.optim.AdamW(list(a.parameters()), **KW)
    opt_b = flat.FlatAdamW(list(b.parameters()), **KW)
    train_steps(a, opt_a, 3)
    train_steps(b, opt_b, 3)
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for i in sd_a["state"]:
        assert sd_a["state"][i].keys() == sd_b["state"][i].keys()
        for k, v in sd_a["state"][i].items():
            assert torch.allclose(v, sd_b["state"][i][k], rtol=1e-5, atol=1e-8), (i, k)

    # each resumes the other's checkpoint (weights and optimizer state)
    a2, b2 = model(5), model(6)
    a2.load_state_dict(b.state_dict())
    b2.load_state_dict(a.state_dict())
    opt_a2 = torch.optim.AdamW(list(a2.parameters()), **KW)
    opt_b2 = flat.FlatAdamW(list(b2.parameters()), **KW)
    opt_a2.load_state_dict(copy.deepcopy(sd_b))  # as read from a checkpoint: nothing shared
    opt_b2.load_state_dict(copy.deepcopy(sd_a))
    train_steps(a, opt_a, 3, seed=2)
    train_steps(a2, opt_a2, 3, seed=2)
    train_steps(b2, opt_b2, 3, seed=2)
    assert close(weights(a), weights(a2))
    assert close(weights(a), weights(b2))


def test_a_checkpoint_of_other_tensors_is_refused_with_what_differs():
    a = model()
    opt_a = torch.optim.AdamW(list(a.parameters()), **KW)
    train_steps(a, opt_a, 1)
    small = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="this stage trains 2"):
        flat.FlatAdamW(list(small.parameters()), **KW).load_state_dict(opt_a.state_dict())
    other = model()
    other[4] = torch.nn.Linear(8 * 6 * 6, 7)
    with pytest.raises(ValueError, match=r"shape \(5, 288\) where this stage trains one of \(7, 288\)"):
        flat.FlatAdamW(list(other.parameters()), **KW).load_state_dict(opt_a.state_dict())


def test_a_model_moved_after_packing_is_refused_rather_than_silently_not_trained():
    m = model()
    opt = flat.FlatAdamW(list(m.parameters()), **KW)
    m.double()
    m(torch.randn(1, 3, 8, 8, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="moved after their optimizer was built"):
        opt.step()


def test_the_gradients_are_zeroed_in_place_and_freed_at_the_stage_end():
    m = model()
    params = list(m.parameters())
    opt = flat.FlatAdamW(params, **KW)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    assert opt.flat.grad.abs().sum() > 0
    opt.zero_grad(set_to_none=True)
    assert opt.flat.grad.abs().sum() == 0 and opt.linked()
    drop_gradients(opt, params)
    assert all(p.grad is None for p in params) and opt.flat.grad is None


def test_where_the_flat_buffer_is_used(monkeypatch):
    small = list(model().parameters())
    assert flat.wanted(small, 1)
    assert not flat.wanted(small, 2)  # a multi-GPU run reduces the gradients itself
    assert not flat.wanted(small + [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], 1)
    tied = torch.nn.Parameter(small[0].data[0])  # shares memory with another trained tensor
    assert not flat.wanted(small + [tied], 1)
    # a full fine-tune at real size keeps per-tensor AdamW, whose gradients are freed
    size = sum(p.numel() * 4 for p in small)
    monkeypatch.setattr(flat, "MAX_BYTES", size - 1)
    assert not flat.wanted(small, 1)
    monkeypatch.setattr(flat, "MAX_BYTES", size)
    assert flat.wanted(small, 1)


def test_a_training_run_steps_one_buffer_and_checkpoints_each_tensors_moments(workspace,
                                                                              tiny_sd1):
    from test_train import FAST, link_tiny
    from test_train_resume import make_subject_session

    from fastsd.train import TrainSettings, train
    from fastsd.train.checkpoint import latest

    link_tiny(workspace, "sd1", tiny_sd1)
    session = make_subject_session("flat", workspace, n=2)
    seen = {}

    def hook(event: str, info: dict) -> None:
        unet = info["parts"].unet if event in ("stage_start", "stage_end") else None
        if event == "stage_start":
            seen["shapes"] = [tuple(p.shape) for p in unet.parameters() if p.requires_grad]
        if event == "stage_end":  # the UNet's weights were stepped as one buffer
            seen["storages"] = {p.untyped_storage().data_ptr() for p in unet.parameters()}
            seen["grads"] = [p.grad for p in unet.parameters() if p.grad is not None]
    s = TrainSettings(**{**FAST, "checkpoint_every": 2}, unet_steps=3, text_steps=0)
    result = train(session, s, on_event=hook)
    assert result.global_step == 3
    assert len(seen["storages"]) == 1 and seen["grads"] == []  # and its gradients freed
    opt = latest(session.checkpoints).object("optimizer")
    # torch's layout: one entry per trained tensor of the UNet, each of its shape
    assert len(opt["param_groups"][0]["params"]) == len(seen["shapes"]) == len(opt["state"])
    assert [tuple(st["exp_avg"].shape) for st in opt["state"].values()] == seen["shapes"]
    assert all(st["exp_avg_sq"].abs().sum() > 0 for st in opt["state"].values())


def test_a_grad_scaler_unscales_and_skips_steps_on_the_buffer_as_on_each_tensor():
    """fp16 training's loss scaling (torch's GradScaler, which accelerate uses): the scaled
    gradients are unscaled in the buffer, and a step with an inf gradient is skipped."""
    results = []
    for kind in (torch.optim.AdamW, flat.FlatAdamW):
        m = model()
        opt = kind(list(m.parameters()), **KW)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        g = torch.Generator().manual_seed(3)
        skipped = []
        for i in range(4):
            x = torch.randn(4, 3, 8, 8, generator=g)
            loss = m(x).pow(2).mean() * (float("inf") if i == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(trained_tensors(opt), 0.05)
            before = weights(m)
            scaler.step(opt)
            scaler.update()
            skipped.append(close(before, weights(m)))
            opt.zero_grad(set_to_none=True)
        results.append((weights(m), skipped, scaler.get_scale()))
    (wa, skip_a, scale_a), (wb, skip_b, scale_b) = results
    assert skip_a == skip_b == [False, False, True, False]
    assert scale_a == scale_b
    assert close(wa, wb)
