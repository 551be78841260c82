"""Reference decodes of tiny random diffusers `AutoencoderKL`s, for tests/vae_diffusers.rs.

usage: vae_reference.py OUT_DIR

Builds, with fixed seeds and in float32, three SD3-like VAEs (latent_channels 16, no quant
convs unless said otherwise), saves each with `save_pretrained`, and writes next to it random
latents (H != W) and diffusers' own decode of them, exactly as the SD3 pipeline decodes:
`vae.decode(latents / scaling_factor + shift_factor).sample`.

  a/          vae folder: block_out_channels [16, 32, 32] (3 up blocks, x4), norm groups 8,
              layers_per_block 1, mid-block attention, shift 0.0609, f32, one file
  b/vae/      inside a pipeline folder (b/model_index.json): [8, 16] (2 up blocks, x2),
              norm groups 4, layers_per_block 2, no mid-block attention,
              use_post_quant_conv True, stored in float16, sharded (max_shard_size)
  c/          vae folder: [8, 16], norm groups 4, shift_factor null, stored in bfloat16
  <name>.safetensors   {"latents": [B, 16, h, w], "sample": [B, 3, H, W]} (float32)
  versions.json        the diffusers / torch versions that made them

Low-precision storage: the reference is decoded in float32 from the stored (rounded) weights,
which is what flowrun does when it loads them. Pinned versions: diffusers 0.42.1, torch 2.9.0;
others print a NOTICE on stderr (and are recorded in versions.json).
"""
import json
import os
import sys

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

PINNED = {"diffusers": "0.42.1", "torch": "2.9.0"}


def build(seed, block_out_channels, groups, layers, **kw):
    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=groups,
        sample_size=64,
        scaling_factor=1.5305,
        **kw,
    ).float()
    # Non-trivial norm affines and biases, so that a wrong group count, a missing affine or a
    # dropped bias shows in the output.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return vae.eval()


def reference(vae, dtype, latents_shape, seed):
    """Round the weights through `dtype` (as stored), decode in float32."""
    vae = vae.to(dtype).float()
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(latents_shape, generator=g, dtype=torch.float32)
    cfg = vae.config
    shift = cfg.shift_factor if cfg.shift_factor is not None else 0.0
    with torch.no_grad():
        sample = vae.decode(latents / cfg.scaling_factor + shift).sample
    return latents, sample


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    versions = {"diffusers": diffusers.__version__, "torch": torch.__version__.split("+")[0]}
    for k, want in PINNED.items():
        if versions[k] != want:
            print(f"NOTICE: {k} {versions[k]} (pinned: {want})", file=sys.stderr)
    torch.set_num_threads(1)
    diffusers.utils.logging.set_verbosity_error()

    # a: f32, one file, 3 up blocks, attention, shift 0.0609.
    a = build(1, [16, 32, 32], 8, 1, shift_factor=0.0609, use_quant_conv=False,
              use_post_quant_conv=False)
    a.save_pretrained(os.path.join(out, "a"), safe_serialization=True)
    lat, ref = reference(a, torch.float32, (2, 16, 6, 5), 11)
    save_file({"latents": lat.contiguous(), "sample": ref.contiguous()},
              os.path.join(out, "a.safetensors"))

    # b: pipeline folder, f16, sharded, post_quant_conv, no mid attention, 2 layers per block.
    b = build(2, [8, 16], 4, 2, shift_factor=0.0609, use_quant_conv=False,
              use_post_quant_conv=True, mid_block_add_attention=False)
    pipe = os.path.join(out, "b")
    b.half().save_pretrained(os.path.join(pipe, "vae"), safe_serialization=True,
                             max_shard_size="20KB")
    with open(os.path.join(pipe, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline",
                   "_diffusers_version": diffusers.__version__,
                   "vae": ["diffusers", "AutoencoderKL"]}, f, indent=2)
    lat, ref = reference(b, torch.float16, (3, 16, 7, 4), 12)
    save_file({"latents": lat.contiguous(), "sample": ref.contiguous()},
              os.path.join(out, "b.safetensors"))

    # c: bf16, shift_factor null.
    c = build(3, [8, 16], 4, 1, shift_factor=None, use_quant_conv=True,
              use_post_quant_conv=False)
    c.to(torch.bfloat16).save_pretrained(os.path.join(out, "c"), safe_serialization=True)
    lat, ref = reference(c, torch.bfloat16, (1, 16, 5, 8), 13)
    save_file({"latents": lat.contiguous(), "sample": ref.contiguous()},
              os.path.join(out, "c.safetensors"))

    with open(os.path.join(out, "versions.json"), "w") as f:
        json.dump(versions, f)
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
