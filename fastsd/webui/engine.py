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
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastsd import __version__, drive, env, models
from fastsd.errors import FastSDError, ModelError
from fastsd.webui import infotext, memory, samplers
from fastsd.webui.catalog import Catalog, Checkpoint
from fastsd.webui.params import GenerationParams
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")


class OutOfMemory(FastSDError):
    """The device ran out of memory for one request; the engine has freed it and goes on."""


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


def _resize(img, w: int, h: int, mode: int):
    from PIL import Image, ImageOps

    img = img.convert("RGB")
    if mode == 1:
        return ImageOps.fit(img, (w, h), Image.Resampling.LANCZOS)
    if mode == 2:
        return ImageOps.pad(img, (w, h), Image.Resampling.LANCZOS)
    return img.resize((w, h), Image.Resampling.LANCZOS)


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
        self.applied: memory.MemoryPolicy | None = None  # the policy in force
        self._pipes: dict[str, Any] = {}
        self._loras: set[str] = set()
        self._offloaded: str | None = None

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
        self._offloaded = None
        memory.free_memory()

    def folder_of(self, ckpt: Checkpoint) -> Path:
        """The diffusers folder of a checkpoint; a single file goes through the workspace's
        one model resolver (converted once, kept in the workspace's converted/). A model on
        Drive is loaded from its local-disk copy (models.stage)."""
        if ckpt.folder is not None:
            return models.stage(ckpt.folder)
        return models.stage(models.resolve_model(ckpt.path, self.workspace))

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

    def _load(self, ckpt: Checkpoint, folder: Path) -> None:
        import torch
        from diffusers import DiffusionPipeline

        from fastsd.convert.detect import detect_folder

        det = detect_folder(folder)
        if not det.convertible:
            raise ModelError(f"{ckpt.title} is {det.describe()}, not a model to generate with.")
        info = env.device_info()
        device = self.device or info.device
        policy = self.policy.resolve(info, memory.Weights.of_folder(folder))
        dtype = torch.float16 if policy.fp16 else torch.float32
        start = time.perf_counter()
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        index = drive.read_json(folder / "model_index.json")
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        memory.apply(pipe, policy, device)
        self.checkpoint, self.family, self.inpainting = ckpt, det.family or "sd1", det.inpainting
        self.applied, self._device = policy, device
        self._pipes = {"base": pipe}
        log.info("Loaded %s (%s) on %s in %.1fs; memory: %s", ckpt.title, det.describe(),
                 device, time.perf_counter() - start,
                 ", ".join(k for k, v in policy.to_dict().items() if v) or "plain fp32")

    def pipeline(self, mode: str = "txt2img"):
        """The pipeline for a mode, sharing the loaded components."""
        from diffusers import (AutoPipelineForImage2Image, AutoPipelineForInpainting,
                               AutoPipelineForText2Image)

        if self.inpainting:
            mode = "inpaint"  # an inpainting model does every mode through its own pipeline
        if mode not in self._pipes:
            base = self._pipes["base"]
            cls = {"txt2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                   "inpaint": AutoPipelineForInpainting}[mode]
            self._pipes[mode] = cls.from_pipe(base)
            self._pipes[mode].set_progress_bar_config(disable=True)
        pipe = self._pipes[mode]
        if self.applied and self.applied.cpu_offload and self._device == "cuda" \
                and self._offloaded != mode:
            pipe.enable_model_cpu_offload()
            self._offloaded = mode
        return pipe

    @property
    def native_size(self) -> int:
        pipe = self._pipes.get("base")
        if pipe is None:
            return 512
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

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
        for pipe in self._pipes.values():
            pipe._interrupt = False
        memory.free_memory()

    def _generate(self, p: GenerationParams, control: Control) -> Result:
        import torch
        from PIL import Image

        sampler, schedule = samplers.resolve(p.sampler_name, p.scheduler)
        mode = p.mode
        pipe = self.pipeline(mode)
        pipe.scheduler = samplers.build(self._pipes["base"].scheduler.config, sampler, schedule)
        prompt, warnings = self._apply_loras(pipe, p.prompt)
        negative = p.negative_prompt  # A1111 reads LoRA tags in the positive prompt only
        first_seed = random.randrange(0, 2**32 - 1) if p.seed == -1 else p.seed
        total = p.batch_size * p.n_iter
        seeds = [(first_seed + i) % 2**32 for i in range(total)]
        W, H = p.width, p.height

        inits, masks, boxes, originals, full_mask = self._prepare_inputs(p)
        images: list[Any] = []
        interrupted = False
        for b in range(p.n_iter):
            if control.interrupt:
                interrupted = True
                break
            control.begin_batch()
            batch_seeds = seeds[b * p.batch_size:(b + 1) * p.batch_size]
            gens = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]

            def on_step(pipe_, i, t, kw, _b=b):
                if control.on_step is not None:
                    control.on_step(i + 1, getattr(pipe_, "_num_timesteps", 0) or p.steps,
                                    kw.get("latents"))
                if control.skip or control.interrupt:
                    pipe_._interrupt = True
                return kw

            call: dict[str, Any] = dict(
                prompt=[prompt] * p.batch_size, negative_prompt=[negative] * p.batch_size,
                num_inference_steps=p.steps, guidance_scale=p.cfg_scale, generator=gens,
                callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
            idx = [(b * p.batch_size + k) % len(inits) for k in range(p.batch_size)] \
                if inits else []
            if mode == "txt2img" and not self.inpainting:
                call.update(width=W, height=H)
            elif mode == "img2img" and not self.inpainting:
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
            with torch.inference_mode():
                out = pipe(**call).images
            stopped = bool(getattr(pipe, "_interrupt", False))
            pipe._interrupt = False
            if masks:
                out = [self._composite(o, originals[idx[k]], full_mask,
                                       boxes[idx[k]] if boxes else None)
                       for k, o in enumerate(out)]
            images += out
            if stopped and control.interrupt:
                interrupted = True
                break
        seeds = seeds[:len(images)]
        infotexts = [self._infotext(p, prompt_raw=p.prompt, seed=s, sampler=sampler,
                                    schedule=schedule) for s in seeds]
        info = self._info(p, seeds, infotexts, sampler, schedule)
        return Result(images, seeds, infotexts, info, p, interrupted, warnings)

    # ------------------------------------------------------------------ inputs

    def _prepare_inputs(self, p: GenerationParams):
        """Init images and masks at the request's size; for inpaint-only-masked, the crops
        of the masked area and their boxes; the originals and the whole mask to paste back."""
        from PIL import Image, ImageFilter, ImageOps

        W, H = p.width, p.height
        inits = [_resize(im, W, H, p.resize_mode) for im in p.init_images]
        if p.mask is None:
            return inits, [], [], inits, None
        mask = p.mask.convert("L")
        if p.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        mask = _resize(mask, W, H, p.resize_mode).convert("L")
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

    def _infotext(self, p: GenerationParams, prompt_raw: str, seed: int, sampler, schedule) -> str:
        name, label = samplers.label(sampler, schedule)
        ck = self.checkpoint
        settings: dict[str, Any] = {
            "Steps": p.steps, "Sampler": name, "Schedule type": label,
            "CFG scale": f"{p.cfg_scale:g}", "Seed": seed, "Size": f"{p.width}x{p.height}",
            "Model hash": ck.hash if ck else None, "Model": ck.model_name if ck else None,
            "Denoising strength": f"{p.denoising_strength:g}" if p.init_images else None,
            "Mask blur": p.mask_blur if p.mask is not None else None,
            "Inpaint area": "Only masked" if p.mask is not None and p.inpaint_full_res else None,
            "Masked area padding": p.inpaint_full_res_padding
            if p.mask is not None and p.inpaint_full_res else None,
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
            "denoising_strength": p.denoising_strength if p.init_images else None,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
            "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": bool(self.inpainting),
            "version": f"fastsd {__version__}",
        }
