"""Published weights that ccnet-jittor can load, by name: ``--checkpoint NAME`` / ``--pretrained NAME``.

Every entry: ``url`` (plus ``mirrors``), ``filename`` in the cache, ``sha256`` (None: no full
hash is published, we do not make one up) and ``sha256_prefix`` (the first 8 hex digits of the
SHA-256 that torch.hub / OpenMMLab file names carry, checked after download), ``layout`` (how
models.WEIGHT_LAYOUTS entry its keys follow), ``kind`` ("segmentor": a full CCNet; "backbone": ImageNet
weights for ``train.py --pretrained``), ``arch`` (the build_model options it was trained with),
and the published accuracy (``miou`` single-scale / multi-scale+flip, ``top1``).

URLs are the ones the projects publish: speedinghzl/CCNet README (Google Drive), mmsegmentation
configs/ccnet/README.md, mmcv's open_mmlab.json (open-mmlab://resnet101_v1c), torchvision's
resnet.py, the CCNet README's link to the MIT CSAIL ImageNet ResNet, and the VAN-Classification
README (Hugging Face, Tsinghua Cloud and Google Drive copies).
"""
import re
from pathlib import Path
from typing import Any, Mapping

from .download import DownloadError, download

MMSEG = "https://download.openmmlab.com/mmsegmentation/v0.5/ccnet"


def _official(drive_id, recurrence, miou, ohem=False):
    return dict(
        url=f"https://drive.google.com/open?id={drive_id}", mirrors=(), sha256=None, sha256_prefix=None,
        layout="ccnet_official", kind="segmentor", dataset="cityscapes",
        arch=dict(backbone="resnet101", num_classes=19, recurrence=recurrence, stem="deep",
                  head_act="leaky_relu", head_channels=512, aux_channels=512, contract_dilation=False),
        miou=(miou, None), source="speedinghzl/CCNet README (Cityscapes val, single scale"
                                  + (", OHEM)" if ohem else ")"))


def _mmseg(config, stamp, depth, dataset, miou):
    name = f"{config}_{stamp}"
    return dict(
        url=f"{MMSEG}/{config}/{name}.pth", mirrors=(), sha256=None, sha256_prefix=stamp.split("-")[-1],
        layout="ccnet_mmseg", kind="segmentor", dataset=dataset,
        arch=dict(backbone=f"resnet{depth}", num_classes=150 if dataset == "ade20k" else 19, recurrence=2,
                  stem="deep", stem_widths=(32, 32, 64), stem_pool_ceil=False, contract_dilation=True,
                  head_act="relu", head_channels=512, aux_channels=256),
        miou=miou, source="mmsegmentation configs/ccnet/README.md")


def _van(size, hf_repo, hf_file, tsinghua, drive_id, top1):
    return dict(
        url=f"https://huggingface.co/Visual-Attention-Network/{hf_repo}/resolve/main/{hf_file}",
        mirrors=(f"https://cloud.tsinghua.edu.cn/f/{tsinghua}/?dl=1",
                 f"https://drive.google.com/file/d/{drive_id}/view?usp=sharing"),
        filename=hf_file, sha256=None, sha256_prefix=None, layout="van_official", kind="backbone",
        dataset="imagenet", arch=dict(backbone=f"van_{size}"), top1=top1,
        source="Visual-Attention-Network/VAN-Classification README")


