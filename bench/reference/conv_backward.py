"""PyTorch peer of examples/conv_backward.rs: one 3x3 convolution forward + backward (batch 64)."""
import torch, time
torch.manual_seed(0)
for c,hw in [(32,32),(64,16),(128,8)]:
    conv=torch.nn.Conv2d(c,c,3,padding=1)
    x=torch.randn(64,c,hw,hw)
    def f():
        conv.zero_grad(); conv(x).sum().backward()
    f(); ts=[]
    for _ in range(5):
        t0=time.perf_counter(); f(); ts.append(time.perf_counter()-t0)
    ts.sort(); print(f"torch c={c} hw={hw}: median {ts[2]*1e3:.1f} ms")
