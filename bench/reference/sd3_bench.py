#!/usr/bin/env python3
"""SD3 small: a TAFS-GRPO iteration of flowrun against PyTorch + diffusers, same weights, paired.

    python bench/reference/sd3_bench.py [--dir DIR] [--rounds 4] [--repeats 2] [--batch 16]
        --flowrun target/tch/release/flowrun:libtorch [--flowrun target/release/flowrun:flex]
    python bench/reference/sd3_bench.py --memory --flowrun target/tch/release/flowrun:libtorch
    python bench/reference/sd3_bench.py build DIR      # only the model folder and embeddings

The model is a "small" `SD3Transformer2DModel` built here with a fixed seed and saved with
`save_pretrained` (`DIR/transformer`): 4 blocks of 4 heads × 64 (inner width 256), patch 2, 16
latent channels, sample_size 32 (32×32 latents: 256 image tokens), joint_attention_dim 1024,
caption_projection_dim 256 (= the inner width, as every SD3), pooled_projection_dim 1024,
pos_embed_max_size 32: 9,500,224 parameters. Beside it, `DIR/embeds.safetensors` (+ `.jsonl`):
8 prompts of seeded random "text-encoder outputs", 154 tokens (77 CLIP + 77 T5) of width
1024, in `scripts/encode_prompts.py`'s format, read by both peers.

One iteration, both peers, as `pipelines/tafs_grpo_sd3.yaml` runs it (without VAE and reward
server): B = P·G samples (G = 8), K = 4 one-step predictions x̂0 = x − σ·v at diffusers'
`FlowMatchEulerDiscreteScheduler(shift=3)` sigmas, classifier-free guidance 4.5 as one batch of
2B rows (negative prompt = the file's), x̂0 read back to the host as a reward would; K − 1
annealed re-noisings x' = (1−σ')·x̂0 + σ'·(√(1−τ²)·ε̂ + τ·ε), τ linear 1.0 → 0.6, with the
Gaussian log-prob as a mean over dimensions; then the clipped GRPO loss (clip 1e-4, advantages
clipped to ±5 — seeded random advantages: their values do not change the cost) + β·KL
(β = 0.04) to a frozen reference, each transition's velocity recomputed with grad and
back-propagated on its own (flowrun's `rollout_graph: recompute`, the pipeline's default;
Flow-GRPO's loop), grad-norm clipping at 1, one AdamW step (lr 1e-5), the EMA update.

Each round runs every `--flowrun BIN:DEVICE` (`BIN bench --sd3 DIR/transformer --embeddings …
--device DEVICE --json …`) and the reference (this script as a child process, `worker`), each
as its own process doing 1 warm-up + `--repeats` iterations; the order alternates from round to
round. Peak memory of each peer is its process's peak resident set (`ru_maxrss` from `wait4`,
the same call for both; "loaded": its resident set once the model is loaded, before the first
iteration). `--memory` runs each peer's memory probe instead (see `probe()`).

`--lora R[:ALPHA]`: both peers train LoRA adapters of rank R (α default R) on Flow-GRPO's eight
attention projections (`attn.to_q/k/v`, `attn.to_out.0`, `attn.add_q/k/v_proj`,
`attn.to_add_out`), gaussian init, the base frozen; the KL reference is the base with the
adapters off (peft's `disable_adapters()` here, as Flow-GRPO's `disable_adapter()`; flowrun's
`lora:` with `reference: true`), the EMA over the adapters only.
"""

import argparse
import copy
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True

FORMAT = "flowrun.prompt_embeddings/1"
SMALL = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=1024, caption_projection_dim=256,
             pooled_projection_dim=1024, out_channels=16, pos_embed_max_size=32)
TEXT_TOKENS = 154
PROMPTS = 8
SEED = 0
# tafs_grpo_sd3.yaml
HP = dict(cfg=4.5, beta=0.04, lr=1e-5, clip_range=1e-4, adv_clip=5.0, grad_clip_norm=1.0,
          ema_decay=0.999, shift=3.0, tau_start=1.0, tau_end=0.6)
# SD3.5-Medium at 512 px (`stabilityai/stable-diffusion-3.5-medium`, transformer/config.json).
SD35M = dict(params=2.24e9, layers=24, dual_layers=13, inner=1536, heads=24, image_tokens=1024,
             text_tokens=333)
TEXT_PER_IMAGE_TOKEN = 333 / 1024


# ---------------------------------------------------------------------------------------------
# Memory readings (Linux, glibc): the same as flowrun's (src/bench/sd3.rs)
# ---------------------------------------------------------------------------------------------

class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _Mallinfo2


def live_bytes():
    """Bytes glibc's malloc has handed out (every arena + mmapped blocks): torch's tensors."""
    m = _LIBC.mallinfo2()
    return m.uordblks + m.hblkhd


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_of(fn):
    """Peak resident bytes of fn() above the resident set after malloc_trim."""
    _LIBC.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) * 1024


# ---------------------------------------------------------------------------------------------
# The model folder and the embeddings
# ---------------------------------------------------------------------------------------------

