"""The generation engine: one diffusers pipeline on the device, and what it can make.

:class:`Engine` loads a checkpoint from its :class:`~fastsd.webui.catalog.Catalog` (the
previous one leaves the device first), and :meth:`Engine.generate` runs one request
(txt2img, img2img or inpainting; batch size and count; seeds; sampler; LoRAs named in the
prompt as ``<lora:NAME:WEIGHT>``). It is not thread-safe: one worker
(:mod:`fastsd.webui.worker`) owns it. A :class:`Control` lets that worker follow the steps,
skip the current batch or interrupt the job.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from fastsd import __version__, drive, env, models
from fastsd.models import tiny
from fastsd.errors import FastSDError, ModelError, OutOfMemory
from fastsd.webui import controlnet, imaging, infotext, memory, samplers
from fastsd.webui.catalog import Catalog, Checkpoint
from fastsd.webui.params import (LATENT_UPSCALERS, PIXEL_UPSCALERS, GenerationParams,
                                 InvalidRequest)
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


class GenerationFailed(FastSDError):
    """A request failed inside the pipeline; the engine goes on."""


@dataclass
class Control:
    """How a running job is followed and stopped (the worker owns one per job)."""

    on_step: Callable[[int, int, Any], None] | None = None  # (step, total, latents)
    skip: bool = False  # end the current batch, go on with the next
    interrupt: bool = False  # end the current batch and the job

    def begin_batch(self) -> None:
        self.skip = False


@dataclass
class Result:
    images: list[Any]  # PIL images
    seeds: list[int]
    infotexts: list[str]
    info: dict[str, Any]  # A1111's "info" object
    params: GenerationParams
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """One pipeline call of a request and how it ended."""

    pipe: Any
    steps: int  # the call's num_inference_steps
    done: int  # steps of the request done so far (progress)
    out: Any = None  # PIL images, or latents when a later stage follows
    stopped: bool = False  # skipped or interrupted
    switched: float | None = None  # the last timestep before the refiner takes over


_PIL_FILTERS = {"lanczos": "LANCZOS", "nearest": "NEAREST", "nearest-exact": "NEAREST",
                "bilinear": "BILINEAR", "bicubic": "BICUBIC"}


class _Hires:
    """Hires fix between its passes: the first pass's latents (a latent upscaler) or images
    resized to the upscaled size, then centre-cropped to hr_resize_x by hr_resize_y where
    their ratio differs from the first pass's (as A1111 does)."""

    def __init__(self, p: GenerationParams, inpainting: bool):
        self.to_w, self.to_h, self.width, self.height = p.hires_size()
        # an inpainting model's second pass takes images: its latents are resized as pixels
        self.pixels = inpainting or p.upscaler in PIXEL_UPSCALERS
        self.kind = PIXEL_UPSCALERS.get(p.upscaler) or LATENT_UPSCALERS[p.upscaler][0]
        self.antialias = p.upscaler in LATENT_UPSCALERS and LATENT_UPSCALERS[p.upscaler][1]
        self.maps: list[Any] = []  # the ControlNet maps at the second pass's size

    def upscale(self, out):
        import torch
        from PIL import Image

        dx, dy = (self.to_w - self.width) // 8, (self.to_h - self.height) // 8
        if isinstance(out, torch.Tensor):
            big = torch.nn.functional.interpolate(
                out, size=(self.to_h // 8, self.to_w // 8), mode=self.kind,
                antialias=self.antialias)
            return big[:, :, dy // 2: big.shape[2] - (dy + 1) // 2,
                       dx // 2: big.shape[3] - (dx + 1) // 2]
        resample = getattr(Image.Resampling, _PIL_FILTERS[self.kind])
        x0, y0 = dx // 2 * 8, dy // 2 * 8
        return [im.resize((self.to_w, self.to_h), resample).crop(
            (x0, y0, x0 + self.width, y0 + self.height)) for im in out]


# Linear maps from the 4 latent channels to RGB, for the cheap step preview.
_PREVIEW = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264),
           (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755),
             (-0.3112, -0.2359, -0.2076)),
}


