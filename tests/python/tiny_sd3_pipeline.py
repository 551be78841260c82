#!/usr/bin/env python3
"""Build a tiny random Stable Diffusion 3 pipeline folder, with fixed seeds and no download.

    python tests/python/tiny_sd3_pipeline.py OUT_DIR

OUT_DIR gets what `StableDiffusion3Pipeline.save_pretrained` writes (a real `model_index.json`,
one folder per component): two random `CLIPTextModelWithProjection` (CLIP-L and CLIP-G
stand-ins, hidden 32 and 64, projections 32 and 64), a random `T5EncoderModel` (d_model 128),
their tokenizers built here from a small byte-level BPE vocabulary (CLIP) and a small Unigram
vocabulary (T5), a tiny `SD3Transformer2DModel` (joint_attention_dim 128 = the T5 width, which
is at least CLIP-L + CLIP-G = 96 as `encode_prompt` pads the CLIP features to it;
pooled_projection_dim 96 = the two projections), a tiny `AutoencoderKL` (16 latent channels)
and `FlowMatchEulerDiscreteScheduler(shift=3.0)`.

The same versions give the same weights bit for bit; the versions the tests were written
against are pinned below (set FLOWRUN_ALLOW_OTHER_VERSIONS=1 to build with others anyway).
"""

import json
import os
import sys

PINNED = {"torch": "2.9.0", "diffusers": "0.42.1", "transformers": "5.24.0"}

# Sizes shared with tests/prompt_embeddings.rs.
CLIP_L_HIDDEN, CLIP_G_HIDDEN, T5_WIDTH = 32, 64, 128
CLIP_MAX_LENGTH = 77

WORDS = [
    "a", "an", "the", "of", "on", "in", "and", "with", "photo", "red", "blue", "green", "cat",
    "dog", "circle", "square", "triangle", "two", "three", "left", "right", "above", "below",
    "small", "big", "painting", "city", "night", "sky",
]


def check_versions():
    import diffusers
    import torch
    import transformers

    found = {"torch": torch.__version__, "diffusers": diffusers.__version__,
             "transformers": transformers.__version__}
    bad = [f"{k} {found[k]} (pinned {v})" for k, v in PINNED.items()
           if found[k].split("+")[0] != v]
    if bad and os.environ.get("FLOWRUN_ALLOW_OTHER_VERSIONS") != "1":
        sys.exit("tiny_sd3_pipeline.py: unpinned versions: " + ", ".join(bad)
                 + " (set FLOWRUN_ALLOW_OTHER_VERSIONS=1 to build anyway)")


def bytes_to_unicode():
    """CLIP's (GPT-2's) byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer():
    """A CLIP BPE tokenizer: every byte, alone and word-final, plus merges for a few words."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    for w in WORDS:
        # Merge left to right: t h → th, th e</w> → the</w>.
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            if (a, b) not in merges:
                merges.append((a, b))
            parts = [a + b] + parts[2:]
            vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """A T5 Unigram tokenizer: specials, letters, digits, punctuation and a few words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for i, w in enumerate(WORDS):
        pieces.append(("▁" + w, -3.0 - 0.01 * i))
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        pieces.append((c, -5.0))
        pieces.append(("▁" + c, -5.5))
    for c in ".,:;!?'\"-()/":
        pieces.append((c, -6.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build(out_dir):
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    tok = clip_tokenizer()
    tok_2 = clip_tokenizer()
    tok_3 = t5_tokenizer()

    def clip(seed, hidden):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
            projection_dim=hidden, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)
        return CLIPTextModelWithProjection(cfg).eval()

    text_encoder = clip(1, CLIP_L_HIDDEN)
    text_encoder_2 = clip(2, CLIP_G_HIDDEN)
    torch.manual_seed(3)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tok_3), d_model=T5_WIDTH, d_kv=16, d_ff=2 * T5_WIDTH, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=tok_3.pad_token_id, eos_token_id=tok_3.eos_token_id,
        decoder_start_token_id=tok_3.pad_token_id)).eval()
    torch.manual_seed(4)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
        pooled_projection_dim=CLIP_L_HIDDEN + CLIP_G_HIDDEN, out_channels=16,
        pos_embed_max_size=16)
    torch.manual_seed(5)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tok, text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2, text_encoder_3=text_encoder_3, tokenizer_3=tok_3)
    pipe.save_pretrained(out_dir)
    return pipe


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.exit("usage: tiny_sd3_pipeline.py OUT_DIR")
    check_versions()
    out = argv[1]
    build(out)
    with open(os.path.join(out, "model_index.json")) as f:
        components = sorted(k for k, v in json.load(f).items()
                            if isinstance(v, list) and v[0] is not None)
    print(f"tiny SD3 pipeline in {out}: {', '.join(components)}")


if __name__ == "__main__":
    main(sys.argv)