MODEL_ZOO = {
    # ---- full CCNet models -------------------------------------------------------------
    "ccnet_r101_cityscapes_official": _official("1IxXm8qxKmfDPVRtT8uuDNEvSQsNVTfLC", 2, 79.74),
    "ccnet_r101_cityscapes_official_ohem": _official("1eiX1Xf1o16DvQc3lkFRi4-Dk7IBVspUQ", 2, 80.00, ohem=True),
    "ccnet_r101_cityscapes_official_r1": _official("13j06I4e50T41j_2HQl4sksrLZihax94L", 1, 77.91),
    "ccnet_r50_ade20k_mmseg": _mmseg("ccnet_r50-d8_512x512_80k_ade20k", "20200615_014848-aa37f61e", 50,
                                     "ade20k", (41.78, 42.98)),
    "ccnet_r101_ade20k_mmseg": _mmseg("ccnet_r101-d8_512x512_80k_ade20k", "20200615_014848-1f4929a3", 101,
                                      "ade20k", (43.97, 45.13)),
    "ccnet_r50_ade20k_160k_mmseg": _mmseg("ccnet_r50-d8_512x512_160k_ade20k", "20200616_084435-7c97193b", 50,
                                          "ade20k", (42.08, 43.13)),
    "ccnet_r101_ade20k_160k_mmseg": _mmseg("ccnet_r101-d8_512x512_160k_ade20k", "20200616_000644-e849e007",
                                           101, "ade20k", (43.71, 45.04)),
    "ccnet_r50_cityscapes_mmseg": _mmseg("ccnet_r50-d8_512x1024_80k_cityscapes", "20200617_010421-869a3423",
                                         50, "cityscapes", (79.03, 80.16)),
    "ccnet_r101_cityscapes_mmseg": _mmseg("ccnet_r101-d8_512x1024_80k_cityscapes", "20200617_203935-ffae8917",
                                          101, "cityscapes", (78.87, 79.90)),
    "ccnet_r50_cityscapes_769_mmseg": _mmseg("ccnet_r50-d8_769x769_80k_cityscapes", "20200617_010421-73eed8ca",
                                             50, "cityscapes", (79.29, 81.08)),
    "ccnet_r101_cityscapes_769_mmseg": _mmseg("ccnet_r101-d8_769x769_80k_cityscapes",
                                              "20200618_011502-ad3cd481", 101, "cityscapes", (79.45, 80.66)),
    # ---- ImageNet backbones (train.py --pretrained) -------------------------------------
    "resnet101_mit_csail": dict(
        url="http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet101-imagenet.pth", mirrors=(),
        sha256=None, sha256_prefix=None, layout="resnet_mit_csail", kind="backbone", dataset="imagenet",
        arch=dict(backbone="resnet101", stem="deep"), source="speedinghzl/CCNet README (the official recipe)"),
    "resnet101_v1c": dict(
        url="https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth", mirrors=(),
        sha256=None, sha256_prefix="e67eebb6", layout="resnet_mmseg_v1c", kind="backbone", dataset="imagenet",
        arch=dict(backbone="resnet101", stem="deep", stem_widths=(32, 32, 64), stem_pool_ceil=False,
                  contract_dilation=True),
        source="mmcv open_mmlab.json (open-mmlab://resnet101_v1c)"),
    "resnet50_v1c": dict(
        url="https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth", mirrors=(),
        sha256=None, sha256_prefix="2cccc1ad", layout="resnet_mmseg_v1c", kind="backbone", dataset="imagenet",
        arch=dict(backbone="resnet50", stem="deep", stem_widths=(32, 32, 64), stem_pool_ceil=False,
                  contract_dilation=True),
        source="mmcv open_mmlab.json (open-mmlab://resnet50_v1c)"),
    "resnet101_torchvision": dict(
        url="https://download.pytorch.org/models/resnet101-63fe2227.pth", mirrors=(), sha256=None,
        sha256_prefix="63fe2227", layout="resnet_torchvision", kind="backbone", dataset="imagenet",
        arch=dict(backbone="resnet101", stem="standard"), top1=77.374, source="torchvision ResNet101_Weights.IMAGENET1K_V1"),
    "resnet50_torchvision": dict(
        url="https://download.pytorch.org/models/resnet50-0676ba61.pth", mirrors=(), sha256=None,
        sha256_prefix="0676ba61", layout="resnet_torchvision", kind="backbone", dataset="imagenet",
        arch=dict(backbone="resnet50", stem="standard"), top1=76.13, source="torchvision ResNet50_Weights.IMAGENET1K_V1"),
    "van_b0": _van("b0", "VAN-Tiny-original", "van_tiny_754.pth.tar", "aada2242a16245d6a561",
                   "1KYoIe1Zl3ZaPCwRuvnpkLyOEK04JKemu", 75.4),
    "van_b1": _van("b1", "VAN-Small-original", "van_small_811.pth.tar", "dd3eb73692f74a2499c9",
                   "1LFsJHwxAs1TcXAjJ28G86_jwYwV8DzuG", 81.1),
    "van_b2": _van("b2", "VAN-Base-original", "van_base_828.pth.tar", "58e7acceaf334ecdba89",
                   "1qApsgXCbngNYOji2UzJsfeEsPOu6dBo3", 82.8),
    "van_b3": _van("b3", "VAN-Large-original", "van_large_839.pth.tar", "0201745f6920482490a0",
                   "10n6u-W3IrqiCD-7wkotejV_1XiS9kuWF", 83.9),
}
ALIASES = {"van_base": "van_b2", "resnet101_imagenet": "resnet101_mit_csail"}


def canonical_name(name: str) -> str | None:
    """The zoo name ``name`` stands for (itself or the name of an alias); None when it is neither."""
    canonical = ALIASES.get(name, name)
    return canonical if canonical in MODEL_ZOO else None


def zoo_entry(name: str) -> dict[str, Any]:
    """The zoo entry for ``name`` (or an alias), with its canonical ``name`` and cache ``filename``."""
    canonical = canonical_name(name)
    if canonical is None:
        raise KeyError(f"unknown model zoo name {name!r}; valid names: {', '.join(valid_names())}")
    entry = dict(MODEL_ZOO[canonical], name=canonical)
    entry.setdefault("filename", _cache_name(canonical, entry["url"]))
    return entry


def valid_names() -> list[str]:
    return sorted(MODEL_ZOO) + sorted(f"{a} (= {n})" for a, n in ALIASES.items())


def _cache_name(name, url):
    tail = Path(url.split("?")[0]).name
    return tail if re.search(r"\.(pth|pt|tar|pkl)$", tail) else f"{name}.pth"


def download_entry(entry: Mapping[str, Any], progress: bool = True) -> Path:
    """Download a zoo entry (trying its mirrors in turn); returns the cached path."""
    errors = []
    for url in (entry["url"], *entry.get("mirrors", ())):
        try:
            return download(url, filename=entry["filename"], sha256=entry["sha256"] or entry["sha256_prefix"],
                            progress=progress)
        except DownloadError as err:
            errors.append(f"  {url}: {err}")
    raise DownloadError(f"could not download {entry['name']!r}:\n" + "\n".join(errors) +
                        "\nDownload it by hand and pass the file's path instead.")


def zoo_table() -> str:
    """Markdown table of the zoo (for the README)."""
    rows = ["| name | kind | layout | published | source |", "|---|---|---|---|---|"]
    for name in MODEL_ZOO:
        e = MODEL_ZOO[name]
        if "miou" in e:
            ss, ms = e["miou"]
            score = f"{e['dataset']} val mIoU {ss:.2f}" + (f" / {ms:.2f} (ms+flip)" if ms else "")
        else:
            score = f"ImageNet top-1 {e['top1']}" if e.get("top1") else "ImageNet"
        rows.append(f"| `{name}` | {e['kind']} | {e['layout']} | {score} | [{e['source']}]({e['url']}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(zoo_table())          # python -m utils.model_zoo: the README table
