"""PyTorch peer of examples/conv_backward.rs: one 3x3 convolution forward + backward (batch 64),
and GroupNorm(8 groups) + SiLU forward + backward on the same input."""
import time

import torch

torch.manual_seed(0)


def median_ms(f, runs=5):
    f()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


for c, hw in [(32, 32), (64, 16), (128, 8)]:
    conv = torch.nn.Conv2d(c, c, 3, padding=1)
    x = torch.randn(64, c, hw, hw)

    def conv_step():
        conv.zero_grad()
        conv(x).sum().backward()

    gn = torch.nn.GroupNorm(8, c)
    xg = x.clone().requires_grad_(True)

    def gn_step():
        xg.grad = None
        torch.nn.functional.silu(gn(xg)).sum().backward()

    print(f"torch c={c} hw={hw}: conv fwd+bwd median {median_ms(conv_step):.1f} ms, "
          f"GroupNorm+SiLU fwd+bwd median {median_ms(gn_step):.1f} ms")