def build(out_dir):
    """DIR/transformer (SD3Transformer2DModel, seed 0) and DIR/embeds.safetensors + .jsonl."""
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(SEED)
    model = SD3Transformer2DModel(**SMALL)
    model.save_pretrained(os.path.join(out_dir, "transformer"))
    g = torch.Generator().manual_seed(SEED + 1)
    j, p = SMALL["joint_attention_dim"], SMALL["pooled_projection_dim"]
    tensors = {
        "prompt_embeds": torch.randn(PROMPTS, TEXT_TOKENS, j, generator=g),
        "pooled_prompt_embeds": torch.randn(PROMPTS, p, generator=g),
        "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, j, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, p, generator=g),
    }
    meta = {"format": FORMAT, "encoding_id": "sd3-bench-random-seed1", "sidecar": "embeds.jsonl",
            "num_prompts": str(PROMPTS), "note": "seeded random embeddings (sd3_bench.py)"}
    save_file(tensors, os.path.join(out_dir, "embeds.safetensors"), metadata=meta)
    with open(os.path.join(out_dir, "embeds.jsonl"), "w") as f:
        for i in range(PROMPTS):
            f.write(json.dumps({"index": i, "prompt": f"random prompt {i}", "metadata": {}}) + "\n")
    return sum(q.numel() for q in model.parameters())


def ensure_built(out_dir):
    if not os.path.isfile(os.path.join(out_dir, "transformer", "config.json")):
        n = build(out_dir)
        print(f"built {out_dir}: {n:,} parameters", flush=True)


# ---------------------------------------------------------------------------------------------
# The reference iteration
# ---------------------------------------------------------------------------------------------

def tafs_kernel(t, t_next, tau):
    """x' ~ N(a·x + b·v, std²): TAFS re-noising from t to t_next at temperature tau."""
    keep = max(1.0 - tau * tau, 0.0) ** 0.5
    a = (1.0 - t_next) + t_next * keep
    b = -(1.0 - t_next) * t + t_next * keep * (1.0 - t)
    return a, b, t_next * tau


def log_prob(x, mean, std):
    """Mean over dimensions of log N(x; mean, std²), per sample."""
    import math
    d = x[0].numel()
    sq = (x - mean).square().flatten(1).sum(1)
    return -sq / (2.0 * std * std * d) - math.log(std) - 0.5 * math.log(2 * math.pi)


LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


class BaseOf:
    """A peft-adapted model with its adapters switched off (Flow-GRPO's KL reference,
    `with transformer.disable_adapter():`), callable like the model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **kw):
        self.model.disable_adapters()
        try:
            return self.model(**kw)
        finally:
            self.model.enable_adapters()


class Sd3TafsGrpo:
    """The policy (trained in place), its frozen reference, AdamW and the EMA. With
    `hp["lora"] = (r, alpha)`: peft LoRA adapters on Flow-GRPO's eight attention projections
    (gaussian init), the base frozen, the reference the base with the adapters off."""

    def __init__(self, model, hp):
        import torch
        self.hp = hp
        if hp.get("lora"):
            from peft import LoraConfig
            r, alpha = hp["lora"]
            model.requires_grad_(False)
            model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS))
            self.ref = BaseOf(model) if hp["beta"] > 0 else None
        else:
            self.ref = copy.deepcopy(model).requires_grad_(False) if hp["beta"] > 0 else None
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=hp["lr"], betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        self.steps = 0

    def velocity(self, model, x, sigma, emb, pooled, neg, neg_pooled):
        """v_u + s·(v_c − v_u) in one forward of 2B rows (diffusers' pipeline order)."""
        import torch
        b = x.shape[0]
        s = self.hp["cfg"]
        t = torch.full((b,), sigma * 1000.0)
        if s <= 1.0:
            return model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                         timestep=t, return_dict=False)[0]
        out = model(hidden_states=torch.cat([x, x]),
                    encoder_hidden_states=torch.cat([neg.expand_as(emb), emb]),
                    pooled_projections=torch.cat([neg_pooled.expand_as(pooled), pooled]),
                    timestep=torch.cat([t, t]), return_dict=False)[0]
        u, c = out.chunk(2)
        return u + s * (c - u)

    def rollout(self, cond, noise, eps, schedule):
        import torch
        x, transitions, forward_s = noise, [], 0.0
        with torch.no_grad():
            for k, (t, t_next, tau) in enumerate(schedule):
                t0 = time.perf_counter()
                v = self.velocity(self.model, x, t, *cond)
                forward_s += time.perf_counter() - t0
                x0 = x - t * v
                eps_hat = x + (1.0 - t) * v  # noqa: F841 (the sampler's output, as flowrun's)
                reward = x0.flatten(1).mean(1).numpy()  # the stand-in reward reads x̂0
                assert bool(torch.isfinite(torch.from_numpy(reward)).all())
                if k + 1 == len(schedule):
                    break
                a, b, std = tafs_kernel(t, t_next, tau)
                mean = a * x + b * v
                x_next = mean + std * eps[k]
                transitions.append(dict(t=t, a=a, b=b, std=std, x_t=x, x_next=x_next,
                                        old=log_prob(x_next, mean, std)))
                x = x_next
        return transitions, forward_s

    def update(self, cond, transitions, adv):
        import torch
        h = self.hp
        times = dict(forward=0.0, reference=0.0, backward=0.0, optimizer=0.0)
        self.opt.zero_grad(set_to_none=True)
        nt = len(transitions)
        loss_sum = 0.0
        for tr, a in zip(transitions, adv):
            t0 = time.perf_counter()
            a = a.clamp(-h["adv_clip"], h["adv_clip"])
            v = self.velocity(self.model, tr["x_t"], tr["t"], *cond)
            mean = tr["a"] * tr["x_t"] + tr["b"] * v
            ratio = torch.exp(log_prob(tr["x_next"], mean, tr["std"]) - tr["old"])
            clipped = ratio.clamp(1.0 - h["clip_range"], 1.0 + h["clip_range"])
            term = torch.maximum(-a * ratio, -a * clipped).mean()
            ratio.detach().tolist()  # diagnostics on the host, as flowrun's
            t1 = time.perf_counter()
            times["forward"] += t1 - t0
            if self.ref is not None:
                with torch.no_grad():
                    v_ref = self.velocity(self.ref, tr["x_t"], tr["t"], *cond)
                    mean_ref = tr["a"] * tr["x_t"] + tr["b"] * v_ref
                kl = (mean - mean_ref).square().mean() / (2.0 * tr["std"] ** 2)
                term = term + h["beta"] * kl
                t2 = time.perf_counter()
                times["reference"] += t2 - t1
                t1 = t2
            (term / nt).backward()
            loss_sum += term.item() / nt
            times["backward"] += time.perf_counter() - t1
        t0 = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, h["grad_clip_norm"])
        self.opt.step()
        decay = min(h["ema_decay"], (1.0 + self.steps) / (10.0 + self.steps))
        with torch.no_grad():
            torch._foreach_mul_(self.ema, decay)
            torch._foreach_add_(self.ema, [p.detach() for p in self.params], alpha=1.0 - decay)
        self.steps += 1
        times["optimizer"] += time.perf_counter() - t0
        return loss_sum, float(grad_norm), times


