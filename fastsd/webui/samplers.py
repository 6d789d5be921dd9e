"""The one list of AUTOMATIC1111 sampler and schedule names, mapped to diffusers schedulers.

A1111 names a sampler ("DPM++ 2M") and, since 1.9, a schedule type ("Karras") apart;
older clients still send the joined name ("DPM++ 2M Karras"). Both spellings resolve
here to one diffusers scheduler class, its keyword arguments, and the schedule's own
keyword arguments. Everything else (the API's /samplers and /schedulers, validation, the
infotext) reads these tables.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from fastsd.errors import DataError


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111's name
    cls: str  # diffusers scheduler class
    kwargs: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    schedule: str = "automatic"  # what "Automatic" means for this sampler (as in A1111)


@dataclass(frozen=True)
class Schedule:
    name: str  # A1111's lower-case name
    label: str  # A1111's label
    kwargs: dict[str, Any] = field(default_factory=dict)


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP, ("k_dpmpp_2m",), "karras"),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde",), "karras"),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, ("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3},
            ("k_dpmpp_3m_sde",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", {}, ("k_euler",)),
    Sampler("LMS", "LMSDiscreteScheduler", {}, ("k_lms",)),
    Sampler("Heun", "HeunDiscreteScheduler", {}, ("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2",), "karras"),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a",), "karras"),
    Sampler("DDIM", "DDIMScheduler", {}, ("ddim",)),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms",)),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, ("unipc",)),
    Sampler("LCM", "LCMScheduler", {}, ("k_lcm",)),
)

SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic"),
    Schedule("karras", "Karras", {"use_karras_sigmas": True}),
    Schedule("exponential", "Exponential", {"use_exponential_sigmas": True}),
    Schedule("beta", "Beta", {"use_beta_sigmas": True}),
    Schedule("sgm_uniform", "SGM Uniform", {"timestep_spacing": "trailing"}),
)

DEFAULT_SAMPLER = "Euler a"
_BY_NAME = {k.lower(): s for s in SAMPLERS for k in (s.name, *s.aliases)}
_SCHEDULE_BY_NAME = {k.lower(): s for s in SCHEDULES for k in (s.name, s.label)}


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def _supports(cls_name: str, schedule: Schedule) -> bool:
    import diffusers

    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    return all(k in params for k in schedule.kwargs)


def resolve(sampler_name: str | None, scheduler: str | None = None) -> tuple[Sampler, Schedule]:
    """The sampler and schedule a request names, or a DataError listing the known ones.

    ``sampler_name`` may carry the schedule ("DPM++ 2M Karras"), as A1111 before 1.9
    spelled it; an explicit ``scheduler`` other than Automatic wins over that suffix.
    """
    name = (sampler_name or DEFAULT_SAMPLER).strip()
    schedule = _SCHEDULE_BY_NAME.get((scheduler or "automatic").strip().lower())
    if schedule is None:
        raise DataError(f"Unknown scheduler {scheduler!r}. Known: "
                        f"{', '.join(s.label for s in SCHEDULES)}.")
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        for s in SCHEDULES[1:]:
            if name.lower().endswith(" " + s.label.lower()):
                sampler = _BY_NAME.get(name[: -len(s.label) - 1].strip().lower())
                if sampler is not None and schedule.name == "automatic":
                    schedule = s
                break
    if sampler is None:
        raise DataError(f"Unknown sampler {sampler_name!r}. Known: {', '.join(sampler_names())} "
                        "(optionally followed by a schedule such as ' Karras').")
    if schedule.name == "automatic":
        schedule = _SCHEDULE_BY_NAME[sampler.schedule]
    if not _supports(sampler.cls, schedule):
        raise DataError(f"The sampler {sampler.name!r} has no {schedule.label} schedule here "
                        f"(diffusers' {sampler.cls} has no {', '.join(schedule.kwargs)}). "
                        "Choose another schedule, or Automatic.")
    return sampler, schedule


def build(config: Any, sampler: Sampler, schedule: Schedule):
    """A new scheduler of ``sampler``'s class from a model's scheduler ``config`` (which keeps
    the model's betas and prediction type), with the sampler's and schedule's options."""
    import diffusers

    cls = getattr(diffusers, sampler.cls)
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        base.pop(k, None)
    return cls.from_config(base, **sampler.kwargs, **schedule.kwargs)


def label(sampler: Sampler, schedule: Schedule) -> tuple[str, str]:
    """(sampler name, schedule label) as an A1111 infotext writes them."""
    return sampler.name, schedule.label


def api_samplers() -> list[dict]:
    """GET /sdapi/v1/samplers."""
    return [{"name": s.name, "aliases": list(s.aliases),
             "options": {"scheduler": s.schedule} if s.schedule != "automatic" else {}}
            for s in SAMPLERS]


def api_schedulers() -> list[dict]:
    """GET /sdapi/v1/schedulers."""
    return [{"name": s.name, "label": s.label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for s in SCHEDULES]
