#!/usr/bin/env python3
"""LoRA interchange with peft and diffusers, for tests/lora_diffusers.rs.

    lora_reference.py make OUT_DIR
        Builds a tiny random SD3.5-style SD3Transformer2DModel (2 blocks, dual attention in
        block 0, RMS qk-norm; fixed seed), saves it to OUT_DIR/base (save_pretrained), and gives
        it a peft LoRA adapter (rank 4, alpha 8, gaussian init, Flow-GRPO's eight attention
        targets plus attn2's projections) whose lora_B is then set to fixed random values (a
        fresh adapter's B is zero, which would hide every mistake). The adapter is saved twice:
          OUT_DIR/diffusers/pytorch_lora_weights.safetensors
              StableDiffusion3Pipeline.save_lora_weights, keys `transformer.…`, diffusers'
              `lora_adapter_metadata` (alpha 8);
          OUT_DIR/peft/adapter_model.safetensors + adapter_config.json
              peft's PeftModel.save_pretrained (what Flow-GRPO writes), keys
              `base_model.model.…`, here with alpha 12.
        OUT_DIR/case.safetensors holds the inputs (x, sigma, prompt_embeds, pooled, w), the
        velocities (v_base, v_diffusers, v_peft) and torch autograd gradients of
        sum(v_diffusers · w) w.r.t. the listed adapter factors (grad.<key>, PyTorch layout).

    lora_reference.py check PIPELINE ADAPTER INPUTS
        Runs the README's snippet on a diffusers pipeline folder:
            pipe = StableDiffusion3Pipeline.from_pretrained(PIPELINE)
            pipe.load_lora_weights(ADAPTER)
            image = pipe("a photo of a cat", num_inference_steps=2).images[0]
        then the adapted transformer on INPUTS' x, sigma, prompt_embeds, pooled, and compares
        with INPUTS' `velocity` (flowrun's): max|Δ| / max|ref| ≤ 1e-5, exit status 1 otherwise.

Pinned: torch 2.9.0, diffusers 0.42.1, peft 0.21.2 (exits with status 3 otherwise).
"""

import json
import os
import sys

PINNED = {"torch": "2.9.0", "diffusers": "0.42.1", "peft": "0.21.2"}
TOL = 1e-5

import torch  # noqa: E402
import diffusers  # noqa: E402
import peft  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_out.0",
]
GRAD_KEYS = [
    "transformer_blocks.0.attn.to_q.lora_A.weight",
    "transformer_blocks.0.attn.to_q.lora_B.weight",
    "transformer_blocks.0.attn.to_add_out.lora_B.weight",
    "transformer_blocks.0.attn2.to_out.0.lora_A.weight",
    "transformer_blocks.1.attn.add_v_proj.lora_A.weight",
    "transformer_blocks.1.attn.to_out.0.lora_B.weight",
]


def check_versions():
    found = {
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
    }
    bad = [f"{k} {found[k]} (pinned {v})" for k, v in PINNED.items() if found[k] != v]
    if bad:
        print("lora_reference.py: pinned versions differ: " + ", ".join(bad), file=sys.stderr)
        sys.exit(3)


def velocity(transformer, x, sigma, prompt, pooled):
    return transformer(
        hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled,
        timestep=sigma * 1000.0, return_dict=False)[0]


def make(out):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    config = dict(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=24,
        pooled_projection_dim=40, out_channels=4, dual_attention_layers=(0,),
        qk_norm="rms_norm")
    base = SD3Transformer2DModel(**config).eval()
    base.save_pretrained(os.path.join(out, "base"))

    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, 4, 8, 6
    x = torch.randn(b, c, h, w, generator=g)
    sigma = torch.tensor([0.8, 0.35])
    prompt = torch.randn(b, 5, 24, generator=g)
    pooled = torch.randn(b, 40, generator=g)
    wts = torch.randn(b, c, h, w, generator=g)
    with torch.no_grad():
        v_base = velocity(base, x, sigma, prompt, pooled)

    def adapted(alpha):
        m = SD3Transformer2DModel.from_pretrained(os.path.join(out, "base")).eval()
        m.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=TARGETS))
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        return m

    # diffusers' pipeline-level file, alpha 8 (scale 2).
    m = adapted(8)
    sd = get_peft_model_state_dict(m)
    StableDiffusion3Pipeline.save_lora_weights(
        os.path.join(out, "diffusers"), transformer_lora_layers=sd,
        transformer_lora_adapter_metadata=m.peft_config["default"].to_dict())
    v = velocity(m, x, sigma, prompt, pooled)
    (v * wts).sum().backward()
    params = dict(m.named_parameters())
    grads = {}
    for key in GRAD_KEYS:
        # peft names the adapter's parameters `<layer>.lora_A.default.weight`.
        pkey = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        grads["grad." + key] = params[pkey].grad.detach().clone()
    v_diffusers = v.detach()

    # peft's own folder (Flow-GRPO's checkpoints), alpha 12 (scale 3): the same factors.
    base2 = SD3Transformer2DModel.from_pretrained(os.path.join(out, "base")).eval()
    pm = get_peft_model(base2, LoraConfig(r=4, lora_alpha=12, init_lora_weights="gaussian",
                                          target_modules=TARGETS))
    copied = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default.", ".")
                p.copy_(sd[key])
                copied += 1
    assert copied == len(sd), (copied, len(sd))
    pm.save_pretrained(os.path.join(out, "peft"))
    with torch.no_grad():
        v_peft = velocity(pm, x, sigma, prompt, pooled)

    tensors = dict(x=x, sigma=sigma, prompt_embeds=prompt, pooled=pooled, w=wts,
                   v_base=v_base, v_diffusers=v_diffusers, v_peft=v_peft, **grads)
    save_file({k: t.contiguous().float() for k, t in tensors.items()},
              os.path.join(out, "case.safetensors"),
              metadata={"grad_keys": json.dumps(GRAD_KEYS), "targets": json.dumps(TARGETS)})
    print(f"lora_reference: base, diffusers/, peft/ and case.safetensors in {out}")


def check(pipeline, adapter, inputs):
    from diffusers import StableDiffusion3Pipeline

    # The README's snippet, as a user runs it.
    pipe = StableDiffusion3Pipeline.from_pretrained(pipeline)
    pipe.load_lora_weights(adapter)
    image = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32,
                 max_sequence_length=16).images[0]
    assert image.size == (32, 32), image.size

    t = load_file(inputs)
    with torch.no_grad():
        v = velocity(pipe.transformer, t["x"], t["sigma"], t["prompt_embeds"], t["pooled"])
    ref = t["velocity"]
    assert v.shape == ref.shape, (v.shape, ref.shape)
    rel = ((v - ref).abs().max() / ref.abs().max()).item()
    moved = ((t["v_base"] - ref).abs().max() / ref.abs().max()).item() if "v_base" in t else None
    print(f"lora_reference check: diffusers + flowrun's adapter vs flowrun: rel {rel:.2e}"
          + (f" (the adapter moves the velocity by {moved:.2e})" if moved is not None else ""))
    if not rel <= TOL:
        print(f"lora_reference check: FAILED, rel {rel:.3e} > {TOL}", file=sys.stderr)
        sys.exit(1)


def main(argv):
    check_versions()
    if len(argv) == 3 and argv[1] == "make":
        make(argv[2])
    elif len(argv) == 5 and argv[1] == "check":
        check(argv[2], argv[3], argv[4])
    else:
        sys.exit("usage: lora_reference.py make OUT_DIR | check PIPELINE ADAPTER INPUTS")


if __name__ == "__main__":
    main(sys.argv)