def schedule(k, hp):
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(shift=hp["shift"])
    sched.set_timesteps(k)
    s = [float(x) for x in sched.sigmas]
    taus = [hp["tau_start"] + (hp["tau_end"] - hp["tau_start"]) * i / max(k - 1, 1)
            for i in range(k)]
    return [(s[i], s[i + 1], taus[i]) for i in range(k)]


def load(model_dir, embeddings):
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    model = SD3Transformer2DModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.train()
    e = load_file(embeddings)
    return model, e


def parse_lora(s):
    """`R` or `R:ALPHA` → (R, ALPHA); None for no LoRA."""
    if not s:
        return None
    r, _, a = s.partition(":")
    return int(r), float(a) if a else float(r)


def worker_iterate(args):
    """1 warm-up + `repeats` reference iterations; prints one JSON line."""
    import numpy as np
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, e = load(args.model, args.embeddings)
    load_s = time.perf_counter() - t0
    rss_after_load = status_kib("VmRSS")
    hp = dict(HP, cfg=args.cfg, beta=args.beta, lora=parse_lora(args.lora))
    grpo = Sd3TafsGrpo(model, hp)
    b, k = args.batch, args.steps
    g = 8 if b % 8 == 0 else 1
    rows = torch.arange(b // g).repeat_interleave(g) % e["prompt_embeds"].shape[0]
    cond = (e["prompt_embeds"][rows], e["pooled_prompt_embeds"][rows],
            e["negative_prompt_embeds"], e["negative_pooled_prompt_embeds"])
    sched = schedule(k, hp)
    c, s = SMALL["in_channels"], args.latent_size
    gen = torch.Generator().manual_seed(1)
    adv = torch.from_numpy(np.random.default_rng(11).standard_normal((k - 1, b)).astype("float32"))
    runs = []
    for i in range(1 + args.repeats):
        t0 = time.perf_counter()
        noise = torch.randn(b, c, s, s, generator=gen)
        eps = [torch.randn(b, c, s, s, generator=gen) for _ in range(k - 1)]
        transitions, fwd = grpo.rollout(cond, noise, eps, sched)
        t1 = time.perf_counter()
        loss, grad_norm, times = grpo.update(cond, transitions, list(adv))
        del transitions
        t2 = time.perf_counter()
        print(f"[reference] K={k} batch={b} iteration {i + 1}{' (warm-up)' if i == 0 else ''}: "
              f"rollout {t1 - t0:.3f} s, update {t2 - t1:.3f} s (forward {times['forward']:.3f}, "
              f"reference {times['reference']:.3f}, backward {times['backward']:.3f}, optimizer "
              f"{times['optimizer']:.3f}), grad norm {grad_norm:.4f}", file=sys.stderr, flush=True)
        if i > 0:
            runs.append(dict(rollout=t1 - t0, rollout_forward=fwd, update=t2 - t1,
                             iteration=t2 - t0, grad_norm=grad_norm, **times))
    print(json.dumps(dict(runs=runs, load_s=load_s, rss_after_load_kib=rss_after_load,
                          torch=torch.__version__,
                          threads=torch.get_num_threads(), peak_rss_kib=status_kib("VmHWM"))))


def probe(base, layers, kind, side, rows, text, seed=5):
    """Bytes of one probe model: the autodiff graph held after a forward (live heap bytes),
    and the peak resident bytes of a forward without grad and of forward + backward."""
    import torch
    from diffusers import SD3Transformer2DModel
    cfg = dict(base, num_layers=layers,
               pos_embed_max_size=max(base["pos_embed_max_size"], side // base["patch_size"]))
    if kind != "SD3":
        cfg["qk_norm"] = "rms_norm"
    if kind == "SD3.5 dual":
        cfg["dual_attention_layers"] = tuple(range(layers - 1))
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(**cfg).train()
    g = torch.Generator().manual_seed(23)
    x = torch.randn(rows, base["in_channels"], side, side, generator=g)
    t = torch.tensor([900.0 - 100.0 * i for i in range(rows)])
    e = torch.randn(rows, text, base["joint_attention_dim"], generator=g)
    p = torch.randn(rows, base["pooled_projection_dim"], generator=g)

    def fwd():
        return m(hidden_states=x, encoder_hidden_states=e, pooled_projections=p, timestep=t,
                 return_dict=False)[0]

    fwd().square().mean().backward()  # warm-up
    m.zero_grad(set_to_none=True)
    before = live_bytes()
    out = fwd()
    graph = live_bytes() - before
    del out

    def infer():
        with torch.no_grad():
            fwd()[0, 0, 0, 0].item()

    def train():
        fwd().square().mean().backward()

    inference_peak = peak_of(infer)
    m.zero_grad(set_to_none=True)
    update_peak = peak_of(train)
    return dict(graph=graph, inference_peak=inference_peak, update_peak=update_peak)


def probe_sides(base, sides):
    p = base["patch_size"]
    out = []
    for side in sides:
        n = (side // p) ** 2
        out.append((side, n, max(1, round(n * TEXT_PER_IMAGE_TOKEN))))
    return out


def worker_probe(args):
    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = []
    for kind in ["SD3", "SD3.5", "SD3.5 dual"]:
        for side, n, l in probe_sides(SMALL, args.sides):
            a = probe(SMALL, 2, kind, side, args.rows, l)
            b = probe(SMALL, 4, kind, side, args.rows, l)
            res.append(dict(block=kind, latent_side=side, image_tokens=n, text_tokens=l,
                            rows=args.rows, layers=[2, 4],
                            graph_bytes=[a["graph"], b["graph"]],
                            inference_peak_bytes=[a["inference_peak"], b["inference_peak"]],
                            update_peak_bytes=[a["update_peak"], b["update_peak"]]))
    print(json.dumps(dict(probes=res, torch=torch.__version__)))


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def run_child(cmd, cwd=ROOT, env=None):
    """Runs cmd; its stdout, stderr, exit status and peak resident set (wait4's ru_maxrss, KiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return out.read().decode(), err.read().decode(), p.returncode, ru.ru_maxrss


def med(v):
    return statistics.median(v) if v else float("nan")


def summarize(runs, b):
    keys = ["rollout", "update", "iteration", "forward", "reference", "backward", "optimizer",
            "rollout_forward"]
    return {k: med([r[k] for r in runs]) for k in keys} | {"batch": b}


def time_flowrun(spec, args, jdir):
    binary, _, device = spec.rpartition(":")
    out = os.path.join(jdir, f"flowrun-{device}.json")
    cmd = [binary, "bench", "--sd3", os.path.join(args.dir, "transformer"), "--embeddings",
           os.path.join(args.dir, "embeds.safetensors"), "--device", device, "--batches",
           str(args.batch), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--cfg", str(args.cfg), "--beta", str(args.beta), "--json", out]
    if args.lora:
        cmd[-2:-2] = ["--lora", args.lora]
    stdout, stderr, rc, maxrss = run_child(cmd)
    if rc != 0:
        return dict(spec=spec, error=(stdout + stderr)[-800:])
    with open(out) as f:
        r = json.load(f)
    c = r["devices"][0]["configs"][0]
    runs = []
    n = len(c["rollout"]["runs_ms"])
    for i in range(n):
        row = {k: c[k]["runs_ms"][i] / 1e3 for k in ["rollout", "update", "iteration",
                                                     "rollout_forward"]}
        for k in ["forward", "reference", "backward", "optimizer"]:
            row[k] = c["update_breakdown"][k]["runs_ms"][i] / 1e3
        runs.append(row)
    return dict(spec=spec, command=" ".join(cmd[:-2]), maxrss_kib=maxrss,
                summary=summarize(runs, args.batch), runs=runs, grad_norm=c["grad_norm"],
                load_s=r["devices"][0]["load_s"],
                rss_after_load_kib=r["devices"][0]["rss_after_load_kib"])


def time_reference(args):
    cmd = [sys.executable, os.path.abspath(__file__), "worker", "--model",
           os.path.join(args.dir, "transformer"), "--embeddings",
           os.path.join(args.dir, "embeds.safetensors"), "--batch", str(args.batch), "--steps",
           str(args.steps), "--repeats", str(args.repeats), "--cfg", str(args.cfg), "--beta",
           str(args.beta), "--threads", str(args.threads), "--latent-size",
           str(SMALL["sample_size"])] + (["--lora", args.lora] if args.lora else [])
    stdout, stderr, rc, maxrss = run_child(cmd)
    if rc != 0:
        return dict(spec="reference", error=(stdout + stderr)[-1500:])
    r = json.loads(stdout.strip().splitlines()[-1])
    return dict(spec="reference", maxrss_kib=maxrss, summary=summarize(r["runs"], args.batch),
                runs=r["runs"], grad_norm=[x["grad_norm"] for x in r["runs"]],
                torch=r["torch"], threads=r["threads"], load_s=r["load_s"],
                rss_after_load_kib=r["rss_after_load_kib"])


def fmt_row(name, s, b, maxrss, loaded):
    ms = lambda x: f"{x * 1e3 / b:9.1f}"  # noqa: E731  ms per sample
    return (f"{name:<36} {ms(s['rollout'])} {ms(s['update'])} {ms(s['iteration'])}   "
            f"{s['forward'] * 1e3:8.0f} {s['reference'] * 1e3:8.0f} {s['backward'] * 1e3:8.0f} "
            f"{s['optimizer'] * 1e3:8.0f}   {maxrss / 1024:8.0f} {(loaded or 0) / 1024:8.0f}")


def timing_main(args):
    rounds = []
    jdir = tempfile.mkdtemp(prefix="sd3-bench-")
    header = (f"{'peer':<36} {'rollout':>9} {'update':>9} {'iter':>9}   {'fwd':>8} {'ref':>8} "
              f"{'bwd':>8} {'optim':>8}   {'peak RSS':>8} {'loaded':>8}\n{'':<36} "
              f"{'ms/sample':>9} {'ms/sample':>9} {'ms/sample':>9}   {'ms':>8} {'ms':>8} "
              f"{'ms':>8} {'ms':>8}   {'MiB':>8} {'MiB':>8}")
    for rnd in range(args.rounds):
        load = os.getloadavg()
        peers = {}
        order = ["flowrun", "reference"] if rnd % 2 == 0 else ["reference", "flowrun"]
        for who in order:
            if who == "reference":
                peers["reference"] = time_reference(args)
            else:
                for spec in args.flowrun:
                    peers[spec] = time_flowrun(spec, args, jdir)
        rounds.append(dict(round=rnd + 1, order=order, load_average_start=load, peers=peers))
        print(f"\nround {rnd + 1} ({' then '.join(order)}; load average {load[0]:.2f}):")
        print(header)
        for name, r in peers.items():
            if "error" in r:
                print(f"{name}: failed: {r['error']}")
            else:
                print(fmt_row(name, r["summary"], args.batch, r["maxrss_kib"],
                              r["rss_after_load_kib"]))
        ref = peers["reference"]
        for spec in args.flowrun:
            r = peers[spec]
            if "error" in r or "error" in ref:
                continue
            s, q = r["summary"], ref["summary"]
            print(f"flowrun {spec} / reference: iteration {s['iteration'] / q['iteration']:.3f}×, "
                  f"rollout {s['rollout'] / q['rollout']:.3f}×, update "
                  f"{s['update'] / q['update']:.3f}× (forward {s['forward'] / q['forward']:.2f}×, "
                  f"backward {s['backward'] / q['backward']:.2f}×, optimizer "
                  f"{s['optimizer'] / q['optimizer']:.2f}×)", flush=True)
    summary = {}
    for spec in args.flowrun:
        ok = [rd for rd in rounds if "error" not in rd["peers"][spec]
              and "error" not in rd["peers"]["reference"]]
        if not ok:
            continue
        ratio = lambda k: sorted(rd["peers"][spec]["summary"][k]  # noqa: E731
                                 / rd["peers"]["reference"]["summary"][k] for rd in ok)
        summary[spec] = {k: dict(median=med(ratio(k)), min=ratio(k)[0], max=ratio(k)[-1])
                         for k in ["iteration", "rollout", "update", "forward", "reference",
                                   "backward", "optimizer"]}
        summary[spec]["rounds"] = len(ok)
    print(f"\n== paired over {args.rounds} rounds: flowrun / reference time (median, min – max) ==")
    for spec, s in summary.items():
        print(f"{spec} ({s['rounds']} rounds):")
        for k in ["iteration", "rollout", "update", "forward", "reference", "backward",
                  "optimizer"]:
            print(f"  {k:<10} {s[k]['median']:.3f}×  ({s[k]['min']:.3f} – {s[k]['max']:.3f})")
    print("\nper-peer medians over all rounds (ms per sample; peak RSS = max over rounds):")
    print(header)
    for name in ["reference"] + args.flowrun:
        rs = [rd["peers"][name] for rd in rounds if "error" not in rd["peers"][name]]
        if not rs:
            continue
        allruns = [x for r in rs for x in r["runs"]]
        print(fmt_row(name, summarize(allruns, args.batch), args.batch,
                      max(r["maxrss_kib"] for r in rs),
                      max(r["rss_after_load_kib"] or 0 for r in rs)))
    result = dict(settings=vars(args), rounds=rounds, flowrun_over_reference=summary,
                  model=SMALL, text_tokens=TEXT_TOKENS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------
# Memory: per block per row, and what SD3.5-Medium needs
# ---------------------------------------------------------------------------------------------

def fit(points, d, heads):
    """Bytes per row = α·T·D + β·H·T² through two (T, bytes) points (D, H fixed)."""
    (t1, y1), (t2, y2) = points
    # y = α·D·t + β·H·t²: solve the 2×2 system.
    det = (d * t1) * (heads * t2 * t2) - (d * t2) * (heads * t1 * t1)
    alpha = (y1 * heads * t2 * t2 - y2 * heads * t1 * t1) / det
    beta = (d * t1 * y2 - d * t2 * y1) / det
    return alpha, beta


def estimate(probes, d0, h0, out):
    """SD3.5-Medium's per-sample memory from one peer's probes (see BENCHMARKS.md).

    Per block and per row, bytes = α·T·D + β·H·T² (T tokens, D the width, H heads), fitted
    through the two probed token counts at the small width D0 = 256, H0 = 4, then evaluated
    at SD3.5-Medium's T = 1357, D = 1536, H = 24 for its 13 dual-attention blocks and 11 others
    (the last, context_pre_only block counted as a full one: an overestimate of < 1/24).
    """
    def per_block(kind, key):
        pts = []
        for p in probes:
            if p["block"] == kind:
                a, b = p[key]
                pts.append((p["image_tokens"] + p["text_tokens"],
                            (b - a) / (p["layers"][1] - p["layers"][0]) / p["rows"]))
        return sorted(pts)

    def per_row(kind, key):
        return sorted((p["image_tokens"] + p["text_tokens"], p[key][1] / p["rows"])
                      for p in probes if p["block"] == kind)

    t = SD35M["image_tokens"] + SD35M["text_tokens"]
    d, h = SD35M["inner"], SD35M["heads"]
    mib, gib = 2 ** 20, 2 ** 30
    res = {}
    for key, name in [("graph_bytes", "graph"), ("update_peak_bytes", "update peak")]:
        total = 0.0
        lines = []
        for kind, count in [("SD3.5 dual", SD35M["dual_layers"]),
                            ("SD3.5", SD35M["layers"] - SD35M["dual_layers"])]:
            pts = per_block(kind, key)
            alpha, beta = fit(pts[:2], d0, h0)
            per = alpha * t * d + beta * h * t * t
            total += count * per
            lines.append(f"    {kind:<11} {', '.join(f'T={x}: {y / mib:.2f} MiB' for x, y in pts)}"
                         f" per block·row → α = {alpha:.1f} B per token·channel, β = {beta:.2f} B"
                         f" per head·token² → {per / mib:.0f} MiB per block·row × {count} blocks")
        res[name] = total
        out.append(f"  {name}, all {SD35M['layers']} blocks, per row: {total / gib:.2f} GiB")
        out.extend(lines)
    pts = per_row("SD3.5 dual", "inference_peak_bytes")
    alpha, beta = fit(pts[:2], d0, h0)
    inf = alpha * t * d + beta * h * t * t
    res["inference peak"] = inf
    out.append(f"  forward without autodiff (whole model), peak per row: "
               f"{', '.join(f'T={x}: {y / mib:.2f} MiB' for x, y in pts)} → α = {alpha:.1f}, "
               f"β = {beta:.2f} → {inf / mib:.0f} MiB")
    rows = 2  # CFG: the prompt and the negative prompt
    out.append(f"  per sample (CFG: 2 rows): update ≈ one transition's graph "
               f"{rows * res['graph'] / gib:.1f} GiB (peak measured with its backward: "
               f"{rows * res['update peak'] / gib:.1f} GiB); rollout {rows * inf / gib:.2f} GiB "
               f"transient with rollout_graph recompute, {3 * rows * res['graph'] / gib:.1f} GiB "
               f"with keep (K − 1 = 3 graphs)")
    out.append(f"  fixed, not per sample: {SD35M['params'] / 1e9:.2f}B parameters × 4 B = "
               f"{SD35M['params'] * 4 / gib:.1f} GiB per f32 copy; weights, gradients, AdamW m and"
               f" v, EMA and the KL reference: 6 copies = {6 * SD35M['params'] * 4 / gib:.1f} GiB")
    return {k: v * rows for k, v in res.items()}


def memory_main(args):
    d0, h0 = SMALL["num_attention_heads"] * SMALL["attention_head_dim"], SMALL["num_attention_heads"]
    peers = {}
    cmd = [sys.executable, os.path.abspath(__file__), "worker-probe", "--rows", str(args.rows),
           "--threads", str(args.threads), "--sides", ",".join(map(str, args.sides))]
    stdout, stderr, rc, _ = run_child(cmd)
    if rc != 0:
        sys.exit(f"reference probe failed:\n{stdout}{stderr}")
    peers["reference"] = json.loads(stdout.strip().splitlines()[-1])["probes"]
    for spec in args.flowrun:
        binary, _, device = spec.rpartition(":")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "m.json")
            cmd = [binary, "bench", "--sd3", os.path.join(args.dir, "transformer"),
                   "--memory-probe", "--device", device, "--probe-rows", str(args.rows),
                   "--probe-sides", ",".join(map(str, args.sides)), "--json", out]
            stdout, stderr, rc, _ = run_child(cmd)
            if rc != 0:
                sys.exit(f"{spec} probe failed:\n{stdout}{stderr}")
            with open(out) as f:
                peers[spec] = json.load(f)["probes"]
    text = [f"memory per row (MiB), {args.rows} rows per probe; per block = (4 blocks − 2 blocks)"
            " / 2; text tokens = 333/1024 of the image tokens"]
    text.append(f"{'peer':<36} {'block':<11} {'T':>5} {'graph/blk':>10} {'upd pk/blk':>10} "
                f"{'infer pk':>9} {'graph all':>10} {'upd pk all':>10}")
    for name, ps in peers.items():
        for p in ps:
            r = p["rows"]
            blk = lambda k: (p[k][1] - p[k][0]) / 2 / r / 2**20  # noqa: E731
            text.append(f"{name:<36} {p['block']:<11} {p['image_tokens'] + p['text_tokens']:>5} "
                        f"{blk('graph_bytes'):>10.2f} {blk('update_peak_bytes'):>10.2f} "
                        f"{p['inference_peak_bytes'][1] / r / 2**20:>9.2f} "
                        f"{p['graph_bytes'][1] / r / 2**20:>10.2f} "
                        f"{p['update_peak_bytes'][1] / r / 2**20:>10.2f}")
    estimates = {}
    for name, ps in peers.items():
        text.append(f"\nSD3.5-Medium (24 blocks, 13 with the second attention, D = 1536, 24 heads,"
                    f" T = 1024 + 333 tokens) from {name}'s probes:")
        estimates[name] = estimate(ps, d0, h0, text)
    print("\n".join(text))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), probes=peers, sd35_medium_per_sample=estimates,
                           report=text), f, indent=1)
        print(f"wrote {args.json}")


# On paper: SD3.5-Medium at 512 px with LoRA, from the measured per-block figures
# ---------------------------------------------------------------------------------------------

# Flow-GRPO's LoRA on SD3.5-Medium: rank 32 on the eight attention projections (18.8M).
SD35M_LORA_PARAMS = 18.8e6


def paper_main(argv):
    """The update's memory per sample and the largest group that fits, for SD3.5-Medium at 512 px
    with LoRA r32: f32 or half base, with or without activation checkpointing.

    Per block and row, the update's peak (forward graph + backward) is fitted from the probes
    of `--memory` (α·T·D + β·H·T², the same fit as there). Without checkpointing a sample holds
    every block's graph; with it, each block's inputs (image + text tokens, T·D values) and one
    block's graph at a time. A half-precision base stores those inputs in 2 bytes and scales the
    block graph by --half-factor, the measured ratio of the update's peak per sample with a half
    base to an f32 base (`flowrun bench --sd3 --lora 32:64 [--base-dtype bf16]`). Fixed: the
    frozen base (4 or 2 bytes per parameter), the adapters' weights, gradients, AdamW moments and
    EMA (5 f32 copies), and --reserve GiB for the runtime (CUDA context, allocator slack).
    """
    ap = argparse.ArgumentParser(prog="sd3_bench.py paper", description=paper_main.__doc__)
    ap.add_argument("--memory-json", default="results/sd3-bench/memory.json")
    ap.add_argument("--peer", default="target/tch/release/flowrun:libtorch",
                    help="whose probes (a key of the JSON's probes)")
    ap.add_argument("--half-factor", type=float, required=True)
    ap.add_argument("--reserve", type=float, default=1.5, help="GiB kept for the runtime")
    ap.add_argument("--gpus", default="24,80,141", help="GPU memory sizes (GiB)")
    a = ap.parse_args(argv)
    with open(a.memory_json) as f:
        data = json.load(f)
    probes = data["probes"][a.peer]
    d0, h0 = SMALL["num_attention_heads"] * SMALL["attention_head_dim"], SMALL["num_attention_heads"]
    t = SD35M["image_tokens"] + SD35M["text_tokens"]
    d, h = SD35M["inner"], SD35M["heads"]
    gib = 2 ** 30

    def block(kind):
        pts = sorted((p["image_tokens"] + p["text_tokens"],
                      (p["update_peak_bytes"][1] - p["update_peak_bytes"][0])
                      / (p["layers"][1] - p["layers"][0]) / p["rows"])
                     for p in probes if p["block"] == kind)
        alpha, beta = fit(pts[:2], d0, h0)
        return alpha * t * d + beta * h * t * t

    dual, plain = block("SD3.5 dual"), block("SD3.5")
    n_dual, n_plain = SD35M["dual_layers"], SD35M["layers"] - SD35M["dual_layers"]
    rows = 2  # CFG
    adapters = 5 * 4 * SD35M_LORA_PARAMS
    gpus = [float(g) for g in a.gpus.split(",")]
    print(f"SD3.5-Medium, 512 px (T = {t} tokens, D = {d}), CFG (2 rows per sample), LoRA r32 "
          f"({SD35M_LORA_PARAMS / 1e6:.1f}M adapter parameters), one transition's update; "
          f"per block and row from {a.peer}'s probes: dual {dual / 2**20:.0f} MiB, other "
          f"{plain / 2**20:.0f} MiB; half factor {a.half_factor:.3f}; {a.reserve} GiB reserved")
    print(f"{'base':<5} {'checkpointing':<13} {'per sample':>11} {'fixed':>8} "
          + " ".join(f"{f'{g:.0f} GiB':>8}" for g in gpus))
    rows_out = []
    for base, width in [("f32", 4), ("bf16", 2)]:
        scale = 1.0 if width == 4 else a.half_factor
        for ckpt in (False, True):
            if ckpt:
                per_row = (SD35M["layers"] + 1) * width * t * d + scale * max(dual, plain)
            else:
                per_row = scale * (n_dual * dual + n_plain * plain)
            per_sample = rows * per_row
            fixed = width * SD35M["params"] + adapters + a.reserve * gib
            fits = [max(0, int((g * gib - fixed) // per_sample)) for g in gpus]
            rows_out.append(dict(base=base, checkpointing=ckpt, per_sample_gib=per_sample / gib,
                                 fixed_gib=fixed / gib, largest_group=dict(zip(a.gpus.split(","), fits))))
            print(f"{base:<5} {'on' if ckpt else 'off':<13} {per_sample / gib:>7.2f} GiB "
                  f"{fixed / gib:>4.1f} GiB " + " ".join(f"{n:>8}" for n in fits))
    print("(largest group: samples whose update fits at once, i.e. the largest `minibatch`)")
    return rows_out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "build":
        if len(sys.argv) != 3:
            sys.exit("usage: sd3_bench.py build DIR")
        print(f"{build(sys.argv[2]):,} parameters in {sys.argv[2]}")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "paper":
        paper_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] in ("worker", "worker-probe"):
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("--model")
        ap.add_argument("--embeddings")
        ap.add_argument("--batch", type=int, default=16)
        ap.add_argument("--steps", type=int, default=4)
        ap.add_argument("--repeats", type=int, default=2)
        ap.add_argument("--cfg", type=float, default=HP["cfg"])
        ap.add_argument("--beta", type=float, default=HP["beta"])
        ap.add_argument("--threads", type=int, default=0)
        ap.add_argument("--latent-size", type=int, default=SMALL["sample_size"])
        ap.add_argument("--lora", default=None)
        ap.add_argument("--rows", type=int, default=4)
        ap.add_argument("--sides", type=lambda s: [int(x) for x in s.split(",")],
                        default=[32, 48])
        a = ap.parse_args()
        (worker_iterate if a.mode == "worker" else worker_probe)(a)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "flowrun-sd3-small"),
                    help="model folder and embeddings (built here if missing)")
    ap.add_argument("--flowrun", action="append", default=[], metavar="BIN:DEVICE",
                    help="flowrun binary and the device it runs on (repeatable)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed iterations per peer per round, after 1 warm-up")
    ap.add_argument("--batch", type=int, default=16, help="samples B = P·G (G = 8)")
    ap.add_argument("--steps", type=int, default=4, help="K")
    ap.add_argument("--cfg", type=float, default=HP["cfg"])
    ap.add_argument("--beta", type=float, default=HP["beta"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--lora", metavar="R[:ALPHA]", default=None,
                    help="both peers train LoRA adapters (rank R, alpha, Flow-GRPO's targets; "
                         "peft on the reference side) instead of every weight")
    ap.add_argument("--memory", action="store_true", help="memory probes instead of timing")
    ap.add_argument("--rows", type=int, default=8, help="--memory: rows per probe forward")
    ap.add_argument("--sides", type=lambda s: [int(x) for x in s.split(",")], default=[32, 48],
                    help="--memory: latent sides of the probes")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    ensure_built(args.dir)
    if args.memory:
        memory_main(args)
    else:
        timing_main(args)


if __name__ == "__main__":
    main()
