"""The original Stable Diffusion 2.x inference config (.yaml) that AUTOMATIC1111 reads.

The web UI finds ``MODEL.yaml`` beside ``MODEL.safetensors``. For SD 2.x it needs it to
build the OpenCLIP text encoder and, for 768-v models, the v-prediction
(``parameterization: "v"``) objective. The text is written here from the model's own
diffusers configs, with the fields of Stability AI's v2-inference(-v).yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastsd import drive

SD2_TEMPLATE = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
{parameterization}    linear_start: {beta_start}
    linear_end: {beta_end}
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: {timesteps}
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: {latent_size}
    channels: {latent_channels}
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: {scaling_factor}
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: {in_channels}
        out_channels: {out_channels}
        model_channels: {model_channels}
        attention_resolutions: [ {attention_resolutions} ]
        num_res_blocks: {num_res_blocks}
        channel_mult: [ {channel_mult} ]
        num_head_channels: {num_head_channels}
        use_spatial_transformer: True
        use_linear_in_transformer: {use_linear}
        transformer_depth: 1
        context_dim: {context_dim}
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {latent_channels}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {latent_channels}
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: {vae_ch}
          ch_mult:
{vae_mult}          num_res_blocks: {vae_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def sd2_yaml(folder: Path, v_prediction: bool) -> str:
    """The v2-inference(-v).yaml text for the SD 2.x diffusers model in ``folder``."""

    def cfg(component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text(encoding="utf-8"))

    unet, vae = cfg("unet"), cfg("vae")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text(encoding="utf-8")) if sched_path.is_file() else {}
    ch = unet["block_out_channels"]
    heads = unet["attention_head_dim"]
    heads0 = heads[0] if isinstance(heads, list) else heads
    res, attn = 1, []
    for i, t in enumerate(unet["down_block_types"]):
        if t.startswith("CrossAttn"):
            attn.append(res)
        res *= 2
    vch = vae["block_out_channels"]
    return SD2_TEMPLATE.format(
        parameterization='    parameterization: "v"\n' if v_prediction else "",
        beta_start=sched.get("beta_start", 0.00085), beta_end=sched.get("beta_end", 0.012),
        timesteps=sched.get("num_train_timesteps", 1000),
        latent_size=unet["sample_size"], latent_channels=vae["latent_channels"],
        scaling_factor=vae.get("scaling_factor", 0.18215),
        in_channels=unet["in_channels"], out_channels=unet["out_channels"],
        model_channels=ch[0], attention_resolutions=", ".join(map(str, sorted(attn,
                                                                                reverse=True))),
        num_res_blocks=unet["layers_per_block"],
        channel_mult=", ".join(str(c // ch[0]) for c in ch),
        num_head_channels=ch[0] // heads0, use_linear=bool(unet.get("use_linear_projection")),
        context_dim=unet["cross_attention_dim"], vae_ch=vch[0],
        vae_mult="".join(f"          - {c // vch[0]}\n" for c in vch),
        vae_res_blocks=vae["layers_per_block"])


def write_sd2_yaml(folder: Path, dst: Path, v_prediction: bool) -> Path:
    return drive.atomic_write_text(dst, sd2_yaml(folder, v_prediction))