def preview_image(latents, family: str, size: tuple[int, int] | None = None):
    """A rough RGB picture of the first latent of a batch: one 4x3 matrix product."""
    import torch
    from PIL import Image

    lat = latents[0].detach().float().cpu()
    m = torch.tensor(_PREVIEW["sdxl" if family == "sdxl" else "sd"])
    rgb = torch.einsum("chw,cr->hwr", lat[:4], m)
    arr = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    return img.resize(size, Image.Resampling.BILINEAR) if size else img


def _expand_box(box, w: int, h: int, pad: int, img_w: int, img_h: int):
    """The mask's box grown by ``pad`` and to the aspect ratio w:h, inside the image."""
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(img_w, x1 + pad), min(img_h, y1 + pad)
    bw, bh = x1 - x0, y1 - y0
    ratio = w / h
    if bw / bh < ratio:
        grow = int(bh * ratio) - bw
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = int(bw / ratio) - bh
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    # shift back inside the image, then clip
    for lo, hi, size, i in ((x0, x1, img_w, 0), (y0, y1, img_h, 1)):
        if lo < 0:
            lo, hi = 0, hi - lo
        if hi > size:
            lo, hi = max(0, lo - (hi - size)), size
        if i == 0:
            x0, x1 = lo, hi
        else:
            y0, y1 = lo, hi
    return x0, y0, x1, y1


