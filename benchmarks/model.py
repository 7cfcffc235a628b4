"""CCNet training step (and the parameters) in Jittor against the same network in PyTorch.

    python benchmarks/model.py                                   # CPU: R-101, 150 classes, 1x512x512
    python benchmarks/model.py --rounds 2 --steps 2              # alternate the frameworks twice
    python benchmarks/model.py --jittor-tensor-peak --no-torch   # Jittor's own tensor accounting
    python benchmarks/model.py --device cuda --json out.json     # GPU: ADE20K (512, batch 8) and
                                                                 # Cityscapes (769, batch 4) rows
    python benchmarks/model.py --device cuda --amp               # the same in mixed precision
    python benchmarks/model.py --backbones van_b2 --no-torch --output-stride 16

The step is the one train.py runs: forward, ``SegLoss`` (cross-entropy, ignore 255, + 0.4 x the
auxiliary loss, logits upsampled to the label), the loss read back (train.py stops on NaN), then
the gradients and the SGD update with momentum 0.9 and weight decay 5e-4
(``training.step.sgd_step``). The PyTorch twin (``build_torch_ccnet`` below: same layers, same parameter names, einsum criss-cross
attention) starts from the same weights (copied from the Jittor model), sees the same image and
labels (5% ignored) and runs zero_grad(set_to_none=True), forward, the same loss, ``loss.item()``,
backward and ``torch.optim.SGD`` with the same settings; with ``--amp``, torch.autocast + GradScaler
against Jittor's ``auto_mixed_precision_level = 4`` (what train.py --amp sets).

Each measurement is a fresh process for one framework; with ``--rounds N`` the order alternates
(Jittor first, then PyTorch first, ...). Per process: one untimed warm-up step (kernel compilation,
first-touch allocations), then ``--steps`` timed steps. Reported: median step wall time and
process CPU time (user + system, all threads: stays meaningful when other jobs share the cores),
and peak memory:
* CPU: the peak resident set size (VmHWM) of the process over the timed steps, everything
  included (libraries, model, optimizer state, caches), i.e. what ``top`` shows a user. Linux only.
* CUDA: the peak of the GPU's used memory (NVML, sampled every millisecond by a helper process,
  what nvidia-smi shows) minus what was in use before the process started, for both frameworks;
  PyTorch's own ``max_memory_allocated`` is printed beside it.
``--jittor-tensor-peak`` adds, for Jittor, the peak of the memory held by live variables during
the timed steps (its memory profiler, ``profile_memory_enable``), without what the caching
allocator keeps in reserve; the profiler slows those steps, so their times are
not the step's. (Turning Jittor's caching allocator off instead, ``use_sfrl_allocator=0``, gives
wrong results in Jittor 1.3.11: a fused gather after a log-softmax returns zeros.)

This module also serves as the independent PyTorch reference of tests/test_ccnet.py.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

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
        """Criss-cross attention, the einsum formulation with the column energies at -inf on the diagonal."""

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


def load_torch_state(torch_model, arrays):
    """Load {name: numpy array} into the torch model; every key must match in shape."""
    import torch
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"state dicts differ: missing in jittor {missing}, unknown to torch {unexpected}")


def copy_jittor_to_torch(jt_model, torch_model):
    """Load the Jittor model's state into the torch model; every key must match in shape."""
    load_torch_state(torch_model, {k: v.numpy().copy() for k, v in jt_model.state_dict().items()})


# ----------------------------------------------------------------------------------------------
# One measurement = one fresh worker process (``--worker``)
# ----------------------------------------------------------------------------------------------
# Step configurations: name -> (classes, crop, batch). CPU runs the first by default, CUDA both.
CONFIGS = {"ade20k": (150, 512, 1), "cityscapes": (19, 769, 4)}
CUDA_BATCH = {"ade20k": 8, "cityscapes": 4}
IGNORED_FRACTION = 0.05
SGD = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
AUX_WEIGHT = 0.4


def status_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as clear:      # VmHWM := VmRSS
        clear.write("5")


def _inputs(batch, crop, classes):
    rng = np.random.RandomState(0)
    image = rng.randn(batch, 3, crop, crop).astype(np.float32)
    label = rng.randint(0, classes, (batch, crop, crop)).astype(np.int32)
    label[rng.rand(batch, crop, crop) < IGNORED_FRACTION] = 255
    return image, label


