"""A plain PyTorch (eager, CPU) reference of flowrun's flow model and one TAFS-GRPO iteration.

Written from scratch against flowrun's documented maths (README "TAFS-GRPO", nodes/src/model,
nodes/src/grpo): the text encoder + conditional UNet `FlowModel` with the same parameter names
and shapes as flowrun's safetensors checkpoints (only Linear weights are transposed: flowrun
stores them [d_in, d_out], torch.nn.Linear [d_out, d_in]), the closed-vocabulary tokenizer,
the TAFS Gaussian kernel with its mean-over-dimensions log-probability, group-normalised
step-aware advantages and the clipped GRPO update with AdamW.

Dependencies: torch, numpy, safetensors. Used by check.py (cross-checks against the flowrun
binary) and bench.py (timing).
"""

import json
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import save_file

# ------------------------------------------------------------------------------------------
# Tokenizer (nodes/src/world/tokenizer.rs): closed vocabulary, pad id 0, 16 tokens.
# ------------------------------------------------------------------------------------------

VOCAB = [
    "<pad>", "a", "an", "and", "two", "three", "to", "the", "left", "right", "of", "above",
    "below", "red", "green", "blue", "yellow", "purple", "orange", "circle", "square",
    "triangle", "diamond", "cross", "circles", "squares", "triangles", "diamonds", "crosses",
]
MAX_TOKENS = 16
WORD_ID = {w: i for i, w in enumerate(VOCAB) if i > 0}


def tokenize(prompt):
    """Prompt text -> list of MAX_TOKENS ids (lower-cased words, padded with 0)."""
    ids = []
    for word in prompt.split():
        w = word.lower()
        if w not in WORD_ID:
            raise ValueError(f"unknown word `{word}` in prompt `{prompt}`")
        ids.append(WORD_ID[w])
    if len(ids) > MAX_TOKENS:
        raise ValueError(f"prompt `{prompt}` has more than {MAX_TOKENS} words")
    return ids + [0] * (MAX_TOKENS - len(ids))


def tokens_tensor(prompts):
    return torch.tensor([tokenize(p) for p in prompts], dtype=torch.long)


# ------------------------------------------------------------------------------------------
# Model (nodes/src/model/mod.rs, layers.rs)
# ------------------------------------------------------------------------------------------

MASK_LOGIT = -1.0e4  # additive bias of padding keys (finite: all-pad rows stay NaN-free)


def num_groups(groups, channels):
    """Largest divisor of `channels` that is <= groups."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class GroupNorm(nn.Module):
    """GroupNorm with flowrun's parameter names (gamma, beta); eps 1e-5."""

    def __init__(self, groups, channels, affine=True):
        super().__init__()
        self.groups = num_groups(groups, channels)
        if affine:
            self.gamma = nn.Parameter(torch.ones(channels))
            self.beta = nn.Parameter(torch.zeros(channels))
        else:
            self.gamma = self.beta = None

    def forward(self, x):
        return F.group_norm(x, self.groups, self.gamma, self.beta, 1e-5)


