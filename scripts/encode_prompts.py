#!/usr/bin/env python3
"""Encode prompts once with a Stable Diffusion 3 model's own text encoders, for flowrun.

    python scripts/encode_prompts.py MODEL_DIR PROMPTS --out FILE.safetensors
        [--max-sequence-length 128] [--dtype bf16|f16|f32] [--shard-size 2GB] [--batch 32]
        [--device cpu|cuda] [--compute-dtype f32|bf16|f16] [--format auto|text|jsonl]

MODEL_DIR is a diffusers SD3 folder (`model_index.json` with CLIP-L, CLIP-G and T5 text
encoders and tokenizers; the transformer and VAE are not loaded). The prompts are encoded with
`StableDiffusion3Pipeline.encode_prompt(prompt, prompt_2=None, prompt_3=None,
max_sequence_length=…)` — CLIP-L and CLIP-G hidden states (77 tokens, concatenated and
zero-padded to the T5 width) followed by T5's (max_sequence_length tokens; Flow-GRPO uses 128),
and the two pooled CLIP projections concatenated — and the empty negative prompt through the
pipeline's classifier-free-guidance path (`negative_prompt=""`).

PROMPTS is one of the formats Flow-GRPO ships: plain text, one prompt a line, blank lines
skipped (`pickscore/train.txt`); or JSONL, one object a line with a string `prompt` and any
other fields, kept as the prompt's metadata (GenEval's `tag`, `include`, …). `--format auto`
(the default) reads `.jsonl` files as JSONL and anything else as text.

Output, half precision by default (bf16; `--dtype f32` is for checks):
  FILE.safetensors holding
    prompt_embeds                  [N, L, D]  L = 77 + max_sequence_length, D = T5 width
    pooled_prompt_embeds           [N, P]     P = CLIP-L + CLIP-G projection widths
    negative_prompt_embeds         [1, L, D]  the empty prompt
    negative_pooled_prompt_embeds  [1, P]
  and metadata in its header (`__metadata__`: model dir, max_sequence_length, dims, dtypes,
  package versions, the sidecar's name, an id shared by all files of one encoding).
  When the whole would be larger than --shard-size, it is sharded the way diffusers names
  shards instead: FILE-00001-of-0000K.safetensors … each holding rows [first_row, first_row +
  rows) of the two prompt tensors (the negatives are in the first shard only), and
  FILE.safetensors.index.json listing them: {"metadata": {...}, "shards": [{"file",
  "first_row", "rows"}, ...]}.
  FILE.jsonl beside it, one row per prompt: {"index": i, "prompt": text, "metadata": {...}}.

Shards are written as the batches come (a batch at a time in memory, never the whole set: 25k
PickScore prompts at 205 x 4096 bf16 are ~43 GB), each under a temporary name renamed when
complete; the index and the sidecar are written last. flowrun reads the result with
`nodes::model::text_embeddings::PromptEmbeddings::open`.
"""

import argparse
import json
import os
import re
import sys
import time
import uuid

FORMAT = "flowrun.prompt_embeddings/1"
TEXT_COMPONENTS = {
    "text_encoder": "CLIP-L text encoder",
    "text_encoder_2": "CLIP-G text encoder",
    "text_encoder_3": "T5 text encoder",
    "tokenizer": "CLIP-L tokenizer",
    "tokenizer_2": "CLIP-G tokenizer",
    "tokenizer_3": "T5 tokenizer",
}
DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class Fail(Exception):
    """An error for the user: printed without a traceback."""


def parse_size(text):
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(
            f"`{text}` is not a size (e.g. 2GB, 500MB, 64KiB, or bytes)")
    n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"the shard size must be > 0, got `{text}`")
    return n


def positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def read_prompts(path, fmt):
    """[(prompt, metadata dict)] from a text or JSONL file; errors name the file and line."""
    if not os.path.exists(path):
        raise Fail(f"{path}: no such prompts file")
    if os.path.isdir(path):
        raise Fail(f"{path}: is a directory, not a prompts file")
    if fmt == "auto":
        fmt = "jsonl" if path.lower().endswith((".jsonl", ".ndjson")) else "text"
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise Fail(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})")
            line = line.rstrip("\r\n")
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            if fmt == "text":
                out.append((line.strip(), {}))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise Fail(f"{path}:{lineno}: not a JSON object: {e.msg} (column {e.colno})")
            if not isinstance(row, dict):
                raise Fail(f"{path}:{lineno}: a JSONL row must be an object with a string "
                           f"`prompt`, found {type(row).__name__}")
            prompt = row.pop("prompt", None)
            if not isinstance(prompt, str):
                what = "the row has no `prompt`" if prompt is None else \
                    f"`prompt` is {json.dumps(prompt)[:40]}, not a string"
                raise Fail(f"{path}:{lineno}: {what} (each row needs a string `prompt`)")
            out.append((prompt, row))
    if not out:
        raise Fail(f"{path}: no prompts in it")
    return out


def check_model_dir(model_dir):
    """The folder's model_index.json, with every text component present."""
    if not os.path.exists(model_dir):
        raise Fail(f"{model_dir}: no such model folder")
    if not os.path.isdir(model_dir):
        raise Fail(f"{model_dir}: not a folder (give a diffusers pipeline folder)")
    index_path = os.path.join(model_dir, "model_index.json")
    if not os.path.isfile(index_path):
        raise Fail(f"{model_dir}: no model_index.json: not a diffusers pipeline folder")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise Fail(f"{index_path}: cannot read it: {e}")
    if not isinstance(index, dict):
        raise Fail(f"{index_path}: not a JSON object")

    def present(name):
        v = index.get(name)
        return isinstance(v, list) and len(v) == 2 and v[0] is not None and \
            os.path.isdir(os.path.join(model_dir, name))

    missing = [n for n in TEXT_COMPONENTS if not present(n)]
    if len(missing) == len(TEXT_COMPONENTS):
        raise Fail(f"{model_dir}: no text encoders in it (model_index.json of "
                   f"{index.get('_class_name', 'an unknown pipeline')} lists none of "
                   f"{', '.join(TEXT_COMPONENTS)} with a folder)")
    if missing:
        raise Fail(f"{model_dir}: missing " + ", ".join(
            f"{n} ({TEXT_COMPONENTS[n]})" for n in missing)
            + ": an SD3 folder needs CLIP-L, CLIP-G and T5 with their tokenizers")
    return index


def load_pipeline(model_dir, device, compute_dtype):
    # Quiet the import-time notices of transformers (image processors without torchvision).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[compute_dtype]
    if device == "cuda" and not torch.cuda.is_available():
        raise Fail("--device cuda: torch sees no CUDA device")
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            model_dir, transformer=None, vae=None, dtype=dtype, local_files_only=True)
    except Exception as e:  # diffusers raises many kinds; name the folder
        raise Fail(f"{model_dir}: cannot load its text encoders: {type(e).__name__}: {e}")
    return pipe.to(device)


