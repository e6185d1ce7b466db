"""PyTorch timing of the conv that `trustsplit bench kernels` measures, for a same-machine comparison.

Optional: PyTorch is not a dependency of trustsplit. Usage: python3 pytorch_conv_reference.py THREADS
Prints the median (and min) of 9 runs after 2 warm-ups, forward and forward+backward (dX and dW).
"""
import time, torch, statistics, sys
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(32, 64, 32, 32, requires_grad=True)
w = torch.randn(64, 64, 3, 3, requires_grad=True)
def fwd():
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w, padding=1)
def fwdbwd():
    y = torch.nn.functional.conv2d(x, w, padding=1)
    y.backward(torch.ones_like(y))
for name, f in [("fwd", fwd), ("fwd+bwd", fwdbwd)]:
    f(); f()
    ts = []
    for _ in range(9):
        t = time.perf_counter(); f(); ts.append((time.perf_counter() - t) * 1e3)
    print(f"torch {torch.__version__} threads={sys.argv[1]} {name}: median {statistics.median(ts):.1f} ms min {min(ts):.1f}")