class LayerNorm(nn.Module):
    """LayerNorm with flowrun's parameter names (gamma, beta); eps 1e-5."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, self.gamma.shape, self.gamma, self.beta, 1e-5)


def conv3x3(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def conv1x1(c_in, c_out):
    return nn.Conv2d(c_in, c_out, 1)


def attend(q, k, v, bias):
    """softmax(q kᵀ/√dh + bias) v. q: [B,H,Lq,dh], k/v: [B,H,Lk,dh], bias: [B,1,1,Lk]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class TextLayer(nn.Module):
    """Pre-norm transformer layer: x + MHA(LN(x)), x + MLP(LN(x)) (exact GELU)."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def forward(self, x, key_bias):
        b, l, d = x.shape
        h = self.heads
        # [3, B, heads, L, dh]: q, k, v are the three thirds of the fused projection.
        qkv = self.qkv(self.norm1(x)).reshape(b, l, 3, h, d // h).permute(2, 0, 3, 1, 4)
        ctx = attend(qkv[0], qkv[1], qkv[2], key_bias)
        x = x + self.proj(ctx.transpose(1, 2).reshape(b, l, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TextEncoder(nn.Module):
    def __init__(self, vocab, max_tokens, dim, layers, heads):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embedding = nn.Parameter(torch.zeros(max_tokens, dim))
        self.layers = nn.ModuleList([TextLayer(dim, heads) for _ in range(layers)])
        self.norm = LayerNorm(dim)

    def forward(self, tokens):
        """tokens [B, L] -> (token features [B,L,D], key bias [B,1,1,L], pooled [B,D])."""
        b, l = tokens.shape
        pad = tokens == 0
        key_bias = (pad.to(torch.float32) * MASK_LOGIT).reshape(b, 1, 1, l)
        x = self.token_embedding(tokens) + self.pos_embedding[:l].unsqueeze(0)
        for layer in self.layers:
            x = layer(x, key_bias)
        x = self.norm(x)
        keep = (~pad).to(x.dtype).unsqueeze(-1)
        pooled = (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return x, key_bias, pooled


def timestep_embedding(t, dim):
    """Sinusoidal features of 1000·t: [cos, sin], frequencies exp(−ln(10⁴)·i/half), in f32."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(torch.tensor(-math.log(10000.0), dtype=torch.float32) * i / half)
    args = (t * 1000.0).reshape(-1, 1) * freqs.reshape(1, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GN → SiLU → conv → GN·(1+scale)+shift (FiLM) → SiLU → conv, plus 1×1 skip if needed."""

    def __init__(self, c_in, c_out, cond_dim, groups):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = GroupNorm(groups, c_out, affine=False)
        self.conv2 = conv3x3(c_out, c_out)
        self.skip = conv1x1(c_in, c_out) if c_in != c_out else None

    def forward(self, x, cond_act):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond_act)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1.0 + scale) + shift))
        return (self.skip(x) if self.skip is not None else x) + h


class AttnBlock(nn.Module):
    """Joint (image queries over [image; text] keys, one softmax) or cross (text keys only)."""

    def __init__(self, channels, text_dim, head_dim, groups, joint):
        super().__init__()
        self.heads = max(1, channels // max(1, head_dim))
        self.joint = joint
        self.norm = GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels if joint else channels)
        self.text_kv = nn.Linear(text_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x, text, key_bias):
        b, c, hh, ww = x.shape
        n, l, h = hh * ww, text.shape[1], self.heads
        dh = c // h
        tokens = self.norm(x).reshape(b, c, n).transpose(1, 2)  # [B, HW, C]
        kv = self.text_kv(text).reshape(b, l, 2, h, dh).permute(2, 0, 3, 1, 4)  # [2,B,h,L,dh]
        if self.joint:
            qkv = self.qkv(tokens).reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
            k = torch.cat([qkv[1], kv[0]], dim=2)
            v = torch.cat([qkv[2], kv[1]], dim=2)
            bias = torch.cat([key_bias.new_zeros(b, 1, 1, n), key_bias], dim=3)
            ctx = attend(qkv[0], k, v, bias)
        else:
            q = self.qkv(tokens).reshape(b, n, h, dh).transpose(1, 2)
            # The null (all-pad) prompt attends to nothing: its context is exactly zero.
            any_key = (key_bias == 0).any(dim=3, keepdim=True).to(x.dtype)
            ctx = attend(q, kv[0], kv[1], key_bias) * any_key
        out = self.proj(ctx.transpose(1, 2).reshape(b, n, c))
        return x + out.transpose(1, 2).reshape(b, c, hh, ww)


class Level(nn.Module):
    def __init__(self, blocks, attn=None, reduce=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.reduce = reduce


def downsample(x):
    return F.avg_pool2d(x, 2)


def upsample(x):
    return F.interpolate(x, scale_factor=2, mode="nearest")


class FlowModel(nn.Module):
    """v_θ(x_t, t, c): text encoder + conditional UNet (see nodes/src/model/mod.rs)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        e, g, ch = cfg["cond_dim"], cfg["groups"], cfg["channels"]
        n = len(ch)
        size = cfg["image_size"]

        def attn(level, c):
            res = size >> level
            if res not in cfg["attn_resolutions"]:
                return None
            joint = res in cfg["joint_attn_resolutions"]
            return AttnBlock(c, cfg["text_dim"], cfg["attn_head_dim"], g, joint)

        self.text = TextEncoder(cfg["vocab_size"], cfg["max_tokens"], cfg["text_dim"],
                                cfg["text_layers"], cfg["text_heads"])
        self.time_fc1 = nn.Linear(cfg["time_freq_dim"], e)
        self.time_fc2 = nn.Linear(e, e)
        self.text_cond = nn.Linear(cfg["text_dim"], e)
        self.conv_in = conv3x3(cfg["image_channels"], ch[0])
        down, c_prev = [], ch[0]
        for i, c in enumerate(ch):
            blocks = []
            for _ in range(cfg["res_blocks"]):
                blocks.append(ResBlock(c_prev, c, e, g))
                c_prev = c
            down.append(Level(blocks, attn(i, c)))
        self.down = nn.ModuleList(down)
        c_mid = ch[-1]
        self.mid = Level([ResBlock(c_mid, c_mid, e, g) for _ in range(max(1, cfg["mid_blocks"]))],
                         AttnBlock(c_mid, cfg["text_dim"], cfg["attn_head_dim"], g, True))
        up, c_cur = [], c_mid
        for i in reversed(range(n)):
            c = ch[i]
            blocks = [ResBlock(c_cur + c, c, e, g)]
            blocks += [ResBlock(c, c, e, g) for _ in range(1, cfg["res_blocks"])]
            reduce = conv1x1(c, ch[i - 1]) if i > 0 else None
            up.append(Level(blocks, attn(i, c), reduce))
            c_cur = ch[i - 1] if i > 0 else c
        self.up = nn.ModuleList(up)
        self.out_norm = GroupNorm(g, ch[0])
        self.out_conv = conv3x3(ch[0], cfg["image_channels"])

    def forward(self, x, t, tokens):
        """x [B,3,H,W], t [B] in [0,1], tokens [B,L] (pad 0) -> velocity [B,3,H,W]."""
        text, key_bias, pooled = self.text(tokens)
        temb = timestep_embedding(t, self.cfg["time_freq_dim"])
        cond = self.time_fc2(F.silu(self.time_fc1(temb))) + self.text_cond(pooled)
        cond_act = F.silu(cond)

        def level(lv, h):
            for block in lv.blocks:
                h = block(h, cond_act)
            if lv.attn is not None:
                h = lv.attn(h, text, key_bias)
            return h

        h = self.conv_in(x)
        skips = []
        for i, lv in enumerate(self.down):
            h = level(lv, h)
            skips.append(h)
            if i + 1 < len(self.down):
                h = downsample(h)
        h = self.mid.blocks[0](h, cond_act)
        h = self.mid.attn(h, text, key_bias)
        for block in self.mid.blocks[1:]:
            h = block(h, cond_act)
        for j, lv in enumerate(self.up):
            h = level(lv, torch.cat([h, skips.pop()], dim=1))
            if lv.reduce is not None:
                h = lv.reduce(h)
            if j + 1 < len(self.up):
                h = upsample(h)
        return self.out_conv(F.silu(self.out_norm(h)))

    def forward_cfg(self, x, t, tokens, scale):
        """Classifier-free guidance v_u + s·(v_c − v_u); the null prompt is all-pad."""
        if scale <= 1.0:
            return self(x, t, tokens)
        b = x.shape[0]
        v = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([tokens, torch.zeros_like(tokens)]))
        return v[b:] + (v[:b] - v[b:]) * scale