def tensor_bytes(t, dtype):
    """Little-endian bytes of `t` converted to `dtype` (bf16 / f16 round to nearest even)."""
    import torch

    t = t.detach().to(device="cpu", dtype={"bf16": torch.bfloat16, "f16": torch.float16,
                                           "f32": torch.float32}[dtype]).contiguous()
    if dtype != "f32":
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class ShardWriter:
    """One safetensors file whose header is known in advance; rows are written in place."""

    def __init__(self, path, rows, seq_len, dim, pooled_dim, dtype, metadata, negatives):
        self.path, self.tmp = path, path + ".tmp"
        es = 4 if dtype == "f32" else 2
        self.row_bytes, self.pooled_row_bytes = seq_len * dim * es, pooled_dim * es
        st = DTYPES[dtype]
        tensors = [("prompt_embeds", [rows, seq_len, dim], rows * self.row_bytes),
                   ("pooled_prompt_embeds", [rows, pooled_dim], rows * self.pooled_row_bytes)]
        if negatives is not None:
            tensors += [("negative_prompt_embeds", [1, seq_len, dim], self.row_bytes),
                        ("negative_pooled_prompt_embeds", [1, pooled_dim],
                         self.pooled_row_bytes)]
        header, offset = {"__metadata__": metadata}, 0
        self.offsets = {}
        for name, shape, size in tensors:
            header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + size]}
            self.offsets[name] = offset
            offset += size
        self.data_size = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % 8)  # data 8-byte aligned, as safetensors writes it
        self.data_start = 8 + len(text)
        self.rows, self.written = rows, 0
        self.f = open(self.tmp, "wb")
        self.f.write(len(text).to_bytes(8, "little"))
        self.f.write(text)
        if negatives is not None:
            self.f.seek(self.data_start + self.offsets["negative_prompt_embeds"])
            self.f.write(negatives[0])
            self.f.write(negatives[1])

    def write(self, embeds, pooled, n):
        assert self.written + n <= self.rows and len(embeds) == n * self.row_bytes
        self.f.seek(self.data_start + self.offsets["prompt_embeds"] + self.written * self.row_bytes)
        self.f.write(embeds)
        self.f.seek(self.data_start + self.offsets["pooled_prompt_embeds"]
                    + self.written * self.pooled_row_bytes)
        self.f.write(pooled)
        self.written += n

    def discard(self):
        """Remove the incomplete file (on an error or an interrupt)."""
        if not self.f.closed:
            self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def close(self):
        assert self.written == self.rows
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.data_start + self.data_size


