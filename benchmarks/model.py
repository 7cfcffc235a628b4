"""CCNet model benchmark on CPU: parameters, forward+backward time and peak memory.

    python benchmarks/model.py                       # resnet101 (+ van_b2 if registered), 1x3x512x512
    python benchmarks/model.py --backbones resnet50 van_b0 --size 256 --steps 2

For every backbone it builds CCNet (R=2, 150 classes, training mode) in Jittor and times
training steps (forward, SegLoss, gradients of all parameters). For resnet101 it also builds the
same architecture from torch.nn (``build_torch_ccnet`` below: same layers, same parameter
names, einsum criss-cross attention) when torch is importable, and times it the same way with
the same thread count. Each measurement runs in its own subprocess so that peak memory (peak
resident set size, ``ru_maxrss``) belongs to one framework and one model; "activations" is the
peak minus the resident size right after the model was built.

This module also serves as the independent PyTorch reference of tests/test_ccnet.py.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Written out again (not imported from models.resnet) so the reference stays independent.
TORCH_DEPTHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
                "resnet152": ("bottleneck", (3, 8, 36, 3))}
STRIDE_PLANS = {8: ((1, 1), (2, 1), (1, 2), (1, 4)), 16: ((1, 1), (2, 1), (2, 1), (1, 2)),
                32: ((1, 1), (2, 1), (2, 1), (2, 1))}


# ----------------------------------------------------------------------------------------------
# The reference architecture in torch.nn (imported lazily: torch is optional)
# ----------------------------------------------------------------------------------------------
def build_torch_ccnet(backbone="resnet101", num_classes=150, recurrence=2, base_channels=64,
                      output_stride=8, stem="deep", head_channels=512, aux_channels=512,
                      head_act="leaky_relu", dropout=0.1):
    """CCNet in plain torch.nn with the parameter names of models.ccnet (ResNet backbones only)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    block_kind, layers = TORCH_DEPTHS[backbone]
    act = {"leaky_relu": lambda x: F.leaky_relu(x, 0.01), "relu": F.relu}[head_act]

    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return act(super().forward(x))

    def conv3x3(cin, cout, stride=1, dilation=1):
        return nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False)

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride, dilation, downsample):
            super().__init__()
            self.conv1, self.bn1 = conv3x3(cin, planes, stride, dilation), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv3x3(planes, planes, 1, dilation), nn.BatchNorm2d(planes)
            self.downsample = downsample

        def forward(self, x):
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottle(nn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride, dilation, downsample):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
            self.conv2, self.bn2 = conv3x3(planes, planes, stride, dilation), nn.BatchNorm2d(planes)
            self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
            self.downsample = downsample

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    block = Basic if block_kind == "basic" else Bottle

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            b = base_channels
            if stem == "deep":
                self.conv1, self.bn1 = conv3x3(3, b, 2), nn.BatchNorm2d(b)
                self.conv2, self.bn2 = conv3x3(b, b), nn.BatchNorm2d(b)
                self.conv3, self.bn3 = conv3x3(b, 2 * b), nn.BatchNorm2d(2 * b)
                self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
                cin = 2 * b
            else:
                self.conv1, self.bn1 = nn.Conv2d(3, b, 7, 2, 3, bias=False), nn.BatchNorm2d(b)
                self.maxpool = nn.MaxPool2d(3, 2, 1)
                cin = b
            self.out_channels = []
            for i, (n, (stride, dilation)) in enumerate(zip(layers, STRIDE_PLANS[output_stride])):
                planes = b * 2 ** i
                cout = planes * block.expansion
                down = None
                if stride != 1 or cin != cout:
                    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                blocks = [block(cin, planes, stride, dilation, down)]
                blocks += [block(cout, planes, 1, dilation, None) for _ in range(n - 1)]
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
                cin = cout
                self.out_channels.append(cout)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            if stem == "deep":
                x = F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))))
            x = self.maxpool(x)
            feats = []
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
                feats.append(x)
            return feats

    class CCA(nn.Module):
        """Criss-cross attention, the -inf-diagonal einsum formulation (DESIGN.md section 2)."""

        def __init__(self, c):
            super().__init__()
            self.query_conv = nn.Conv2d(c, c // 8, 1)
            self.key_conv = nn.Conv2d(c, c // 8, 1)
            self.value_conv = nn.Conv2d(c, c, 1)
            self.gamma = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
            h = x.shape[2]
            e_col = torch.einsum("bcyx,bcjx->byxj", q, k)
            e_col = e_col.masked_fill(torch.eye(h, dtype=torch.bool, device=x.device)[None, :, None, :],
                                      float("-inf"))
            e_row = torch.einsum("bcyx,bcyj->byxj", q, k)
            att = torch.softmax(torch.cat([e_col, e_row], 3), dim=3)
            out = (torch.einsum("byxj,bcjx->bcyx", att[..., :h], v)
                   + torch.einsum("byxj,bcyj->bcyx", att[..., h:], v))
            return self.gamma * out + x

    def conv_bn_act(cin, cout, bias=False):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), BNAct(cout))

    class Head(nn.Module):
        def __init__(self, cin):
            super().__init__()
            inter = cin // 4
            self.conva = conv_bn_act(cin, inter)
            self.cca = CCA(inter) if recurrence > 0 else None
            self.convb = conv_bn_act(inter, inter)
            self.bottleneck = nn.Sequential(nn.Conv2d(cin + inter, head_channels, 3, padding=1, bias=False),
                                            BNAct(head_channels), nn.Dropout2d(dropout),
                                            nn.Conv2d(head_channels, num_classes, 1))

        def forward(self, x):
            out = self.conva(x)
            for _ in range(recurrence):
                out = self.cca(out)
            return self.bottleneck(torch.cat([x, self.convb(out)], 1))

    class CCNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ResNet()
            c = self.backbone.out_channels
            self.head = Head(c[3])
            self.dsn = nn.Sequential(nn.Conv2d(c[2], aux_channels, 3, padding=1), BNAct(aux_channels),
                                     nn.Dropout2d(dropout), nn.Conv2d(aux_channels, num_classes, 1))

        def forward(self, x):
            feats = self.backbone(x)
            main = self.head(feats[3])
            if self.training:
                return [main, self.dsn(feats[2])]
            return F.interpolate(main, size=x.shape[2:], mode="bilinear", align_corners=False)

    return CCNet()