_NVML_SAMPLER = r"""
import ctypes, sys, time, select
class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]
nvml = ctypes.CDLL("libnvidia-ml.so.1")
assert nvml.nvmlInit_v2() == 0, "nvmlInit failed"
handle = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(int(sys.argv[1]), ctypes.byref(handle)) == 0
memory = Memory()
def used():
    nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory))
    return memory.used
base = peak = used()
print(base, flush=True)
while not select.select([sys.stdin], [], [], 0.001)[0]:
    peak = max(peak, used())
print(max(peak, used()) - base, flush=True)
"""


class DeviceMemorySampler:
    """Peak used memory of GPU ``index`` (bytes, over what was used at start), sampled by a helper
    process so that it keeps sampling while the framework holds the GIL."""

    def __init__(self, index=0):
        self.proc = subprocess.Popen([sys.executable, "-c", _NVML_SAMPLER, str(index)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        first = self.proc.stdout.readline()
        if not first.strip():
            raise RuntimeError("NVML memory sampler failed to start (libnvidia-ml.so.1 missing?)")

    def stop(self):
        out, _ = self.proc.communicate("\n")
        return int(out.split()[-1])


def _time_steps(step, steps, after_warmup=None):
    """Untimed warm-up, then ``steps`` timed calls: (walls, cpu seconds, returned values)."""
    values = [step()]
    if after_warmup:
        after_warmup()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        values.append(step())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, values


def measure_jittor(job, sampler):
    from utils import runtime
    jt = runtime.activate(verbose=False)
    if job["device"] == "cuda" and not jt.flags.use_cuda:
        raise SystemExit("jittor worker: --device cuda but Jittor runs on CPU here")
    jt.flags.use_cuda = int(job["device"] == "cuda")
    if job["amp"]:
        jt.flags.auto_mixed_precision_level = 4          # as train.py --amp
    from models import build_model
    from models.losses import SegLoss
    from training.step import sgd_step

    jt.set_global_seed(0)
    model = build_model(job["backbone"], job["classes"], recurrence=2, output_stride=job["output_stride"])
    jt.sync(list(model.state_dict().values()))
    if job["weights"] and not os.path.exists(job["weights"]):
        np.savez(job["weights"], **{k: v.numpy() for k, v in model.state_dict().items()})
    model.train()
    params = [p for p in model.parameters() if not p.is_stop_grad()]
    optimizer = jt.optim.SGD(params, **SGD)
    criterion = SegLoss(job["classes"], aux_weight=AUX_WEIGHT)
    image_np, label = _inputs(job["batch"], job["crop"], job["classes"])
    image = jt.array(image_np)

    def step():
        loss, terms = criterion(model(image), label)
        sgd_step(optimizer, loss)
        return terms["loss"]

    def after_warmup():
        reset_peak_rss()
        jt.flags.profile_memory_enable = int(job["tensor_peak"])

    result = _measure(job, step, sum(int(np.prod(p.shape)) for p in params), sampler, after_warmup)
    if job["tensor_peak"]:
        # the report starts with the bytes of all live variables at the peak, then lists them
        result["jittor_tensor_peak_mib"] = int(jt.get_max_memory_info().split("[!@#div1!@#]")[0]) / 2 ** 20
    return result


def measure_torch(job, sampler):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    if job["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch worker: --device cuda but torch sees no CUDA GPU")
    model = build_torch_ccnet(job["backbone"], job["classes"], 2, output_stride=job["output_stride"])
    load_torch_state(model, dict(np.load(job["weights"])))
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    scaler = torch.cuda.amp.GradScaler() if job["amp"] else None
    image_np, label_np = _inputs(job["batch"], job["crop"], job["classes"])
    image = torch.from_numpy(image_np).to(device)
    label = torch.from_numpy(label_np).long().to(device)

    def loss_of(outputs):
        up = lambda t: F.interpolate(t.float(), size=label.shape[1:], mode="bilinear", align_corners=False)
        main, aux = (F.cross_entropy(up(t), label, ignore_index=255) for t in outputs)
        return main + AUX_WEIGHT * aux

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(job["device"], dtype=torch.float16, enabled=job["amp"]):
            loss = loss_of(model(image))
        value = loss.item()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if job["device"] == "cuda":
            torch.cuda.synchronize()
        return value

    result = _measure(job, step, sum(p.numel() for p in model.parameters()), sampler)
    if job["device"] == "cuda":
        result["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def _measure(job, step, n_params, sampler, after_warmup=reset_peak_rss):
    walls, cpus, losses = _time_steps(step, job["steps"], after_warmup=after_warmup)
    result = dict(framework=job["framework"], config=job["config"], backbone=job["backbone"],
                  device=job["device"], amp=job["amp"], classes=job["classes"], crop=job["crop"],
                  batch=job["batch"], params=n_params, step_s=walls, cpu_s=cpus, losses=losses,
                  peak_rss_mib=status_mib("VmHWM"))
    if sampler:
        result["peak_device_mib"] = sampler.stop() / 2 ** 20
    return result


MEASURE = {"jittor": measure_jittor, "torch": measure_torch}


def _run_worker(job):
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), CCNET_QUIET="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{job['framework']} worker ({job['config']}) failed:\n"
                       f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# ----------------------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------------------
def _median(values):
    return statistics.median(values)


def cuda_unavailable_reason():
    """Why neither framework can run on CUDA here (None when Jittor would use a GPU)."""
    from utils import runtime
    state = runtime.configure()
    return None if state["use_cuda"] else state["device_reason"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both frameworks run")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--backbones", nargs="+", default=["resnet101"], help="registered backbone names")
    parser.add_argument("--classes", type=int, default=None, help="number of classes (one custom config)")
    parser.add_argument("--crop", type=int, default=None, help="square crop side (one custom config)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (one custom config)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up (default 2)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per framework, alternating the order (default 1)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        help="CPU threads for both frameworks (default: OMP_NUM_THREADS or all cores)")
    parser.add_argument("--output-stride", type=int, default=8, choices=(8, 16, 32),
                        help="backbone output stride (default 8, as CCNet)")
    parser.add_argument("--jittor-tensor-peak", action="store_true",
                        help="also Jittor's peak of live-tensor memory (its profiler; slows the timed steps)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("classes", "crop", "batch_size", "steps", "rounds", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.amp and args.device != "cuda":
        parser.error("--amp needs --device cuda (Jittor's mixed precision on CPU falls off oneDNN)")
    if args.device == "cuda" and not args.worker:
        reason = cuda_unavailable_reason()
        if reason:
            raise SystemExit(f"benchmarks/model.py: --device cuda: Jittor cannot use a GPU here ({reason}); "
                             f"not falling back to CPU")
    return args


def step_configs(args):
    """[(name, classes, crop, batch)]: the preset rows of the device, or one custom row."""
    if args.classes or args.crop or args.batch_size:
        classes, crop, batch = CONFIGS["ade20k"]
        return [("custom", args.classes or classes, args.crop or crop, args.batch_size or batch)]
    if args.device == "cuda":
        return [(name, classes, crop, CUDA_BATCH[name]) for name, (classes, crop, _) in CONFIGS.items()]
    return [("ade20k",) + CONFIGS["ade20k"]]


def _torch_available():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def run(args):
    import models
    backbones = [models.resolve_backbone_name(b) for b in args.backbones]
    with_torch = not args.no_torch and _torch_available()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, classes, crop, batch in step_configs(args):
            for backbone in backbones:
                weights = os.path.join(tmp, f"{name}_{backbone}.npz")
                frameworks = ["jittor"] + (["torch"] if with_torch and backbone in TORCH_DEPTHS else [])
                for round_index in range(args.rounds):
                    order = frameworks if round_index % 2 == 0 else frameworks[::-1]
                    if not os.path.exists(weights):
                        order = frameworks       # the Jittor worker writes the shared weights
                    for framework in order:
                        job = dict(framework=framework, config=name, backbone=backbone, classes=classes,
                                   crop=crop, batch=batch, device=args.device, amp=args.amp,
                                   steps=args.steps, threads=args.threads, weights=weights,
                                   output_stride=args.output_stride, tensor_peak=args.jittor_tensor_peak)
                        print(f"  {framework} {backbone} {name} round {round_index + 1}/{args.rounds} ...",
                              file=sys.stderr, flush=True)
                        results.append(_run_worker(job))
    return results


def summarize(results):
    """One row per (config, backbone, framework): medians over all timed steps and processes."""
    rows = {}
    for r in results:
        row = rows.setdefault((r["config"], r["backbone"], r["framework"]), dict(r, step_s=[], cpu_s=[], peaks=[], device_peaks=[], losses=[]))
        row["step_s"] += r["step_s"]
        row["cpu_s"] += r["cpu_s"]
        row["peaks"].append(r["peak_rss_mib"])
        row["losses"].append(r["losses"][0])
        if "peak_device_mib" in r:
            row["device_peaks"].append(r["peak_device_mib"])
    for row in rows.values():
        row["wall"], row["cpu"] = _median(row["step_s"]), _median(row["cpu_s"])
        row["memory"] = _median(row["device_peaks"] or row["peaks"])
        row["images_per_s"] = row["batch"] / row["wall"]
    return rows


def print_tables(args, rows):
    memory = "peak GPU memory (NVML)" if args.device == "cuda" else "peak RSS"
    precision = "mixed precision" if args.amp else "fp32"
    print(f"\nCCNet R=2 training step (forward + SegLoss + backward + SGD), {args.device}, {precision}, "
          f"{args.threads} CPU threads, median of {args.steps} step(s) x {args.rounds} process(es) per framework")
    print(f"| config | framework | backbone | params | step wall | step CPU | images/s | {memory} | first loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (config, backbone, framework), row in rows.items():
        twin = rows.get((config, backbone, "torch"))
        ratio = lambda key: f" ({row[key] / twin[key]:.2f}x)" if twin and framework == "jittor" else ""
        print(f"| {config} {row['classes']} cls, {row['crop']}px, batch {row['batch']} | {framework} | {backbone} | "
              f"{row['params'] / 1e6:.2f} M | {row['wall']:.2f} s{ratio('wall')} | {row['cpu']:.2f} s{ratio('cpu')} | "
              f"{row['images_per_s']:.3g} | {row['memory'] / 1024:.2f} GiB{ratio('memory')} | {row['losses'][0]:.4f} |")
        if "torch_max_allocated_mib" in row:
            print(f"|   | (torch max_memory_allocated: {row['torch_max_allocated_mib'] / 1024:.2f} GiB) | | | | | | | |")
        if "jittor_tensor_peak_mib" in row:
            print(f"|   | (jittor live-tensor peak: {row['jittor_tensor_peak_mib'] / 1024:.2f} GiB; "
                  f"times slowed by the profiler) | | | | | | | |")
    if args.device == "cuda":
        print_recipe_estimate(rows)
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} (other jobs inflate wall times, not CPU times)")


# ADE20K recipe of train.py: 80k iterations of batch 16.
RECIPE_ITERS, RECIPE_BATCH = 80000, 16


def print_recipe_estimate(rows):
    """Wall time of the 80k x 16 ADE20K schedule from the measured images per second."""
    print(f"\nEstimated ADE20K schedule ({RECIPE_ITERS} iterations x {RECIPE_BATCH} images), from the ade20k "
          f"row; N GPUs assume linear scaling: each GPU runs {RECIPE_BATCH}/N images per iteration at the "
          f"measured images/s, gradient all-reduce and data loading not counted")
    for (config, backbone, framework), row in rows.items():
        if config != "ade20k":
            continue
        hours = RECIPE_ITERS * RECIPE_BATCH / row["images_per_s"] / 3600
        print(f"  {framework} {backbone}: 1 GPU {hours:.1f} h, 4 GPUs {hours / 4:.1f} h, 8 GPUs {hours / 8:.1f} h")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        # started before the framework touches the GPU: its baseline excludes this process
        sampler = DeviceMemorySampler() if job["device"] == "cuda" else None
        print(json.dumps(MEASURE[job["framework"]](job, sampler)))
        return
    results = run(args)
    rows = summarize(results)
    print_tables(args, rows)
    if args.json:
        record = dict(argv=sys.argv[1:], load_average=os.getloadavg(), threads=args.threads,
                      device=args.device, amp=args.amp, results=results,
                      summary=[{k: v for k, v in row.items()} for row in rows.values()])
        with open(args.json, "w") as out:
            json.dump(record, out, indent=1)


if __name__ == "__main__":
    main()