def versions():
    import platform

    import diffusers
    import safetensors
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def encode(args):
    if not args.out.endswith(".safetensors"):
        raise Fail(f"--out {args.out}: must end in .safetensors")
    prompts = read_prompts(args.prompts, args.format)
    index = check_model_dir(args.model_dir)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise Fail(f"--out {args.out}: no such folder {out_dir}")
    compute = args.compute_dtype or ("f32" if args.device == "cpu" else args.dtype)
    t0 = time.time()
    pipe = load_pipeline(args.model_dir, args.device, compute)

    import torch

    msl = args.max_sequence_length

    def run(batch, cfg):
        with torch.inference_mode():
            return pipe.encode_prompt(
                prompt=batch, prompt_2=None, prompt_3=None, device=torch.device(args.device),
                do_classifier_free_guidance=cfg, negative_prompt="" if cfg else None,
                max_sequence_length=msl)

    # The empty negative prompt, through the classifier-free-guidance path; its shapes tell
    # the layout before any prompt is encoded.
    _, neg, _, neg_pooled = run([""], True)
    _, seq_len, dim = neg.shape
    pooled_dim = neg_pooled.shape[1]
    negatives = (tensor_bytes(neg, args.dtype), tensor_bytes(neg_pooled, args.dtype))
    es = 4 if args.dtype == "f32" else 2
    row = (seq_len * dim + pooled_dim) * es
    n = len(prompts)
    total = (n + 1) * row
    base = args.out[: -len(".safetensors")]
    sidecar = base + ".jsonl"
    if total <= args.shard_size:
        per_shard = n
    else:
        per_shard = max(1, (args.shard_size - row) // row)
    k = -(-n // per_shard)
    names = [args.out] if k == 1 else [
        f"{base}-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    common = {
        "format": FORMAT,
        "encoding_id": uuid.uuid4().hex,
        "model_dir": os.path.abspath(args.model_dir),
        "model_class": str(index.get("_class_name")),
        "text_encoders": ",".join(f"{c}={index[c][1]}" for c in
                                  ("text_encoder", "text_encoder_2", "text_encoder_3")),
        "prompts_file": os.path.abspath(args.prompts),
        "num_prompts": str(n),
        "max_sequence_length": str(msl),
        "clip_max_length": str(pipe.tokenizer_max_length),
        "seq_len": str(seq_len),
        "dim": str(dim),
        "pooled_dim": str(pooled_dim),
        "dtype": args.dtype,
        "compute_dtype": compute,
        "device": args.device,
        "negative_prompt": "",
        "sidecar": os.path.basename(sidecar),
        "num_shards": str(k),
        "versions": json.dumps(versions(), sort_keys=True),
    }
    print(f"{n} prompts -> {k} file(s) of up to {per_shard} rows "
          f"([{seq_len}, {dim}] + [{pooled_dim}] {args.dtype} each, {total / 1e9:.3f} GB in all)",
          file=sys.stderr)
    shards, total_size, done, t1 = [], 0, 0, time.time()
    for s, name in enumerate(names):
        first, rows = s * per_shard, min(per_shard, n - s * per_shard)
        meta = dict(common, shard=str(s + 1), first_row=str(first), rows=str(rows))
        w = ShardWriter(name, rows, seq_len, dim, pooled_dim, args.dtype, meta,
                        negatives if s == 0 else None)
        try:
            for b in range(first, first + rows, args.batch):
                batch = [p for p, _ in prompts[b: min(b + args.batch, first + rows)]]
                pe, _, pooled, _ = run(batch, False)
                if tuple(pe.shape[1:]) != (seq_len, dim) or pooled.shape[1] != pooled_dim:
                    raise Fail(f"internal: batch at row {b} has shapes {tuple(pe.shape)}, "
                               f"{tuple(pooled.shape)}")
                w.write(tensor_bytes(pe, args.dtype), tensor_bytes(pooled, args.dtype),
                        len(batch))
                done += len(batch)
            total_size += w.close()
        except BaseException:
            w.discard()
            raise
        shards.append({"file": os.path.basename(name), "first_row": first, "rows": rows})
        rate = done / max(time.time() - t1, 1e-9)
        print(f"  {os.path.basename(name)}: rows {first}..{first + rows} "
              f"({done}/{n}, {rate:.1f} prompts/s)", file=sys.stderr)
    write_atomic(sidecar, "".join(
        json.dumps({"index": i, "prompt": p, "metadata": m}, ensure_ascii=False) + "\n"
        for i, (p, m) in enumerate(prompts)))
    if k > 1:
        idx = {"metadata": dict(common, total_size=total_size), "shards": shards}
        write_atomic(args.out + ".index.json", json.dumps(idx, indent=2) + "\n")
    elif os.path.exists(args.out + ".index.json"):
        # A stale index from an earlier sharded encoding would shadow the single file.
        os.remove(args.out + ".index.json")
    written = args.out + (".index.json" if k > 1 else "")
    print(f"wrote {written} and {sidecar} in {time.time() - t0:.1f}s", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Encode prompts with an SD3 model's text encoders (CLIP-L, CLIP-G, T5) "
                    "into safetensors for flowrun.")
    ap.add_argument("model_dir", metavar="MODEL_DIR", help="diffusers SD3 pipeline folder")
    ap.add_argument("prompts", metavar="PROMPTS", help="prompts: text (one a line) or JSONL")
    ap.add_argument("--out", required=True, help="output FILE.safetensors")
    ap.add_argument("--max-sequence-length", type=positive_int, default=128,
                    help="T5 tokens (default 128, as Flow-GRPO; SD3 allows up to 512)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                    help="stored precision (default bf16; f32 only for checks)")
    ap.add_argument("--compute-dtype", choices=sorted(DTYPES), default=None,
                    help="precision the encoders run in (default: f32 on cpu, --dtype on cuda)")
    ap.add_argument("--shard-size", type=parse_size, default=parse_size("2GB"),
                    help="largest file before sharding (default 2GB; KB/MB/GB, KiB/MiB/GiB)")
    ap.add_argument("--batch", type=positive_int, default=32, help="prompts per forward pass")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto",
                    help="prompts format (auto: .jsonl is JSONL, anything else text)")
    args = ap.parse_args(argv)
    if args.max_sequence_length > 512:
        ap.error(f"--max-sequence-length {args.max_sequence_length}: SD3 allows at most 512")
    try:
        encode(args)
    except Fail as e:
        print(f"encode_prompts.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
