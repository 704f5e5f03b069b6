"""Prints the numbers behind the foundation (issue 2): stats accuracy on 1e4 + N(0, 1),
BatchNorm and the per-sample norms against torch.nn, the registry, convert, bad input.

Run: .venv/bin/python scripts/foundation_evidence.py
"""

import copy
import warnings

import torch
from torch import nn

import normlab
from normlab import convert, stats
from normlab import nn as L

torch.manual_seed(0)
torch.set_num_threads(1)

# 2. statistics core: x = 1e4 + N(0,1) float32, normalized output vs float64
x = 1e4 + torch.randn(32, 64, 16, 16)
dims = (0, 2, 3)
ref = x.double()
ref = (ref - ref.mean(dims, keepdim=True)) / torch.sqrt(
    ref.var(dims, unbiased=False, keepdim=True) + 1e-5
)
m = stats.moments(x, dims)
y = (x - m.mean) / torch.sqrt(m.var + 1e-5)
def rel(a):
    return ((a.double() - ref).norm() / ref.norm()).item()
mean = x.mean(dims, keepdim=True)
short = (x - mean) / torch.sqrt((x * x).mean(dims, keepdim=True) - mean * mean + 1e-5)
print(
    f"[2] 1e4+N(0,1) float32: stats.moments rel L2 {rel(y):.2e}; E[x^2]-E[x]^2 rel L2 {rel(short):.2e}"
)
y_bn = L.BatchNorm(64, affine=False)(x)
print(f"[2] BatchNorm on it: rel L2 {rel(y_bn):.2e}")
xb = (300 + torch.randn(8, 4, 6, 6)).to(torch.float16)
mb = stats.moments(xb, dims)
print(f"[2] float16 300+N(0,1): stats dtype {mb.mean.dtype}, var {mb.var.flatten()[:2].tolist()}")

# 3. BatchNorm vs torch.nn in float32
worst = {}
for shape, ref_cls in [
    ((16, 8), nn.BatchNorm1d),
    ((8, 8, 12), nn.BatchNorm1d),
    ((4, 8, 6, 6), nn.BatchNorm2d),
    ((2, 8, 3, 4, 5), nn.BatchNorm3d),
]:
    for momentum in (0.1, None):
        ours, theirs = L.BatchNorm(8, momentum=momentum), ref_cls(8, momentum=momentum)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
            theirs.load_state_dict(ours.state_dict())
        for mode in ("train", "train", "eval"):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            xi = (torch.randn(shape) * 3 + 2).requires_grad_()
            a, b = ours(xi), theirs(xi)
            g = torch.randn_like(a)
            ga = torch.autograd.grad(a, (xi, ours.weight, ours.bias), g)
            gb = torch.autograd.grad(b, (xi, theirs.weight, theirs.bias), g)

            def r(u, v):
                return ((u - v).abs().max() / v.abs().max()).item()

            vals = {
                "out": r(a, b),
                "dx": r(ga[0], gb[0]),
                "dw": r(ga[1], gb[1]),
                "db": r(ga[2], gb[2]),
                "running_mean": r(ours.running_mean, theirs.running_mean),
                "running_var": r(ours.running_var, theirs.running_var),
            }
            for k, v in vals.items():
                worst[k] = max(worst.get(k, 0), v)
print(
    "[3] BatchNorm vs torch.nn.BatchNorm1d/2d/3d, float32, max |diff|/max|ref| over ranks 2-5,"
    " momentum 0.1/None, train x2 + eval:",
    {k: f"{v:.1e}" for k, v in worst.items()},
)
sd = nn.BatchNorm2d(8).state_dict()
print("[3] state_dict keys torch:", list(sd), "normlab:", list(L.BatchNorm(8).state_dict()))

