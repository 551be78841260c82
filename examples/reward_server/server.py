#!/usr/bin/env python3
"""Reference reward server for flowrun's `http_reward` node (protocol "flowrun-reward/1").

Python standard library only. Scores each image by its brightness, the mean of all channel
values in [0, 1], and returns brightness and saturation (mean over pixels of max - min channel)
as sub-scores. Deterministic: the same request always gets the same answer.

    python3 examples/reward_server/server.py --port 8000
    # pipeline: {type: http_reward, params: {url: http://127.0.0.1:8000/score}}

Request (POST, JSON):
    {"protocol": "flowrun-reward/1", "iteration": 3, "step": 2, "t": 0.66,
     "encoding": "png" | "u8" | "f32", "height": 32, "width": 32, "channels": 3,
     "items": [{"index": 0, "prompt_id": "...", "prompt": "...", "category": "...",
                "target": {...}, "group": 0, "member": 0, "image": "<base64>"}, ...]}
Response (JSON):
    {"scores": [float per item], "sub_scores": {"name": [float per item], ...}}
GET /health answers {"ok": true}.

Test flags: --fail-first N (HTTP 500 for the first N scoring requests), --sleep S (wait S
seconds before answering each scoring request), --malformed (one score too few), --nan (the
first item of every request scores NaN).
"""

import argparse
import base64
import json
import struct
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def decode_png_rgb8(data):
    """Decode an 8-bit RGB, non-interlaced PNG (what flowrun sends) to (width, height, bytes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, width, height = 8, b"", None, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or color != 2 or interlace != 0:
                raise ValueError("only 8-bit RGB non-interlaced PNGs are supported")
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride, bpp = width * 3, 3
    out = bytearray()
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if ftype == 1:
                line[x] = (line[x] + a) & 0xFF
            elif ftype == 2:
                line[x] = (line[x] + b) & 0xFF
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 0xFF
        out += line
        prev = line
    return width, height, bytes(out)


def pixels(item, encoding, height, width):
    """The image as a list of (r, g, b) tuples with channels in [0, 1]."""
    data = base64.b64decode(item["image"])
    n = height * width
    if encoding == "f32":
        vals = struct.unpack("<%df" % (3 * n), data)
        clamp = lambda v: min(1.0, max(0.0, (v + 1.0) * 0.5))
        return [(clamp(vals[i]), clamp(vals[n + i]), clamp(vals[2 * n + i])) for i in range(n)]
    if encoding == "png":
        width, height, data = decode_png_rgb8(data)
        n = width * height
    elif encoding != "u8":
        raise ValueError("unknown encoding %r" % encoding)
    if len(data) != 3 * n:
        raise ValueError("expected %d bytes, got %d" % (3 * n, len(data)))
    return [(data[3 * i] / 255.0, data[3 * i + 1] / 255.0, data[3 * i + 2] / 255.0) for i in range(n)]


def score_item(px):
    """(score, sub_scores) of one image: brightness, with brightness and saturation."""
    brightness = sum(r + g + b for r, g, b in px) / (3 * len(px))
    saturation = sum(max(p) - min(p) for p in px) / len(px)
    return brightness, {"brightness": brightness, "saturation": saturation}


def score_request(req, nan=False, malformed=False):
    enc, h, w = req.get("encoding", "png"), req.get("height", 32), req.get("width", 32)
    scores, subs = [], {}
    for k, item in enumerate(req["items"]):
        s, sub = score_item(pixels(item, enc, h, w))
        if nan and k == 0:
            s = float("nan")
        scores.append(s)
        for name, v in sub.items():
            subs.setdefault(name, []).append(v)
    if malformed:
        scores = scores[:-1]
    return {"scores": scores, "sub_scores": subs}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code, obj):
        body = json.dumps(obj).encode()  # NaN is written bare, as flowrun accepts
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") in ("/health", ""):
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": "POST scoring requests to any path; GET /health"})

    def do_POST(self):
        cfg = self.server.cfg
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with cfg["lock"]:
            cfg["count"] += 1
            n = cfg["count"]
        if n <= cfg["fail_first"]:
            self._send(500, {"error": "failing on purpose (--fail-first %d): request %d" % (cfg["fail_first"], n)})
            return
        if cfg["sleep"] > 0:
            time.sleep(cfg["sleep"])
        try:
            out = score_request(req, nan=cfg["nan"], malformed=cfg["malformed"])
        except Exception as e:  # a bad request is the client's fault
            self._send(400, {"error": str(e)})
            return
        self._send(200, out)

    def log_message(self, fmt, *args):
        if self.server.cfg["verbose"]:
            sys.stderr.write("%s\n" % (fmt % args))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--fail-first", type=int, default=0, metavar="N", help="HTTP 500 for the first N scoring requests")
    ap.add_argument("--sleep", type=float, default=0.0, metavar="S", help="wait S seconds per scoring request")
    ap.add_argument("--malformed", action="store_true", help="return one score too few")
    ap.add_argument("--nan", action="store_true", help="score the first item of every request NaN")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    a = ap.parse_args()
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.daemon_threads = True
    srv.cfg = {
        "fail_first": a.fail_first,
        "sleep": a.sleep,
        "malformed": a.malformed,
        "nan": a.nan,
        "verbose": a.verbose,
        "count": 0,
        "lock": threading.Lock(),
    }
    print("reward server listening on http://%s:%d" % (a.host, srv.server_address[1]), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