def _linear_weight_names(model):
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def load_checkpoint(path):
    """Loads a flowrun model checkpoint (safetensors, config JSON in `flowrun.config`)."""
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["flowrun.config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = FlowModel(cfg)
    linear = _linear_weight_names(model)
    state = {k: (v.t().contiguous() if k in linear else v) for k, v in tensors.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or bad:
        raise ValueError(f"{path}: missing {missing[:8]}, unexpected {extra[:8]}, "
                         f"shape mismatch {bad[:8]}")
    model.load_state_dict(state)
    return model


def save_checkpoint(model, path):
    """Writes `model` in flowrun's checkpoint format (Linear weights back to [d_in, d_out])."""
    linear = _linear_weight_names(model)
    tensors = {k: (v.t() if k in linear else v).detach().contiguous().numpy()
               for k, v in model.state_dict().items()}
    save_file(tensors, path, metadata={"flowrun.config": json.dumps(model.cfg),
                                       "flowrun.format": "flowrun.flow_model.v1"})


# ------------------------------------------------------------------------------------------
# TAFS-GRPO (nodes/src/grpo, annealed_renoiser.rs, step_advantage.rs, grpo_update.rs)
# ------------------------------------------------------------------------------------------

HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)


def tafs_kernel(t, t_next, tau):
    """x_next ~ N(a·x_t + b·v, std²): mean (1−t')·x̂0 + t'·√(1−τ²)·ε̂, std t'·τ."""
    keep = math.sqrt(max(1.0 - tau * tau, 0.0))
    a = (1.0 - t_next) + t_next * keep
    b = -(1.0 - t_next) * t + t_next * keep * (1.0 - t)
    return a, b, t_next * tau


def log_prob(x_next, mean, std):
    """Per-sample log N(x_next; mean, std²), reduced as a mean over the C·H·W dimensions."""
    sq = (x_next - mean).square().flatten(1).mean(1)
    return -sq / (2.0 * std * std) - math.log(std) - HALF_LN_2PI


def group_normalise(values, groups, eps=1e-4):
    """(r − mean_group) / (std_group + eps) with the population std, summed in float64 in
    sample order and cast to float32 at the end, exactly as flowrun's `normalise`."""
    eps = float(np.float32(eps))
    values = [float(v) for v in values]
    groups = [int(g) for g in groups]
    n_groups = max(groups) + 1 if groups else 0
    total, count, sq = [0.0] * n_groups, [0] * n_groups, [0.0] * n_groups
    for v, g in zip(values, groups):
        total[g] += v
        count[g] += 1
    mean = [s / max(c, 1) for s, c in zip(total, count)]
    for v, g in zip(values, groups):
        sq[g] += (v - mean[g]) ** 2
    std = [math.sqrt(s / max(c, 1)) for s, c in zip(sq, count)]
    return np.array([(v - mean[g]) / (std[g] + eps) for v, g in zip(values, groups)],
                    dtype=np.float32)


def step_advantages(rewards, groups, mode="mix", lam=0.5, gamma=1.0, eps=1e-4):
    """rewards [K][B] (one per prediction) -> advantages [K−1][B] of the transitions (float32).

    Transition k gets, by mode: final Â_K, step Â_{k+1}, gain normalised r_{k+1} − r_k,
    return Σ_{j>k} γ^{j−k−1}·Â_j, mix λ·Â_{k+1} + (1−λ)·Â_K (the pipeline's default)."""
    rewards = [np.asarray(r, dtype=np.float32) for r in rewards]
    norm = [group_normalise(r, groups, eps) for r in rewards]
    lam, gamma = np.float32(lam), np.float32(gamma)
    last = len(norm) - 1
    out = []
    for k in range(last):
        if mode == "final":
            a = norm[last]
        elif mode == "step":
            a = norm[k + 1]
        elif mode == "gain":
            a = group_normalise(rewards[k + 1] - rewards[k], groups, eps)
        elif mode == "return":
            a = np.zeros_like(norm[0])
            for j in range(k + 1, last + 1):
                a = a + gamma ** np.float32(j - k - 1) * norm[j]
        elif mode == "mix":
            a = lam * norm[k + 1] + (np.float32(1.0) - lam) * norm[last]
        else:
            raise ValueError(f"unknown advantage mode {mode!r}")
        out.append(np.asarray(a, dtype=np.float32))
    return out


def linear_schedule(start, end, count):
    return [start + (end - start) * (i / (count - 1) if count > 1 else 0.0) for i in range(count)]


# pipelines/tafs_grpo.yaml defaults
DEFAULTS = dict(
    prompts_per_iter=32, group_size=8,
    t=[1.0, 0.75, 0.5, 0.25], t_next=[0.75, 0.5, 0.25, 0.0], tau=linear_schedule(1.0, 0.6, 4),
    cfg=1.0, mode="mix", lam=0.5, adv_eps=1e-4,
    clip_range=1e-4, adv_clip=5.0, lr=3e-5, betas=(0.9, 0.999), adam_eps=1e-8,
    weight_decay=0.0, grad_clip_norm=1.0, ema_decay=0.999,
    # True: the rollout keeps each velocity's autograd graph and the update back-propagates
    # through it (one step over the whole batch right after sampling: the same forward).
    keep_graph=False,
)


def brightness_reward(x0):
    """Timing stand-in for the verifier: mean brightness of clamp((x̂0+1)/2, 0, 1) per image."""
    return ((x0 + 1.0) * 0.5).clamp(0.0, 1.0).flatten(1).mean(1)


class TafsGrpo:
    """One policy (trained in place), its AdamW state and EMA copy, and the iteration."""

    def __init__(self, model, hp=None, reward=brightness_reward):
        self.hp = dict(DEFAULTS, **(hp or {}))
        self.model = model
        self.reward = reward
        h = self.hp
        self.opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=h["betas"],
                                     eps=h["adam_eps"], weight_decay=h["weight_decay"])
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.steps = 0

    def rollout(self, tokens, groups, noise, eps):
        """K one-step predictions with annealed re-noising in between; per-step rewards."""
        h = self.hp
        x, transitions, rewards = noise, [], []
        b = x.shape[0]
        for k, t in enumerate(h["t"]):
            last = k + 1 == len(h["t"])
            with torch.set_grad_enabled(h["keep_graph"] and not last):
                tracked = self.model.forward_cfg(x, torch.full((b,), t), tokens, h["cfg"])
            v = tracked.detach()
            x0 = x - t * v
            rewards.append(self.reward(x0).numpy())
            if k + 1 == len(h["t"]):
                break
            a, bb, std = tafs_kernel(t, h["t_next"][k], h["tau"][k])
            mean = a * x + bb * v
            x_next = mean + std * eps[k]
            transitions.append(dict(t=t, a=a, b=bb, std=std, x_t=x, x_next=x_next,
                                    old_logprob=log_prob(x_next, mean, std),
                                    v=tracked if h["keep_graph"] else None))
            x = x_next
        return transitions, rewards

    def update(self, tokens, transitions, adv):
        """One clipped-GRPO AdamW step over all transitions (whole batch, 1 epoch)."""
        h = self.hp
        loss = 0.0
        for tr, a in zip(transitions, adv):
            a = torch.from_numpy(a).clamp(-h["adv_clip"], h["adv_clip"])
            b = tr["x_t"].shape[0]
            v = tr.get("v")
            if v is None:
                v = self.model.forward_cfg(tr["x_t"], torch.full((b,), tr["t"]), tokens, h["cfg"])
            mean = tr["a"] * tr["x_t"] + tr["b"] * v
            ratio = torch.exp(log_prob(tr["x_next"], mean, tr["std"]) - tr["old_logprob"])
            clipped = ratio.clamp(1.0 - h["clip_range"], 1.0 + h["clip_range"])
            loss = loss + torch.maximum(-a * ratio, -a * clipped).mean()
        loss = loss / len(transitions)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), h["grad_clip_norm"])
        self.opt.step()
        decay = min(h["ema_decay"], (1.0 + self.steps) / (10.0 + self.steps))
        with torch.no_grad():
            for e, p in zip(self.ema, self.model.parameters()):
                e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        self.steps += 1
        return loss.item(), grad_norm.item()

    def iteration(self, tokens, groups, generator):
        """Noise → K predictions/rewards → advantages → one update. Returns diagnostics."""
        h = self.hp
        b = tokens.shape[0]
        noise = torch.randn(b, 3, 32, 32, generator=generator)
        eps = [torch.randn(b, 3, 32, 32, generator=generator) for _ in h["t"][:-1]]
        transitions, rewards = self.rollout(tokens, groups, noise, eps)
        adv = step_advantages(rewards, groups, h["mode"], h["lam"], eps=h["adv_eps"])
        loss, grad_norm = self.update(tokens, transitions, adv)
        return dict(loss=loss, grad_norm=grad_norm,
                    reward_mean=[float(np.mean(r)) for r in rewards])


def load_prompts(path, n):
    with open(path) as f:
        return [json.loads(line)["prompt"] for line, _ in zip(f, range(n))]


def prompt_batch(prompts, group_size):
    """P prompts, each repeated G times (sample-major): tokens [P·G, L], group ids [P·G]."""
    rows = [p for p in prompts for _ in range(group_size)]
    groups = np.repeat(np.arange(len(prompts)), group_size)
    return tokens_tensor(rows), groups
