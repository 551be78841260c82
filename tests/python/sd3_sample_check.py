#!/usr/bin/env python3
"""Run diffusers' StableDiffusion3Pipeline as `flowrun sample --sampler euler` ran, for
tests/sd3_sample.rs.

    sd3_sample_check.py --model DIR --embeddings EMB.safetensors --cases CASES.json
        --out RESULT.json

Written from diffusers' public API, not from flowrun's code: the pipeline folder DIR is loaded
once with `StableDiffusion3Pipeline.from_pretrained` (float32, CPU). CASES.json is a list of
`{"name", "latents", "saved", "rows", "seeds", "steps", "cfg", "height", "width"}`; for each,
the pipeline is called with the prompt embeddings of EMB's rows `rows` (each repeated `seeds`
times, prompt by prompt, as `num_images_per_prompt` would), the file's negative prompt
repeated to the batch, the initial latents (tensor `latents` of the file `latents`, the one
given to `flowrun sample --latents`), `num_inference_steps` = steps, `guidance_scale` = cfg,
`height` and `width`: once with `output_type="latent"` (the sampled latents) and once with
`output_type="pt"` (the decoded images in [0, 1]). `saved` is flowrun's `--save-latents` file:
`latents` (its initial latents), `sampled` and `images` (in [-1, 1]).

RESULT.json, per case name:
  rel    max|Δ| / max|ref| of flowrun's sampled latents and decoded images (mapped to [0, 1])
         against the pipeline's
  exact  max|Δ| of flowrun's initial latents against the given ones (must be 0)
  info   the pipeline's scheduler shift, shapes, versions
"""

import argparse
import json

import diffusers
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file


def rel(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item()
    assert scale > 0, "the reference is all zero"
    return (got - want).abs().max().item() / scale


def check(pipe, embeddings, c):
    rows = c["rows"]
    embeds, pooled, neg, neg_pooled = embeddings
    index = torch.tensor([r for r in rows for _ in range(c["seeds"])])
    prompt_embeds, pooled_embeds = embeds[index], pooled[index]
    b = len(index)
    negative, negative_pooled = neg.expand(b, -1, -1), neg_pooled.expand(b, -1)
    latents = load_file(c["latents"])["latents"].float()
    saved = load_file(c["saved"])

    def run(output_type):
        return pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_embeds,
            negative_prompt_embeds=negative,
            negative_pooled_prompt_embeds=negative_pooled,
            latents=latents.clone(),
            num_inference_steps=c["steps"],
            guidance_scale=c["cfg"],
            height=c["height"],
            width=c["width"],
            output_type=output_type,
        ).images

    want_latents = run("latent")
    want_images = run("pt")
    got_images = (saved["images"] / 2 + 0.5).clamp(0, 1)
    return {
        "rel": {
            "sampled": rel(saved["sampled"], want_latents),
            "images": rel(got_images, want_images),
        },
        "exact": {"initial_latents": (saved["latents"] - latents).abs().max().item()},
        "info": {
            "shift": pipe.scheduler.config.shift,
            "latents": list(want_latents.shape),
            "images": list(want_images.shape),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        },
    }


def main():
    ap = argparse.ArgumentParser()
    for flag in ["--model", "--embeddings", "--cases", "--out"]:
        ap.add_argument(flag, required=True)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    with safe_open(a.embeddings, framework="pt") as f:
        embeddings = tuple(f.get_tensor(k).float() for k in [
            "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
            "negative_pooled_prompt_embeds"])
    with open(a.cases) as f:
        cases = json.load(f)
    pipe = StableDiffusion3Pipeline.from_pretrained(a.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result = {c["name"]: check(pipe, embeddings, c) for c in cases}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v["rel"] for k, v in result.items()}))


if __name__ == "__main__":
    main()