def copy_jittor_to_torch(jt_model, torch_model):
    """Load the Jittor model's state into the torch model; every key must match in shape."""
    import torch
    state = {k: torch.from_numpy(v.numpy().copy()) for k, v in jt_model.state_dict().items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"state dicts differ: missing in jittor {missing}, unknown to torch {unexpected}")


# ----------------------------------------------------------------------------------------------
# Measurements (each in its own process)
# ----------------------------------------------------------------------------------------------
def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time_steps(step, steps):
    """Wall and process-CPU seconds of ``steps`` calls after one untimed warm-up (compilation).
    CPU seconds (all threads) stay meaningful when other jobs share the cores."""
    step()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def _median(values):
    return sorted(values)[len(values) // 2]


def _label(size, num_classes, seed=0):
    import numpy as np
    return np.random.RandomState(seed).randint(0, num_classes, (1, size, size)).astype("int32")


def measure_jittor(backbone, size, steps, num_classes=150, recurrence=2, output_stride=8):
    import numpy as np
    from utils import runtime
    jt = runtime.activate(verbose=False)
    from models import build_model
    from models.losses import SegLoss

    jt.set_global_seed(0)
    model = build_model(backbone, num_classes, recurrence=recurrence, output_stride=output_stride)
    model.train()
    params = [p for p in model.parameters() if not p.is_stop_grad()]
    n_params = sum(int(np.prod(p.shape)) for p in params)
    jt.sync_all(True)
    base = _rss_mib()
    image = jt.array(np.random.RandomState(0).randn(1, 3, size, size).astype("float32"))
    label = _label(size, num_classes)
    criterion = SegLoss(num_classes)

    def step():
        loss, _ = criterion(model(image), label)
        grads = jt.grad(loss, params)
        jt.sync(grads)
        jt.sync_all(True)

    times, cpu = _time_steps(step, steps)
    return dict(framework="jittor", backbone=backbone, params=n_params, step_s=times, cpu_s=cpu,
                peak_mib=_peak_rss_mib(), activations_mib=_peak_rss_mib() - base)


def measure_torch(backbone, size, steps, num_classes=150, recurrence=2, output_stride=8):
    import numpy as np
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    torch.manual_seed(0)
    model = build_torch_ccnet(backbone, num_classes, recurrence, output_stride=output_stride)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    base = _rss_mib()
    image = torch.from_numpy(np.random.RandomState(0).randn(1, 3, size, size).astype("float32"))
    label = torch.from_numpy(_label(size, num_classes)).long()

    def step():
        main, aux = model(image)
        up = lambda t: F.interpolate(t, size=label.shape[1:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(up(main), label, ignore_index=255) + 0.4 * F.cross_entropy(up(aux), label, ignore_index=255)
        model.zero_grad(set_to_none=True)
        loss.backward()

    times, cpu = _time_steps(step, steps)
    return dict(framework="torch", backbone=backbone, params=n_params, step_s=times, cpu_s=cpu,
                peak_mib=_peak_rss_mib(), activations_mib=_peak_rss_mib() - base)


def _run_worker(framework, backbone, args, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CCNET_QUIET="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", framework, "--backbones", backbone,
           "--size", str(args.size), "--steps", str(args.steps), "--output-stride", str(args.output_stride)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{framework}/{backbone} worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def _torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=None,
                        help="registered backbone names (default: resnet101, and van_b2 when registered)")
    parser.add_argument("--size", type=int, default=512, help="input side (default 512)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        help="threads for both frameworks (default: OMP_NUM_THREADS or all cores)")
    parser.add_argument("--output-stride", type=int, default=8, choices=(8, 16, 32),
                        help="backbone output stride (default 8, as CCNet; VAN's cost per stride)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch.nn reference")
    parser.add_argument("--worker", choices=("jittor", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        measure = measure_jittor if args.worker == "jittor" else measure_torch
        print(json.dumps(measure(args.backbones[0], args.size, args.steps, output_stride=args.output_stride)))
        return

    import utils  # noqa: F401
    import models
    backbones = args.backbones or ["resnet101"] + (["van_b2"] if "van_b2" in models.BACKBONES else [])
    backbones = [models.resolve_backbone_name(b) for b in backbones]
    jobs = [("jittor", b) for b in backbones]
    if not args.no_torch and _torch_available():
        jobs += [("torch", b) for b in backbones if b == "resnet101"]  # the comparison
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = lambda x, **k: x  # noqa: E731

    results = []
    for framework, backbone in tqdm(jobs, desc="benchmark", unit="model"):
        results.append(_run_worker(framework, backbone, args, args.threads))

    print(f"\nCCNet (R=2, 150 classes), training step = forward + loss + all gradients, "
          f"1x3x{args.size}x{args.size}, output stride {args.output_stride}, CPU, {args.threads} threads, median of {args.steps} steps")
    print("| framework | backbone | params (M) | step wall (s) | step CPU (s) | peak RSS (MiB) | activations (MiB) |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for r in results:
        wall, cpu = _median(r["step_s"]), _median(r["cpu_s"])
        medians[(r["framework"], r["backbone"])] = (wall, cpu)
        print(f"| {r['framework']} | {r['backbone']} | {r['params'] / 1e6:.2f} | {wall:.2f} | {cpu:.2f} | "
              f"{r['peak_mib']:.0f} | {r['activations_mib']:.0f} |")
    if ("torch", "resnet101") in medians and ("jittor", "resnet101") in medians:
        (jw, jc), (tw, tc) = medians[("jittor", "resnet101")], medians[("torch", "resnet101")]
        print(f"\njittor / torch (resnet101): wall {jw / tw:.2f}x, CPU {jc / tc:.2f}x (target <= 1.2x)")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} (other jobs on the cores inflate wall times)")


if __name__ == "__main__":
    main()
