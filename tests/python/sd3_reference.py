#!/usr/bin/env python3
"""Reference outputs of diffusers' SD3Transformer2DModel for tests/sd3_diffusers.rs.

Usage: sd3_reference.py OUT_DIR

For each case below, builds a tiny random SD3Transformer2DModel in float32 with a fixed seed,
saves it with `save_pretrained` (as a pipeline folder, a transformer folder, sharded, or in
float16 / bfloat16), reloads it with `from_pretrained(..., torch_dtype=float32)` (so the
reference is what diffusers computes from the saved files), and writes OUT_DIR/<case>.safetensors:

  x [B, C, H, W], sigma [B], prompt_embeds [B, L, J], pooled [B, P]      the inputs
  velocity = transformer(x, prompt_embeds, pooled, timestep=sigma*1000).sample
  negative_prompt_embeds, negative_pooled, v_uncond (the same with the negative prompt)
  v_cfg = v_uncond + s*(velocity - v_uncond), s = metadata cfg_scale (4.5)
  w (fixed random, like velocity), and torch autograd gradients of sum(velocity * w):
  grad.x, grad.prompt_embeds, grad.pooled, grad.param.<name> (PyTorch layout) for the
  weights listed in metadata grad_params.

Metadata also names the model folder (`folder`, relative to OUT_DIR) and the stored dtype.
Pinned: diffusers 0.42.1, torch 2.9.0 (exits with status 3 and says so otherwise).
"""

import json
import os
import sys

PINNED = {"diffusers": "0.42.1", "torch": "2.9.0"}
CFG_SCALE = 4.5

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def check_versions():
    found = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    bad = [f"{k} {found[k]} (pinned {v})" for k, v in PINNED.items() if found[k] != v]
    if bad:
        print(
            "sd3_reference.py: the reference is pinned to diffusers 0.42.1 and torch 2.9.0; "
            "found " + ", ".join(bad),
            file=sys.stderr,
        )
        sys.exit(3)


# diffusers' own test config (tests/models/transformers/test_models_transformer_sd3.py).
TINY = dict(
    sample_size=32,
    patch_size=1,
    in_channels=4,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=4,
    caption_projection_dim=32,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    out_channels=4,
)

