"""test.py's single-scale inference in Jittor against the same pipeline in PyTorch: images per second.

    python benchmarks/inference.py                        # R-101, 150 classes, 512x683 images
    python benchmarks/inference.py --images 5 --rounds 2 --height 512 --width 683

Jittor runs exactly test.py's path on ADE20K: ``utils.evaluation.evaluate`` (whole image, one
scale, ADE20K's keep-ratio resize to (2048, 512), ImageNet normalisation, CCNet in eval mode,
logits upsampled to the image, arg-max, confusion matrix) over an in-memory dataset of random
RGB images and labels. The PyTorch twin (benchmarks/model.py's ``build_torch_ccnet``, the same
weights) runs the same steps: the same normalisation and resize rule, ``torch.no_grad`` forward
(eval mode: logits upsampled to the image), arg-max, the same confusion matrix. A 512x683 image
stays at its size under the (2048, 512) rule, as ADE20K's validation images do.

Each framework runs in a fresh process (the order alternates over ``--rounds``) with the same
thread count: one untimed image first (kernel compilation), then ``--images`` timed images.
Reported: images per second (wall), CPU seconds per image (all threads) and the process's peak
resident memory over the timed images.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model import (TORCH_DEPTHS, build_torch_ccnet, load_torch_state,  # noqa: E402  (benchmarks/model.py)
                   reset_peak_rss, status_mib)

ADE20K_BASE_SIZE = (2048, 512)          # test.py's --base-size default for ADE20K


def random_images(count, height, width, classes, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.randint(0, 256, (height, width, 3)).astype(np.uint8),
             rng.randint(0, classes, (height, width)).astype(np.int64)) for _ in range(count)]


class InMemoryDataset:
    """What ``utils.evaluation.evaluate`` reads from a dataset: samples, load_raw, classes."""
    ignore_index = 255

    def __init__(self, images, num_classes):
        self.images, self.num_classes = images, num_classes
        self.samples = [(f"image_{i}", None) for i in range(len(images))]

    def load_raw(self, index):
        return self.images[index]


def _timed(run_one, count):
    """run_one(i) (-> pixel accuracy of image i) for the warm-up image 0, then images 1..count timed
    together. The accuracies show that both frameworks predicted the same."""
    run_one(0)
    reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    accuracies = [run_one(index) for index in range(1, count + 1)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return dict(images_per_s=count / wall, cpu_s_per_image=cpu / count, peak_rss_mib=status_mib("VmHWM"),
                pixel_accuracy=float(np.mean(accuracies)))


def measure_jittor(job):
    from utils import runtime
    jt = runtime.activate(verbose=False)
    jt.flags.use_cuda = 0
    from models import build_model
    from utils.evaluation import evaluate

    jt.set_global_seed(0)
    model = build_model(job["backbone"], job["classes"], recurrence=2)
    jt.sync(list(model.state_dict().values()))
    np.savez(job["weights"], **{k: v.numpy() for k, v in model.state_dict().items()})
    model.eval()
    dataset = InMemoryDataset(random_images(job["images"] + 1, job["height"], job["width"], job["classes"]),
                              job["classes"])

    def run_one(index):
        return evaluate(model, dataset, progress=False, base_size=ADE20K_BASE_SIZE, indices=[index])["aAcc"]

    return _timed(run_one, job["images"])


def _load_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_torch(job):
    import torch
    import torch.nn.functional as F
    from utils.metrics import ConfusionMatrix     # numpy only
    # the datasets package imports Jittor; its normalisation does not
    normalize = _load_file(os.path.join(ROOT, "datasets", "transforms.py"), "transforms").normalize
    torch.set_num_threads(job["threads"])
    model = build_torch_ccnet(job["backbone"], job["classes"], 2)
    load_torch_state(model, dict(np.load(job["weights"])))
    model.eval()
    images = random_images(job["images"] + 1, job["height"], job["width"], job["classes"])
    long_side, short_side = ADE20K_BASE_SIZE

    def run_one(index):
        rgb, label = images[index]
        x = torch.from_numpy(normalize(rgb)[None])
        height, width = x.shape[2:]
        factor = min(long_side / max(height, width), short_side / min(height, width))
        size = (max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1))
        with torch.no_grad():
            scaled = x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear",
                                                                     align_corners=False)
            scores = model(scaled)
            if tuple(scores.shape[2:]) != (height, width):
                scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False)
            pred = scores.argmax(dim=1)[0].numpy().astype(np.int64)
        matrix = ConfusionMatrix(job["classes"], ignore_index=255)
        matrix.update(pred, label)
        return matrix.summary()["aAcc"]

    return _timed(run_one, job["images"])


MEASURE = {"jittor": measure_jittor, "torch": measure_torch}


def _run_worker(job):
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), CCNET_QUIET="1")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                          env=env, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line), framework=job["framework"])
    raise RuntimeError(f"{job['framework']} worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet101", choices=sorted(TORCH_DEPTHS),
                        help="ResNet backbone (the PyTorch twin exists for these)")
    parser.add_argument("--classes", type=int, default=150, help="number of classes (default 150, ADE20K)")
    parser.add_argument("--height", type=int, default=512, help="image height (default 512)")
    parser.add_argument("--width", type=int, default=683, help="image width (default 683)")
    parser.add_argument("--images", type=int, default=3, help="timed images after one warm-up (default 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per framework, alternating the order (default 1)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                        help="CPU threads for both frameworks (default: OMP_NUM_THREADS or all cores)")
    parser.add_argument("--json", metavar="FILE", help="also write the measurements to FILE")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("classes", "height", "width", "images", "rounds", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(MEASURE[job["framework"]](job)))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.npz")
        for round_index in range(args.rounds):
            # the Jittor worker writes the shared weights, so it runs first in the first round
            order = ("jittor", "torch") if round_index % 2 == 0 else ("torch", "jittor")
            for framework in order:
                print(f"  {framework} round {round_index + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
                job = dict(framework=framework, backbone=args.backbone, classes=args.classes, height=args.height,
                           width=args.width, images=args.images, threads=args.threads, weights=weights)
                results.append(_run_worker(job))
    rows = {}
    for framework in ("jittor", "torch"):
        mine = [r for r in results if r["framework"] == framework]
        rows[framework] = {key: statistics.median(r[key] for r in mine)
                           for key in ("images_per_s", "cpu_s_per_image", "peak_rss_mib", "pixel_accuracy")}
    print(f"\ntest.py single-scale inference, CCNet-{args.backbone} R=2, {args.classes} classes, "
          f"{args.height}x{args.width} images, CPU, {args.threads} threads, {args.images} image(s) x "
          f"{args.rounds} process(es) per framework (median over processes)")
    print("| framework | images/s | CPU s per image | peak RSS | pixel accuracy (same predictions?) |")
    print("|---|---|---|---|---|")
    for framework, row in rows.items():
        ratio = (f" ({row['images_per_s'] / rows['torch']['images_per_s']:.2f}x)" if framework == "jittor" else "")
        print(f"| {framework} | {row['images_per_s']:.3f}{ratio} | {row['cpu_s_per_image']:.2f} | "
              f"{row['peak_rss_mib'] / 1024:.2f} GiB | {row['pixel_accuracy']:.5f} |")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} (other jobs inflate wall times)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(argv=sys.argv[1:], load_average=os.getloadavg(), results=results, summary=rows), out,
                      indent=1)


if __name__ == "__main__":
    main()