for name, ours, theirs, shape in [
    ("LayerNorm(N,C)", L.LayerNorm(16), nn.LayerNorm(16), (5, 16)),
    ("RMSNorm(N,C)", L.RMSNorm(16), nn.RMSNorm(16), (5, 16)),
    ("GroupNorm", L.GroupNorm(16, 4), nn.GroupNorm(4, 16), (3, 16, 5, 5)),
    (
        "InstanceNorm2d",
        L.InstanceNorm(16, affine=True, track_running_stats=True),
        nn.InstanceNorm2d(16, affine=True, track_running_stats=True),
        (3, 16, 5, 5),
    ),
]:
    theirs.load_state_dict(ours.state_dict())
    xi = torch.randn(shape) * 2 + 1
    d = ((ours(xi) - theirs(xi)).abs().max()).item()
    print(f"[3] {name}: max |normlab - torch.nn| = {d:.1e}")
xi = torch.randn(3, 16, 5, 5)
cl = L.ChannelLayerNorm(16)
d = (cl(xi) - nn.LayerNorm(16)(xi.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)).abs().max().item()
print(f"[3] ChannelLayerNorm vs torch LayerNorm(C) on channels-last: {d:.1e}")
brn, bn = L.BatchRenorm(8, r_max=1.0, d_max=0.0), L.BatchNorm(8)
xi = torch.randn(6, 8, 4) * 2
bn(xi)
brn(xi)
xi = torch.randn(6, 8, 4) * 2
print(
    f"[3] BatchRenorm(r_max=1, d_max=0) vs BatchNorm, 2nd step: {(brn(xi) - bn(xi)).abs().max().item():.1e}"
)
print(
    "[3] renorm warm-up limits at 0/5k/25k/40k:",
    [
        normlab.functional.renorm_limits(s, 3, 5, (5000, 40000, 25000))
        for s in (0, 5000, 25000, 40000)
    ],
)

# 4. registry
print("[4] list_norms():", normlab.list_norms())
try:
    normlab.create_norm("foo", 8)
except ValueError as e:
    print("[4] create_norm('foo', 8):", str(e)[:160], "...")


# 5. convert
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


model = nn.Sequential(
    nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(), Block(48), Block(48)
)
model.train()
with torch.no_grad():
    for _ in range(5):
        model(torch.randn(8, 3, 8, 8) * 2 + 1)
model.eval()
xi = torch.randn(4, 3, 8, 8)
folded = convert.fold_batchnorm(model)
n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
print(
    f"[5] fold_batchnorm: BN left {n_bn}, max |folded - eval model| = {(folded(xi) - model(xi)).abs().max().item():.1e}"
)
try:
    convert.fold_batchnorm(model.train())
except ValueError as e:
    print("[5] fold in train mode:", e)
m2, rep = convert.swap_norm(copy.deepcopy(model), "gn")
print("[5] swap_norm(model, 'gn'):")
[print("     ", r) for r in rep]
m3 = convert.freeze_batchnorm(copy.deepcopy(model).train())
before = m3[1].running_mean.clone()
out = m3(xi)
print(
    f"[5] freeze_batchnorm: train-mode output == eval output: {torch.allclose(out, model.eval()(xi))}, running_mean unchanged: {torch.equal(before, m3[1].running_mean)}"
)

# 6. bad input
for make, x_bad in [
    (lambda: L.BatchNorm(8), torch.randn(4, 8 + 1, 3)),
    (lambda: L.BatchNorm(8), torch.randn(8)),
    (lambda: L.BatchNorm(8), torch.randn(1, 8)),
    (lambda: L.GroupNorm(48, 32), None),
]:
    try:
        layer = make()
        layer(x_bad)
    except ValueError as e:
        print("[6]", e)
bn = L.BatchNorm(4)
xn = torch.randn(8, 4, 3)
xn[0, 1, 0] = float("nan")
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out = bn(xn)
print(
    f"[6] NaN batch: output NaN in channel 1 only: {out[:, 1].isnan().any().item()} / others finite: {out[:, [0, 2, 3]].isfinite().all().item()}; running_var channel 1 = {bn.running_var[1].item()}; warning: {w[0].message}"
)
