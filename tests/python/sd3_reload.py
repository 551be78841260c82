#!/usr/bin/env python3
"""Reload exported SD3 transformer folders with diffusers itself, for tests/sd3_export.rs.

Usage: sd3_reload.py JOBS.json

JOBS.json is a list of {"folder": DIR, "inputs": FILE, "out": FILE}. For each job, DIR is loaded
with `SD3Transformer2DModel.from_pretrained(DIR, torch_dtype=float32, output_loading_info=True)`
and run on the inputs of FILE (written by sd3_reference.py: x [B, C, H, W], sigma [B],
prompt_embeds [B, L, J], pooled [B, P], negative_prompt_embeds, negative_pooled). OUT gets

  velocity = transformer(x, prompt_embeds, pooled, timestep=sigma*1000).sample
  v_uncond (the same with the negative prompt)

and the metadata `config` (the model's config as diffusers read it, JSON), `keys` (the sorted
state-dict keys of the loaded model, JSON) and `dtypes` (the stored dtype of every tensor of
the folder's safetensors files, JSON {key: dtype}). A folder that does not load (an exception,
or any missing, unexpected or mis-shaped key) gets an OUT with only the metadata `error`, and
the script goes on with the next job, then exits with status 1.
Pinned: diffusers 0.42.1, torch 2.9.0 (exits with status 3 and says so otherwise).
"""

import glob
import json
import os
import sys

PINNED = {"diffusers": "0.42.1", "torch": "2.9.0"}

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def check_versions():
    found = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    bad = [f"{k} {found[k]} (pinned {v})" for k, v in PINNED.items() if found[k] != v]
    if bad:
        print(
            "sd3_reload.py: pinned to diffusers 0.42.1 and torch 2.9.0; found " + ", ".join(bad),
            file=sys.stderr,
        )
        sys.exit(3)


def stored_dtypes(folder):
    dtypes = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                dtypes[key] = str(f.get_slice(key).get_dtype())
    return dtypes


def run_job(job):
    folder = job["folder"]
    try:
        model, info = SD3Transformer2DModel.from_pretrained(
            folder, torch_dtype=torch.float32, output_loading_info=True
        )
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise ValueError(f"loading problems: {problems}")
    except Exception as e:  # noqa: BLE001 - reported to the Rust test, which fails on it
        print(f"sd3_reload.py: {folder}: {e}", file=sys.stderr)
        save_file({}, job["out"], metadata={"error": f"{type(e).__name__}: {e}"})
        return False
    model = model.eval()
    inputs = load_file(job["inputs"])
    with torch.no_grad():
        timestep = inputs["sigma"] * 1000
        velocity = model(
            hidden_states=inputs["x"],
            encoder_hidden_states=inputs["prompt_embeds"],
            pooled_projections=inputs["pooled"],
            timestep=timestep,
        ).sample
        v_uncond = model(
            hidden_states=inputs["x"],
            encoder_hidden_states=inputs["negative_prompt_embeds"],
            pooled_projections=inputs["negative_pooled"],
            timestep=timestep,
        ).sample
    meta = {
        "config": json.dumps({k: v for k, v in dict(model.config).items()}, default=list),
        "keys": json.dumps(sorted(model.state_dict().keys())),
        "dtypes": json.dumps(stored_dtypes(folder)),
    }
    tensors = {"velocity": velocity.contiguous(), "v_uncond": v_uncond.contiguous()}
    save_file(tensors, job["out"], metadata=meta)
    print(f"{folder}: velocity max |v| {velocity.abs().max().item():.4g}")
    return True


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    check_versions()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    ok = [run_job(job) for job in jobs]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