CASES = [
    # (a) SD3, patch 1, saved as a pipeline folder (model_index.json + transformer/).
    dict(
        name="sd3_p1",
        config=dict(TINY),
        layout="pipeline",
        dtype="float32",
        batch=2,
        size=(8, 8),
        tokens=7,
        grad_params=[
            "pos_embed.proj.weight",
            "time_text_embed.timestep_embedder.linear_1.weight",
            "transformer_blocks.0.attn.to_q.weight",
            "transformer_blocks.3.attn.add_k_proj.weight",
            "norm_out.linear.weight",
        ],
    ),
    # (b) SD3, patch 2, 16 channels, H != W, a pos_embed_max_size (12) that forces a crop
    # (6x10 patches: top 3, left 1) and differs from the base size (32 / 2 = 16); out_channels
    # null (= in_channels); sharded weights.
    dict(
        name="sd3_p2_crop",
        config=dict(
            TINY,
            patch_size=2,
            in_channels=16,
            out_channels=None,
            num_layers=3,
            joint_attention_dim=24,
            pooled_projection_dim=40,
            pos_embed_max_size=12,
        ),
        layout="transformer",
        dtype="float32",
        shard="40KB",
        batch=2,
        size=(12, 20),
        tokens=5,
        grad_params=[
            "context_embedder.weight",
            "transformer_blocks.0.norm1_context.linear.weight",
            "transformer_blocks.1.ff_context.net.0.proj.weight",
            "proj_out.bias",
        ],
    ),
    # (c) SD3.5: dual attention in block 0 (attn2, 9-way modulation) and RMS qk-norm; float16.
    dict(
        name="sd35_dual",
        config=dict(TINY, dual_attention_layers=(0,), qk_norm="rms_norm"),
        layout="transformer",
        dtype="float16",
        batch=2,
        size=(6, 10),
        tokens=6,
        grad_params=[
            "transformer_blocks.0.norm1.linear.weight",
            "transformer_blocks.0.attn2.to_k.weight",
            "transformer_blocks.0.attn.norm_added_k.weight",
            "transformer_blocks.1.attn.norm_q.weight",
        ],
    ),
    # (d) SD3.5 with dual attention in the last (context_pre_only) block too, patch 2, bfloat16.
    dict(
        name="sd35_bf16",
        config=dict(
            TINY,
            patch_size=2,
            num_layers=3,
            dual_attention_layers=(0, 2),
            qk_norm="rms_norm",
        ),
        layout="transformer",
        dtype="bfloat16",
        batch=1,
        size=(8, 4),
        tokens=4,
        grad_params=["transformer_blocks.2.attn2.to_out.0.weight"],
    ),
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_case(case, out_dir, seed):
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**case["config"]).eval()
    # Perturb every parameter so that no weight keeps a special value (RMSNorm scales of 1).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    folder = case["name"]
    model_dir = os.path.join(out_dir, folder)
    save_dir = model_dir
    if case["layout"] == "pipeline":
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, "model_index.json"), "w") as f:
            json.dump(
                {
                    "_class_name": "StableDiffusion3Pipeline",
                    "_diffusers_version": diffusers.__version__,
                    "transformer": ["diffusers", "SD3Transformer2DModel"],
                },
                f,
                indent=2,
            )
        save_dir = os.path.join(model_dir, "transformer")
    kwargs = {}
    if "shard" in case:
        kwargs["max_shard_size"] = case["shard"]
    model.to(DTYPES[case["dtype"]]).save_pretrained(save_dir, **kwargs)

    # The reference is diffusers' model as read back from the files, in float32.
    model = SD3Transformer2DModel.from_pretrained(save_dir, torch_dtype=torch.float32).eval()
    cfg = model.config

    g = torch.Generator().manual_seed(seed + 1000)
    b = case["batch"]
    h, w = case["size"]
    length = case["tokens"]
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    prompt = torch.randn(b, length, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    neg_prompt = torch.randn(b, length, cfg.joint_attention_dim, generator=g)
    neg_pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)

    x_ = x.clone().requires_grad_(True)
    prompt_ = prompt.clone().requires_grad_(True)
    pooled_ = pooled.clone().requires_grad_(True)
    velocity = model(
        hidden_states=x_,
        encoder_hidden_states=prompt_,
        pooled_projections=pooled_,
        timestep=sigma * 1000,
    ).sample
    wgt = torch.randn(velocity.shape, generator=g)
    (velocity * wgt).sum().backward()
    with torch.no_grad():
        v_uncond = model(
            hidden_states=x,
            encoder_hidden_states=neg_prompt,
            pooled_projections=neg_pooled,
            timestep=sigma * 1000,
        ).sample
    velocity = velocity.detach()
    v_cfg = v_uncond + CFG_SCALE * (velocity - v_uncond)

    tensors = {
        "x": x,
        "sigma": sigma,
        "prompt_embeds": prompt,
        "pooled": pooled,
        "velocity": velocity,
        "negative_prompt_embeds": neg_prompt,
        "negative_pooled": neg_pooled,
        "v_uncond": v_uncond,
        "v_cfg": v_cfg,
        "w": wgt,
        "grad.x": x_.grad,
        "grad.prompt_embeds": prompt_.grad,
        "grad.pooled": pooled_.grad,
    }
    for name in case["grad_params"]:
        tensors["grad.param." + name] = model.get_parameter(name).grad
    tensors = {k: v.detach().contiguous().float() for k, v in tensors.items()}
    meta = {
        "folder": folder,
        "dtype": case["dtype"],
        "cfg_scale": str(CFG_SCALE),
        "grad_params": json.dumps(case["grad_params"]),
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }
    save_file(tensors, os.path.join(out_dir, case["name"] + ".safetensors"), metadata=meta)
    print(f"{case['name']}: velocity max |v| {velocity.abs().max().item():.4g}")


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    check_versions()
    # The float16/bfloat16 `to()` cast warning and the shard-loading progress bar are noise here.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for i, case in enumerate(CASES):
        run_case(case, out_dir, seed=20240 + i)


if __name__ == "__main__":
    main()
