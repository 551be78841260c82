"""Read a flowrun run's TensorBoard event files with TensorBoard's own reader and check them
against the run's metrics.jsonl.

    check_tensorboard.py RUN_DIR --image-steps 2 [--images 4] [--image-steps-from-eval ...]

Checks, printing one line per check and exiting non-zero on the first failure:
- every key of every metrics.jsonl row but `iteration` is a scalar tag, with one event per
  iteration at that iteration's step and the row's value (to float32 precision);
- no step appears twice for any scalar tag (after a resume: the resumed value only);
- the x̂0 images at the given steps decode as PNGs of the size the event says, with their
  tags `advantages/x0/stepK/J` and a caption naming the prompt and reward;
- histograms of rewards, advantages and log-ratios are present for every step of every
  iteration;
- the resolved pipeline is there as text.
"""

import argparse
import glob
import io
import json
import math
import os
import struct
import sys
import zlib

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_accumulator as pea


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def png_size(data):
    """(width, height) of a PNG, after checking its signature and every chunk's CRC."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail("image is not a PNG")
    pos, size, idat = 8, None, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        if zlib.crc32(kind + body) != crc:
            fail(f"PNG chunk {kind!r} has a bad CRC")
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        if kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    raw = zlib.decompress(idat)
    # RGB8: one filter byte per row and 3 bytes per pixel.
    if len(raw) != h * (1 + 3 * w):
        fail(f"PNG of {w}x{h} decompresses to {len(raw)} bytes, not {h * (1 + 3 * w)}")
    return w, h


def png_pixels(data):
    """(width, height, RGB bytes) of an 8-bit PNG, any filter, RGB or RGBA (alpha dropped)."""
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBB", body[:10])
        if kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour = hdr
    if depth != 8 or colour not in (2, 6):
        fail(f"PNG of bit depth {depth}, colour type {colour}")
    bpp = 3 if colour == 2 else 4
    raw, stride, out, prev = zlib.decompress(idat), w * bpp, bytearray(), bytearray(w * bpp)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        for x in range(w):
            out += line[x * bpp : x * bpp + 3]
    return w, h, bytes(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--image-steps", type=int, nargs="*", default=[])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="rollout steps of the pipeline")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--eval-grids", type=int, nargs="*", default=[],
                    help="sample_eval step counts whose grids must be images `<eval>/grid/Nstep`, "
                         "equal to the run's samples/iter-*-Nstep.png")
    ap.add_argument("--eval-node", default="eval")
    args = ap.parse_args()

    rows = [json.loads(l) for l in open(os.path.join(args.run_dir, "metrics.jsonl")) if l.strip()]
    tb_dir = os.path.join(args.run_dir, "tb")
    acc = ea.EventAccumulator(
        tb_dir,
        size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0, ea.TENSORS: 0},
    )
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = set(tags["scalars"])
    iterations = [r["iteration"] for r in rows]

    # Scalars: the same keys and values as metrics.jsonl, each step once.
    keys = sorted({k for r in rows for k in r if k != "iteration"})
    missing = [k for k in keys if k not in scalar_tags]
    if missing:
        fail(f"metrics.jsonl keys with no TensorBoard scalar: {missing}")
    extra = sorted(scalar_tags - set(keys))
    if extra:
        fail(f"TensorBoard scalars that metrics.jsonl does not have: {extra}")
    checked = 0
    for k in keys:
        events = acc.Scalars(k)
        steps = [e.step for e in events]
        if len(steps) != len(set(steps)):
            fail(f"scalar `{k}` has a step more than once: {steps}")
        want = [r["iteration"] for r in rows if k in r]
        if steps != want:
            fail(f"scalar `{k}` is at steps {steps}, metrics.jsonl at {want}")
        by_step = {e.step: e for e in events}
        for r in rows:
            if k not in r:
                continue
            got, v = by_step[r["iteration"]].value, r[k]
            if v is None:
                if not math.isnan(got):
                    fail(f"scalar `{k}` at {r['iteration']} is {got}, metrics.jsonl has null")
                continue
            if not math.isclose(got, v, rel_tol=1e-6, abs_tol=1e-30) and struct.unpack(
                "f", struct.pack("f", v)
            )[0] != got:
                fail(f"scalar `{k}` at {r['iteration']} is {got}, metrics.jsonl has {v}")
            checked += 1
        walls = [e.wall_time for e in events]
        if any(w < 1.6e9 for w in walls) or walls != sorted(walls):
            fail(f"scalar `{k}` has wall times that are not increasing Unix times: {walls}")
    print(f"scalars: {len(keys)} tags, {checked} values equal to metrics.jsonl, each step once")

    # Images: the x̂0 of each step on the image iterations.
    image_tags = set(tags["images"])
    for s in range(1, args.steps + 1):
        for j in range(args.images):
            tag = f"advantages/x0/step{s}/{j}"
            if tag not in image_tags:
                fail(f"no image `{tag}` (images: {sorted(image_tags)[:8]}…)")
            events = acc.Images(tag)
            steps = [e.step for e in events]
            if steps != args.image_steps:
                fail(f"image `{tag}` at steps {steps}, expected {args.image_steps}")
            for e in events:
                if (e.width, e.height) != (args.image_size, args.image_size):
                    fail(f"image `{tag}` is {e.width}x{e.height}")
                if png_size(e.encoded_image_string) != (e.width, e.height):
                    fail(f"image `{tag}`'s PNG is not {e.width}x{e.height}")
            meta = acc.SummaryMetadata(tag)
            if "reward" not in meta.summary_description:
                fail(f"image `{tag}` has no reward in its caption: {meta.summary_description!r}")
    print(f"images: {args.steps}x{args.images} x̂0 tags at steps {args.image_steps}, "
          f"{args.image_size}x{args.image_size} PNGs, captioned")
    # sample_eval's grids: the same pictures as the PNGs it writes to samples/.
    for n in args.eval_grids:
        tag = f"{args.eval_node}/grid/{n}step"
        if tag not in image_tags:
            fail(f"no image `{tag}` (images: {sorted(image_tags)[:8]}…)")
        events = acc.Images(tag)
        files = sorted(glob.glob(os.path.join(args.run_dir, "samples", f"iter-*-{n}step.png")))
        if [e.step for e in events] != [int(os.path.basename(f)[5:11]) for f in files]:
            fail(f"grid `{tag}` at steps {[e.step for e in events]}, samples/ has {files}")
        for e, f in zip(events, files):
            with open(f, "rb") as fh:
                on_disk = png_pixels(fh.read())
            if png_size(e.encoded_image_string) != (e.width, e.height) or \
                    png_pixels(e.encoded_image_string) != on_disk:
                fail(f"grid `{tag}` at step {e.step} is not the picture of {f}")
    if args.eval_grids:
        print(f"grids: {args.eval_grids} step counts, the pictures of samples/")
    # Text is a tensor summary, which the legacy accumulator above does not purge on a
    # restart; TensorBoard's server reads through the plugin accumulator, which does.
    pacc = pea.EventAccumulator(tb_dir, size_guidance={pea.TENSORS: 0})
    pacc.Reload()
    if args.image_steps:
        captions = pacc.Tensors("advantages/x0/captions")
        if [e.step for e in captions] != args.image_steps:
            fail(f"caption table at steps {[e.step for e in captions]}")
        text = captions[0].tensor_proto.string_val[0].decode()
        if "| step | sample | reward | prompt |" not in text:
            fail(f"caption table: {text[:200]!r}")

    # Histograms: rewards, advantages and log-ratios, every step of every iteration.
    hist_tags = set(tags["histograms"])
    for s in range(1, args.steps + 1):
        want = [f"advantages/reward/step{s}"]
        if s < args.steps:
            want += [f"advantages/advantage/step{s}", f"update/log_ratio/step{s}"]
        for tag in want:
            if tag not in hist_tags:
                fail(f"no histogram `{tag}` (histograms: {sorted(hist_tags)})")
            hs = acc.Histograms(tag)
            if [h.step for h in hs] != iterations:
                fail(f"histogram `{tag}` at steps {[h.step for h in hs]}, expected {iterations}")
            for h in hs:
                if h.histogram_value.num <= 0 or sum(h.histogram_value.bucket) != h.histogram_value.num:
                    fail(f"histogram `{tag}` at {h.step} counts {h.histogram_value}")
    print(f"histograms: {len(hist_tags)} tags, each at every iteration")

    # The resolved pipeline.
    if "pipeline" not in tags["tensors"]:
        fail(f"no text `pipeline` (tensors: {tags['tensors']})")
    # The plugin accumulator's view of the scalars too: each step once, the resumed value.
    for k in keys:
        steps = [e.step for e in pacc.Tensors(k)] if k in pacc.Tags()["tensors"] else None
        if steps is not None and len(steps) != len(set(steps)):
            fail(f"scalar `{k}` (plugin accumulator) has a step more than once: {steps}")
    text = pacc.Tensors("pipeline")[-1].tensor_proto.string_val[0].decode()
    if "name: tafs_tiny" not in text:
        fail(f"text `pipeline` is not the resolved pipeline: {text[:200]!r}")
    print("text: the resolved pipeline")
    print("OK")


if __name__ == "__main__":
    main()