class Engine:
    """One pipeline on one device. Not thread-safe: a single worker calls it."""

    def __init__(self, catalog: Catalog, policy: memory.MemoryPolicy | None = None,
                 device: str | None = None, workspace: Workspace | None = None):
        self.catalog = catalog
        self.policy = policy or memory.MemoryPolicy()
        self.device = device
        self.workspace = workspace  # single files are converted once into its converted/
        self.checkpoint: Checkpoint | None = None
        self.family = "sd1"
        self.inpainting = False
        self.tiny = False  # a tiny test model (fastsd.models.tiny) is loaded
        self.applied: memory.MemoryPolicy | None = None  # the policy in force
        self._pipes: dict[Any, Any] = {}  # "base", a mode, or (mode, ControlNet titles)
        self._loras: set[str] = set()
        self._offloaded: set[Any] = set()  # the pipelines with offload hooks
        self._nets: dict[str, Any] = {}  # ControlNet title -> its loaded ControlNetModel
        self._refiner: tuple[Checkpoint, Any, Any] | None = None  # (ckpt, pipe, scheduler)
        self._budget: Any = None  # the device (its free VRAM) before the model was loaded
        self._gib: dict[str, float] = {}  # weights (fp32 GiB) by model path

    # ------------------------------------------------------------------ models

    @property
    def loaded(self) -> bool:
        return bool(self._pipes)

    def unload(self) -> None:
        """The current pipeline leaves the device, and its memory is given back."""
        if self._pipes:
            log.info("Unloading %s", self.checkpoint.title if self.checkpoint else "the model")
        self._pipes.clear()
        self._loras.clear()
        self._offloaded.clear()
        self._nets.clear()
        self._refiner = None
        memory.free_memory()

    def folder_of(self, ckpt: Checkpoint) -> Path:
        """The diffusers folder of a checkpoint; a single file goes through the workspace's
        one model resolver (converted once, kept in the workspace's converted/). A model on
        Drive is loaded from its local-disk copy (models.local_copy)."""
        if ckpt.folder is not None:
            return models.local_copy(ckpt.folder)
        return models.local_copy(models.resolve_model(ckpt.path, self.workspace))

    def load(self, name: str | Checkpoint) -> Checkpoint:
        """Load a catalog checkpoint (by title or name). The old model leaves the device first;
        when the new one fails to load, the old one is loaded again and the error raised."""
        ckpt = name if isinstance(name, Checkpoint) else self.catalog.find(name)
        folder = self.folder_of(ckpt)
        previous = self.checkpoint if self.loaded else None
        self.unload()
        try:
            self._load(ckpt, folder)
        except Exception as e:
            self.unload()
            if previous is not None and previous is not ckpt:
                log.warning("Loading %s failed; loading %s again", ckpt.title, previous.title)
                self._load(previous, self.folder_of(previous))
            if isinstance(e, FastSDError):
                raise
            raise ModelError(f"Could not load {ckpt.title}: {str(e).splitlines()[0][:300]}. "
                             "Check that it is a whole Stable Diffusion model.") from e
        return ckpt

    def _weights(self, path: Path) -> float:
        key = str(path)
        if key not in self._gib:
            self._gib[key] = memory.weights_gib(path)
        return self._gib[key]

    def _load(self, ckpt: Checkpoint, folder: Path) -> None:
        import torch

        from fastsd.convert.detect import detect_folder

        det = detect_folder(folder)
        if not det.convertible:
            raise ModelError(f"{ckpt.title} is {det.describe()}, not a model to generate with.")
        info = env.device_info()
        device = self.device or info.device
        policy = self.policy.resolve(info, self._weights(folder))
        dtype = torch.float16 if policy.fp16 else torch.float32
        start = time.perf_counter()
        pipe = self._from_pretrained(folder, dtype)
        memory.apply(pipe, policy, device)
        self.checkpoint, self.family, self.inpainting = ckpt, det.family or "sd1", det.inpainting
        self.tiny = tiny.is_tiny(dict(pipe.unet.config))
        self.applied, self._device, self._budget = policy, device, info
        self._folder = folder
        self._pipes = {"base": pipe}
        if policy.cpu_offload and device == "cuda":
            self._offloaded.add("base")
        log.info("Loaded %s (%s) on %s in %.1fs; memory: %s", ckpt.title, det.describe(),
                 device, time.perf_counter() - start,
                 ", ".join(k for k, v in policy.to_dict().items() if v) or "plain fp32")

    @staticmethod
    def _from_pretrained(folder: Path, dtype):
        from diffusers import DiffusionPipeline

        kwargs: dict[str, Any] = {"dtype": dtype}
        index = drive.read_json(folder / "model_index.json")
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, mode: str = "txt2img", nets: tuple[str, ...] = ()):
        """The pipeline for a mode (with the loaded ControlNets titled ``nets``), sharing the
        loaded components."""
        from diffusers import (AutoPipelineForImage2Image, AutoPipelineForInpainting,
                               AutoPipelineForText2Image)

        if self.inpainting:
            mode = "inpaint"  # an inpainting model does every mode through its own pipeline
        key: Any = (mode, nets) if nets else mode
        if key not in self._pipes:
            base = self._pipes["base"]
            cls = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                   "inpaint": AutoPipelineForInpainting}[mode]
            extra = {}
            if nets:
                loaded = [self._nets[t] for t in nets]
                extra["controlnet"] = loaded[0] if len(loaded) == 1 else loaded
            self._pipes[key] = cls.from_pipe(base, **extra)
            self._pipes[key].set_progress_bar_config(disable=True)
        pipe = self._pipes[key]
        if self.applied and self.applied.cpu_offload and self._device == "cuda" \
                and key not in self._offloaded:
            pipe.enable_model_cpu_offload()
            self._offloaded = {key}  # the hooks of the shared parts now serve this one
        return pipe

    @property
    def native_size(self) -> int:
        pipe = self._pipes.get("base")
        if pipe is None:
            return 512
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    # ------------------------------------------------------------------ ControlNet, refiner

    def controlnets(self, units: list) -> tuple[str, ...]:
        """Load the ControlNets ``units`` name and return their titles, one per unit. When
        they differ from the loaded ones, those leave first (and their memory is given
        back) before the new ones load."""
        wanted = []
        for unit in units:
            try:
                wanted.append(self.catalog.controlnet(unit.model))
            except ModelError:
                self.catalog.refresh()  # one downloaded since the list was read
                try:
                    wanted.append(self.catalog.controlnet(unit.model))
                except ModelError as e:
                    raise InvalidRequest(f"{unit.where('model')}: {e}") from None
        titles = tuple(c.title for c in wanted)
        if not titles:
            return titles
        gone = [t for t in self._nets if t not in titles]
        if gone:
            for key in [k for k in self._pipes if isinstance(k, tuple)
                        and any(t in k[1] for t in gone)]:
                del self._pipes[key]
                self._offloaded.discard(key)
            for t in gone:
                log.info("Unloading the ControlNet %s", t)
                del self._nets[t]
            memory.free_memory()
        base = self._pipes["base"]
        for unit, c in zip(units, wanted):
            if c.title in self._nets:
                continue
            start = time.perf_counter()
            try:
                net = controlnet.load(models.local_copy(c.path), c.title, dict(base.unet.config),
                                      self.checkpoint.title if self.checkpoint else "the model",
                                      base.unet.dtype)
            except ModelError as e:
                raise InvalidRequest(f"{unit.where('model')}: {e}") from None
            net.eval()
            if not (self.applied and self.applied.cpu_offload and self._device == "cuda"):
                net.to(self._device)
            self._nets[c.title] = net
            log.info("Loaded the ControlNet %s in %.1fs", c.title, time.perf_counter() - start)
        return titles

    def refiner(self, name: str):
        """The refiner pipeline (an SDXL img2img pipeline) of the checkpoint ``name``; a
        different refiner leaves first."""
        from diffusers import AutoPipelineForImage2Image

        from fastsd.convert.detect import detect_folder

        if self.family != "sdxl":
            raise InvalidRequest(f"refiner_checkpoint needs an SDXL model; "
                                 f"{self.checkpoint.title if self.checkpoint else 'the model'} "
                                 f"is {self.family}. Leave refiner_checkpoint out.")
        try:
            ckpt = self.catalog.find(name)
        except ModelError as e:
            raise InvalidRequest(f"refiner_checkpoint: {e}") from None
        if self._refiner is not None and self._refiner[0] is ckpt:
            return self._refiner[1], self._refiner[0]
        if self._refiner is not None:
            log.info("Unloading the refiner %s", self._refiner[0].title)
            self._refiner = None
            memory.free_memory()
        folder = self.folder_of(ckpt)
        det = detect_folder(folder)
        if det.kind != "refiner" and det.family != "sdxl":
            raise InvalidRequest(f"refiner_checkpoint {ckpt.title} is {det.describe()}; a "
                                 "refiner must be an SDXL refiner or an SDXL model.")
        pipe = self._from_pretrained(folder, self._pipes["base"].unet.dtype)
        if "Img2Img" not in type(pipe).__name__:
            pipe = AutoPipelineForImage2Image.from_pipe(pipe)
            pipe.set_progress_bar_config(disable=True)
        memory.apply(pipe, self.applied or memory.MemoryPolicy(), self._device)
        self._refiner = (ckpt, pipe, pipe.scheduler.config)
        self._gib.setdefault(str(ckpt.path), memory.weights_gib(folder))
        log.info("Loaded the refiner %s", ckpt.title)
        return pipe, ckpt

    def plan(self, p: GenerationParams) -> tuple[memory.MemoryPolicy, dict[str, float]]:
        """The memory policy a request needs (from the weights of the model, its ControlNets
        and refiner, and the request's working memory at its largest pass) and that working
        memory's estimate, in GiB."""
        w, h = p.hires_size()[:2] if p.hires else (p.width, p.height)
        work = memory.work_gib(self.family, w, h, p.batch_size, len(p.controlnet))
        weights = self._weights(self._folder)
        for name in {u.model for u in p.controlnet}:
            try:
                weights += self._weights(self.catalog.controlnet(name).path)
            except ModelError:
                pass  # reported with the field's name when the ControlNets load
        if p.refiner_checkpoint:
            try:
                weights += self._weights(self.catalog.find(p.refiner_checkpoint).path)
            except ModelError:
                pass
        device = self._budget or env.device_info()
        return self.policy.resolve(device, weights, work), work

    def _use(self, policy: memory.MemoryPolicy) -> None:
        """Put a request's memory policy in force: the VAE and attention savers now, model
        offload where the next pipeline is used (it stays on until the model is loaded
        again)."""
        if self.applied is not None and self.applied.cpu_offload:
            policy = replace(policy, cpu_offload=True)
        if policy != self.applied:
            for pipe in [self._pipes["base"], *([self._refiner[1]] if self._refiner else [])]:
                memory.adjust(pipe, policy)
            if policy.cpu_offload and self._device == "cuda":
                for net in self._nets.values():
                    net.to("cpu")
        self.applied = policy

    # ------------------------------------------------------------------ LoRA

    def _apply_loras(self, pipe, prompt: str) -> tuple[str, list[str]]:
        """Activate the LoRAs a prompt names with ``<lora:NAME:WEIGHT>``; returns the prompt
        without the tags and warnings for LoRAs that are not there."""
        wanted: dict[str, float] = {}
        warnings = []
        for m in LORA_TAG.finditer(prompt):
            name, weight = m.group(1).strip(), m.group(2)
            try:
                w = float(weight) if weight not in (None, "") else 1.0
            except ValueError:
                warnings.append(f"LoRA {name!r}: weight {weight!r} is not a number; used 1.0")
                w = 1.0
            lora = self.catalog.lora(name)
            if lora is None:
                warnings.append(f"LoRA {name!r} is not in the models' Lora folders; left out")
                continue
            adapter = re.sub(r"\W", "_", lora.name)
            if adapter not in self._loras:
                pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name,
                                       adapter_name=adapter)
                self._loras.add(adapter)
            wanted[adapter] = wanted.get(adapter, 0.0) + w
        if self._loras:
            if wanted:
                pipe.enable_lora()
                pipe.set_adapters(list(wanted), adapter_weights=list(wanted.values()))
            else:
                pipe.disable_lora()
        return LORA_TAG.sub("", prompt).strip(), warnings

    # ------------------------------------------------------------------ generation

    def generate(self, params: GenerationParams, control: Control | None = None) -> Result:
        """Run one request. Raises OutOfMemory (memory freed), GenerationFailed or
        InvalidRequest; the engine stays usable after each."""
        import torch

        if not self.loaded:
            raise ModelError("No model is loaded. Load one first (POST /sdapi/v1/options "
                             "with sd_model_checkpoint, or Engine.load).")
        params.validate()
        control = control or Control()
        try:
            return self._generate(params, control)
        except torch.OutOfMemoryError as e:
            oom = (f"Out of GPU memory making {params.batch_size} image(s) of "
                   f"{params.width}x{params.height} with {self.checkpoint.name if self.checkpoint else '?'}"
                   f" ({str(e).splitlines()[0][:160]}). The memory is freed; try a smaller size or "
                   "batch size, or turn on fastsd_attention_slicing, fastsd_vae_tiling or "
                   "fastsd_cpu_offload in the options.")
        except (FastSDError, KeyboardInterrupt):
            raise
        except Exception as e:  # reported to the request that caused it, with its cause
            if not (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
                log.exception("Generation failed")
                raise GenerationFailed(f"Generation failed: {type(e).__name__}: "
                                       f"{(str(e).splitlines() or [''])[0][:300]}") from e
            oom = f"Out of device memory: {str(e)[:200]}. Try a smaller size or batch size."
        # freed only now: the exception's traceback held the frames, and their activations
        self._after_oom()
        raise OutOfMemory(oom)

    def _after_oom(self) -> None:
        for pipe in [*self._pipes.values(), *([self._refiner[1]] if self._refiner else [])]:
            pipe._interrupt = False
        memory.free_memory()

    def _generate(self, p: GenerationParams, control: Control) -> Result:
        import torch
        from PIL import Image

        sampler, schedule = samplers.resolve(p.sampler_name, p.scheduler)
        policy, work = self.plan(p)
        self._use(policy)
        nets = self.controlnets(p.controlnet)
        refiner = self.refiner(p.refiner_checkpoint) if p.refiner_checkpoint else None
        mode = p.mode
        pipe = self.pipeline(mode, nets)
        config = self._pipes["base"].scheduler.config
        pipe.scheduler = samplers.build(config, sampler, schedule)
        hr_pipe = None
        if p.hires:
            hr_pipe = self.pipeline("img2img", nets)
            hr_pipe.scheduler = samplers.build(config, sampler, schedule)
        if refiner is not None:
            refiner[0].scheduler = samplers.build(self._refiner[2], sampler, schedule)
        prompt, warnings = self._apply_loras(pipe, p.prompt)
        negative = p.negative_prompt  # A1111 reads LoRA tags in the positive prompt only
        first_seed = random.randrange(0, 2**32 - 1) if p.seed == -1 else p.seed
        total = p.batch_size * p.n_iter
        seeds = [(first_seed + i) % 2**32 for i in range(total)]
        W, H = p.width, p.height

        inits, masks, boxes, originals, full_mask = self._prepare_inputs(p)
        maps = [self._crop_map(controlnet.control_map(u, p.init_images[0] if p.init_images
                                                      else None, W, H), boxes)
                for u in p.controlnet]
        hr = _Hires(p, self.inpainting) if p.hires else None
        if hr is not None and p.controlnet:
            hr.maps = [controlnet.control_map(u, None, hr.width, hr.height)
                       for u in p.controlnet]
        if hr is not None and self.inpainting and p.upscaler in LATENT_UPSCALERS:
            warnings.append(f"hr_upscaler {p.upscaler}: an inpainting model's hires fix "
                            "resizes the decoded image, not the latents")
        first_steps = p.steps if mode == "txt2img" else int(p.steps * p.denoising_strength)
        steps_total = first_steps + (int(p.hr_steps * p.denoising_strength) if hr else 0)
        images: list[Any] = []
        interrupted = refined = False
        for b in range(p.n_iter):
            if control.interrupt:
                interrupted = True
                break
            control.begin_batch()
            batch_seeds = seeds[b * p.batch_size:(b + 1) * p.batch_size]

            def gens():
                return [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]

            call: dict[str, Any] = dict(
                prompt=[prompt] * p.batch_size, negative_prompt=[negative] * p.batch_size,
                num_inference_steps=p.steps, guidance_scale=p.cfg_scale, generator=gens())
            idx = [(b * p.batch_size + k) % len(inits) for k in range(p.batch_size)] \
                if inits else []
            pipe_mode = "inpaint" if self.inpainting else mode
            if pipe_mode == "txt2img":
                call.update(width=W, height=H)
            elif pipe_mode == "img2img":
                call.update(image=[inits[i] for i in idx], strength=p.denoising_strength)
            else:  # inpainting, or any mode on an inpainting model
                if inits:
                    img_in = [inits[i] for i in idx]
                    mask_in = [masks[i] if masks else Image.new("L", (W, H), 255) for i in idx]
                    strength = p.denoising_strength
                else:
                    img_in = [Image.new("RGB", (W, H), (127, 127, 127))] * p.batch_size
                    mask_in = [Image.new("L", (W, H), 255)] * p.batch_size
                    strength = 1.0
                call.update(image=img_in, mask_image=mask_in, strength=strength,
                            width=img_in[0].width, height=img_in[0].height)
            self._control_args(call, pipe_mode, maps, p.controlnet, hires=False)
            switch = p.refiner_switch_at if refiner is not None and hr is None else None
            if hr is not None:
                call["output_type"] = "pil" if hr.pixels else "latent"
            elif switch is not None:
                call["output_type"] = "latent"
            run = self._run(pipe, call, control, 0, steps_total, switch, nets, p)
            out = run.out
            if hr is not None and not run.stopped:
                out = hr.upscale(out)
                call2: dict[str, Any] = dict(
                    prompt=[prompt] * p.batch_size, negative_prompt=[negative] * p.batch_size,
                    num_inference_steps=p.hr_steps, guidance_scale=p.cfg_scale,
                    generator=gens(), image=out, strength=p.denoising_strength)
                if self.inpainting:
                    call2.update(mask_image=[Image.new("L", (hr.width, hr.height), 255)]
                                 * p.batch_size, width=hr.width, height=hr.height)
                self._control_args(call2, "inpaint" if self.inpainting else "img2img",
                                   hr.maps, p.controlnet, hires=True)
                switch = p.refiner_switch_at if refiner is not None else None
                if switch is not None:
                    call2["output_type"] = "latent"
                run = self._run(hr_pipe, call2, control, run.done, steps_total, switch, nets, p)
                out = run.out
            if run.switched is not None and not run.stopped:
                out = self._refine(refiner[0], run, prompt, negative, p, gens(), control,
                                   steps_total)
                refined = True
            if isinstance(out, torch.Tensor):  # stopped before a stage that would decode
                out = self._decode(run.pipe, out)
            if masks:
                out = [self._composite(o, originals[idx[k]], full_mask,
                                       boxes[idx[k]] if boxes else None)
                       for k, o in enumerate(out)]
            images += out
            if run.stopped and control.interrupt:
                interrupted = True
                break
        seeds = seeds[:len(images)]
        extra = self._extra_params(p, nets, refiner[1] if refined else None)
        infotexts = [self._infotext(p, prompt_raw=p.prompt, seed=s, sampler=sampler,
                                    schedule=schedule, extra=extra) for s in seeds]
        info = self._info(p, seeds, infotexts, sampler, schedule)
        info.update(extra_generation_params=extra,
                    memory={"work_gib": work, "policy": self.applied.to_dict()
                            if self.applied else {}})
        return Result(images, seeds, infotexts, info, p, interrupted, warnings)

    def _run(self, pipe, call: dict, control: Control, done: int, total: int,
             switch: float | None, nets: tuple[str, ...] = (),
             p: GenerationParams | None = None) -> "_Run":
        """One pipeline call, followed step by step (progress counted on from ``done`` of
        ``total``, skip, interrupt); with ``switch``, it stops once that fraction of its
        steps is done (A1111's refiner switch), keeping the latents and the last timestep.
        ``nets`` are the ControlNets of the pipeline, in the order of ``p``'s units."""
        import torch

        run = _Run(pipe, steps=call["num_inference_steps"], done=done)

        def on_step(pipe_, i, t, kw):
            n = getattr(pipe_, "_num_timesteps", 0) or run.steps
            run.done = done + i + 1
            if control.on_step is not None:
                control.on_step(run.done, total or n, kw.get("latents"))
            if control.skip or control.interrupt:
                pipe_._interrupt = True
                run.stopped = True
            elif switch is not None and i + 1 < n and i + 1 >= math.ceil(switch * n):
                pipe_._interrupt = True
                run.switched = float(t)
            return kw

        call.update(callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
        modes = controlnet.ControlModes([self._nets[t] for t in nets],
                                        [u.control_mode for u in p.controlnet] if nets else [],
                                        bool(p and p.cfg_scale > 1))
        with torch.inference_mode(), modes:
            run.out = pipe(**call).images
        pipe._interrupt = False
        return run

    def _refine(self, pipe, run: "_Run", prompt: str, negative: str, p: GenerationParams,
                generators: list, control: Control, total: int):
        """The refiner's part: the steps after the switch, from the base's latents."""
        start = 1.0 - run.switched / pipe.scheduler.config.num_train_timesteps
        call = dict(prompt=[prompt] * p.batch_size, negative_prompt=[negative] * p.batch_size,
                    image=run.out, num_inference_steps=run.steps, denoising_start=start,
                    guidance_scale=p.cfg_scale, generator=generators)
        return self._run(pipe, call, control, run.done, total, None).out

    @staticmethod
    def _decode(pipe, latents):
        """Latents (as a pipeline returns them with output_type="latent") to PIL images."""
        import torch

        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config,
                                                                      "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        with torch.inference_mode():
            image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        return pipe.image_processor.postprocess(image, output_type="pil")

    def _control_args(self, call: dict, mode: str, maps: list, units: list,
                      hires: bool) -> None:
        """The ControlNet arguments of a pipeline call: each unit's map, weight (0 in a pass
        its hr_option leaves it out of) and guidance start and end."""
        if not units:
            return
        one = len(units) == 1
        scales = [u.weight if u.in_pass(hires) else 0.0 for u in units]
        call["image" if mode == "txt2img" else "control_image"] = maps[0] if one else maps
        call.update(controlnet_conditioning_scale=scales[0] if one else scales,
                    control_guidance_start=units[0].guidance_start if one else
                    [u.guidance_start for u in units],
                    control_guidance_end=units[0].guidance_end if one else
                    [u.guidance_end for u in units])

    @staticmethod
    def _crop_map(image, boxes: list):
        """A control map for inpainting only the masked area: the same crop as the image."""
        from PIL import Image

        if not boxes:
            return image
        return image.crop(boxes[0]).resize(image.size, Image.Resampling.LANCZOS)

    # ------------------------------------------------------------------ inputs

    def _prepare_inputs(self, p: GenerationParams):
        """Init images and masks at the request's size; for inpaint-only-masked, the crops
        of the masked area and their boxes; the originals and the whole mask to paste back."""
        from PIL import Image, ImageFilter, ImageOps

        W, H = p.width, p.height
        inits = [imaging.resize(im, W, H, p.resize_mode) for im in p.init_images]
        if p.mask is None:
            return inits, [], [], inits, None
        mask = p.mask.convert("L")
        if p.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        mask = imaging.resize(mask, W, H, p.resize_mode).convert("L")
        if p.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(p.mask_blur))
        originals = inits
        if p.inpainting_fill == 0:  # fill the hole with the colour around it
            inits = [self._fill(im, mask) for im in inits]
        if not p.inpaint_full_res:
            return inits, [mask] * len(inits), [], originals, mask
        box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
        if box is None:  # an empty mask: nothing to repaint
            return inits, [mask] * len(inits), [], originals, mask
        box = _expand_box(box, W, H, p.inpaint_full_res_padding, W, H)
        crops = [im.crop(box).resize((W, H), Image.Resampling.LANCZOS) for im in inits]
        mcrop = mask.crop(box).resize((W, H), Image.Resampling.LANCZOS)
        return crops, [mcrop] * len(crops), [box] * len(crops), originals, mask

    @staticmethod
    def _fill(img, mask):
        from PIL import Image, ImageStat

        hard = mask.point(lambda v: 255 if v > 127 else 0)
        keep = Image.eval(hard, lambda v: 255 - v)
        if keep.getbbox() is None:
            return img
        mean = tuple(int(c) for c in ImageStat.Stat(img, keep).mean)
        return Image.composite(Image.new("RGB", img.size, mean), img, hard)

    @staticmethod
    def _composite(out, original, mask, box):
        """Paste the repainted pixels onto the original through the (blurred) mask, so
        unmasked pixels stay exactly as they were."""
        from PIL import Image

        if box is not None:
            x0, y0, x1, y1 = box
            layer = original.copy()
            layer.paste(out.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))
            out = layer
        return Image.composite(out.convert("RGB"), original, mask)

    # ------------------------------------------------------------------ records

    def _extra_params(self, p: GenerationParams, nets: tuple[str, ...],
                      refiner: Checkpoint | None) -> dict[str, Any]:
        """What A1111 (and its ControlNet extension) add to the infotext for ControlNet,
        hires fix and the refiner, under their names."""
        extra: dict[str, Any] = {f"ControlNet {u.index}": u.infotext(title)
                                 for u, title in zip(p.controlnet, nets)}
        if p.hires:
            if p.hr_resize_x == 0 and p.hr_resize_y == 0:
                extra["Hires upscale"] = f"{p.hr_scale:g}"
            else:
                extra["Hires resize"] = f"{p.hr_resize_x}x{p.hr_resize_y}"
            if p.hr_second_pass_steps:
                extra["Hires steps"] = p.hr_second_pass_steps
            if p.hr_upscaler:
                extra["Hires upscaler"] = p.hr_upscaler
        if refiner is not None:
            extra["Refiner"] = f"{refiner.model_name} [{refiner.hash}]"
            extra["Refiner switch at"] = f"{p.refiner_switch_at:g}"
        return extra

    def _infotext(self, p: GenerationParams, prompt_raw: str, seed: int, sampler, schedule,
                  extra: dict[str, Any] | None = None) -> str:
        name, label = samplers.label(sampler, schedule)
        ck = self.checkpoint
        settings: dict[str, Any] = {
            "Steps": p.steps, "Sampler": name, "Schedule type": label,
            "CFG scale": f"{p.cfg_scale:g}", "Seed": seed, "Size": f"{p.width}x{p.height}",
            "Model hash": ck.hash if ck else None, "Model": ck.model_name if ck else None,
            "Denoising strength": f"{p.denoising_strength:g}"
            if p.init_images or p.hires else None,
            "Mask blur": p.mask_blur if p.mask is not None else None,
            "Inpaint area": "Only masked" if p.mask is not None and p.inpaint_full_res else None,
            "Masked area padding": p.inpaint_full_res_padding
            if p.mask is not None and p.inpaint_full_res else None,
            **(extra or {}),
            "Version": f"fastsd {__version__}",
        }
        return infotext.format(prompt_raw, p.negative_prompt, settings)

    def _info(self, p: GenerationParams, seeds: list[int], infotexts: list[str], sampler,
              schedule) -> dict[str, Any]:
        ck = self.checkpoint
        n = len(seeds)
        return {
            "prompt": p.prompt, "all_prompts": [p.prompt] * n,
            "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * n,
            "seed": seeds[0] if seeds else p.seed, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
            "width": p.width, "height": p.height, "sampler_name": sampler.name,
            "scheduler": schedule.label, "cfg_scale": p.cfg_scale, "steps": p.steps,
            "batch_size": p.batch_size, "n_iter": p.n_iter, "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": ck.model_name if ck else None, "sd_model_hash": ck.hash if ck else None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": p.denoising_strength if p.init_images or p.hires else None,
            "enable_hr": p.hires,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": bool(self.inpainting),
            "version": f"fastsd {__version__}",
        }
