"""utils.checkpoint / utils.model_zoo: PyTorch files without torch, every layout, bad inputs.

The fixtures in tests/fixtures were written by real PyTorch (make_fixtures.py, both file
formats) from tiny torch.nn re-implementations that share no code with models/; the .npz
beside each holds the torch outputs. A Jittor model built and loaded from the file alone must
reproduce them, which checks key mapping, shapes, the inferred architecture variant (stem,
pooling, head activation, contract dilation, aux width) and the loaded values at once.
"""
import hashlib
import http.server
import os
import pickle
import re
import threading

import numpy as np
import pytest

import jittor as jt

import models
from utils import checkpoint as ck
from utils import model_zoo

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOL = 2e-5


def fixture(name):
    return os.path.join(FIXTURES, name)


def reference(name):
    return np.load(fixture(name.split(".")[0] + ".npz"))


def assert_close(actual, expected, what):
    err = np.abs(np.asarray(actual) - expected).max()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs torch {expected.shape}"
    assert err <= TOL * max(1.0, np.abs(expected).max()), f"{what}: max |jittor - torch| = {err}"


# ------------------------------------------------------------------ reading PyTorch files

@pytest.mark.parametrize("name", ["tensors_zip.pth", "tensors_legacy.pth"])
def test_reader_recovers_every_tensor_kind(name):
    obj = ck.read_checkpoint(fixture(name))
    sd = obj["state_dict"]
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(sd["base"], base)
    np.testing.assert_array_equal(sd["view"], base[1:3, 2:5])          # storage offset + strides
    np.testing.assert_array_equal(sd["transposed"], base.T)
    assert sd["scalar"].shape == () and sd["scalar"] == 3.5
    assert sd["int64"].dtype == np.int64 and sd["int64"].tolist() == [-1, 2**40]
    assert sd["half"].dtype == np.float16 and sd["half"].tolist() == [0.5, -2.0]
    assert sd["bfloat16"].dtype == np.float32 and sd["bfloat16"].tolist() == [1.5, -2.0]
    assert sd["mask"].tolist() == [True, False]
    assert sd["param"].tolist() == [1.0, 1.0] and sd["empty"].shape == (0, 3)
    assert obj["meta"]["classes"] == ("a", "b") and obj["iteration"] == 12
    assert isinstance(obj["meta"]["device"], ck.Placeholder)          # torch.device: never imported


def test_truncated_legacy_file_is_an_error(tmp_path):
    data = open(fixture("resnet_mit_csail.pth"), "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated"):
        ck.read_checkpoint(str(cut))


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickled_code_is_never_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"state_dict": {"w": np.ones(2, np.float32)}, "x": _Exploit(str(target))}))
    obj = ck.read_checkpoint(str(path))
    assert not target.exists() and isinstance(obj["x"], ck.Placeholder) and "mkdir" in repr(obj["x"])
    np.testing.assert_array_equal(obj["state_dict"]["w"], [1, 1])


def test_jittor_save_with_vars_and_corruption(tmp_path):
    path = str(tmp_path / "j.pkl")
    jt.save({"w": jt.array([1.0, 2.0]), "step": 3}, path)
    obj = ck.read_checkpoint(path)
    assert obj["step"] == 3 and obj["w"].tolist() == [1.0, 2.0]
    data = bytearray(open(path, "rb").read())
    data[40] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(ck.CheckpointError, match="checksum mismatch"):
        ck.read_checkpoint(path)


def test_garbage_file_is_an_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ck.CheckpointError, match="neither a PyTorch file"):
        ck.read_checkpoint(str(junk))


# ------------------------------------------------------------------ full models, each layout

@pytest.mark.parametrize("name, layout, implied", [
    ("ccnet_official.pth", "ccnet_official", dict(head_act="leaky_relu", contract_dilation=False,
                                                  stem_pool_ceil=True, aux_channels=6, head_channels=8)),
    ("ccnet_mmseg.pth", "ccnet_mmseg", dict(head_act="relu", contract_dilation=True, stem_pool_ceil=False,
                                            stem_widths=(1, 1, 2), aux_channels=4, head_channels=16)),
])
def test_segmentor_from_file_alone_matches_torch(name, layout, implied):
    model = ck.build_model_from_checkpoint(fixture(name), log=None)
    arch = model.config.to_dict()
    assert ck.Checkpoint(fixture(name)).layout.name == layout
    assert arch["backbone"] == "resnet50" and arch["num_classes"] == 3 and arch["base_channels"] == 2
    assert {k: arch[k] for k in implied} == implied
    ref = reference(name)
    assert_close(model(jt.array(ref["input"])).numpy(), ref["out0"], name)


def test_mmseg_conversion_details():
    prepared = ck.Checkpoint(fixture("ccnet_mmseg.pth"))
    raw = prepared.raw["state_dict"]
    assert raw["decode_head.cca.gamma.scale"].shape == ()
    np.testing.assert_array_equal(prepared.state["head.cca.gamma"], raw["decode_head.cca.gamma.scale"].reshape(1))
    np.testing.assert_array_equal(prepared.state["backbone.conv2.weight"], raw["backbone.stem.3.weight"])
    np.testing.assert_array_equal(prepared.state["dsn.3.weight"], raw["auxiliary_head.conv_seg.weight"])
    assert not prepared.state["dsn.0.bias"].any() and "dsn.0.bias" in prepared.filled


def test_strict_load_reports_every_problem():
    model = models.build_model(**dict(ck.Checkpoint(fixture("ccnet_official.pth")).options, base_channels=4))
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(model, fixture("ccnet_official.pth"), log=None)
    text = str(err.value)
    assert "ccnet_official.pth" in text and "shape mismatches" in text
    assert re.search(r"backbone\.conv1\.weight: checkpoint \[2, 3, 3, 3\] vs model \[4, 3, 3, 3\]", text)

    other = models.build_model("resnet18", 3, stem="deep", base_channels=8, head_channels=8, aux_channels=6)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(other, fixture("ccnet_official.pth"), log=None)
    text = str(err.value)
    assert "unexpected keys" in text and "backbone.layer1.0.conv3.weight" in text   # bottleneck vs basic

    extra = models.build_model(**dict(ck.Checkpoint(fixture("ccnet_official.pth")).options, ccl_dim=4))
    with pytest.raises(ck.CheckpointError, match=r"2 missing keys:\n    ccl_proj.weight\n    ccl_proj.bias"):
        ck.load_checkpoint(extra, fixture("ccnet_official.pth"), log=None)


def test_wrong_variant_is_refused_even_when_shapes_fit():
    arch = dict(ck.Checkpoint(fixture("ccnet_mmseg.pth")).options, head_act="leaky_relu")
    with pytest.raises(ck.CheckpointError, match=r"head_act='relu' \(model has 'leaky_relu'\)"):
        ck.load_checkpoint(models.build_model(**arch), fixture("ccnet_mmseg.pth"), log=None)


def test_non_strict_load_skips_and_reports():
    model = models.build_model(**dict(ck.Checkpoint(fixture("ccnet_official.pth")).options, num_classes=5))
    lines = []
    report = ck.load_checkpoint(model, fixture("ccnet_official.pth"), strict=False, log=lines.append)
    assert sorted(s.split(":")[0] for s in report["shape_mismatches"]) == [
        "dsn.3.bias", "dsn.3.weight", "head.bottleneck.3.bias", "head.bottleneck.3.weight"]
    assert any("not loaded" in line for line in lines)


def test_described_options_build_with_plain_build_model():
    """Every variant is an ordinary build_model option: the options a file describes build the
    model it fits (mmseg's narrow stem and floor-mode pooling included), nothing adapted later."""
    arch = ck.Checkpoint(fixture("ccnet_official.pth")).options
    assert arch["backbone"] == "resnet50" and arch["num_classes"] == 3
    model = models.build_model(**arch)
    assert ck.load_checkpoint(model, fixture("ccnet_official.pth"), log=None)["loaded"] == 307

    arch = ck.Checkpoint(fixture("ccnet_mmseg.pth")).options
    assert arch["stem_widths"] == (1, 1, 2) and arch["stem_pool_ceil"] is False
    model = models.build_model(**arch)
    ck.load_checkpoint(model, fixture("ccnet_mmseg.pth"), log=None)
    model.eval()
    ref = reference("ccnet_mmseg.pth")
    assert_close(model(jt.array(ref["input"])).numpy(), ref["out0"], "mmseg via its described options")

    # the same weights in a model that pools in ceil mode: refused, not adapted
    ceil = models.build_model(**dict(arch, stem_pool_ceil=True))
    with pytest.raises(ck.CheckpointError, match=r"stem_pool_ceil=False \(model has True\)"):
        ck.load_checkpoint(ceil, fixture("ccnet_mmseg.pth"), log=None)


def test_backbone_checkpoint_is_not_a_full_model():
    with pytest.raises(ck.CheckpointError, match="backbone only"):
        ck.build_model_from_checkpoint(fixture("resnet_torchvision.pth"), log=None)


# ------------------------------------------------------------------ ImageNet backbones

@pytest.mark.parametrize("name, layout, dropped", [
    ("resnet_torchvision.pth", "resnet_torchvision", "fc."),
    ("resnet_mit_csail.pth", "resnet_mit_csail", "fc."),
    ("resnet_mmseg_v1c.pth", "resnet_mmseg_v1c", None),
    ("van_official.pth.tar", "van_official", "head."),
])
def test_backbone_weights_match_torch(name, layout, dropped):
    arch = ck.Checkpoint(fixture(name)).options
    # output stride 32: the plain ImageNet network the torch reference computes
    model = models.build_model(**dict(arch, num_classes=3, output_stride=32))
    lines = []
    report = ck.load_backbone_weights(model, fixture(name), log=lines.append)
    assert report["layout"] == layout
    if dropped:
        classifier = sorted(k for k, why in report["dropped"].items() if why == "ImageNet classifier")
        assert classifier == [dropped + "bias", dropped + "weight"]
        assert any("ImageNet classifier" in line for line in lines)
    model.eval()
    ref = reference(name)
    features = model.backbone(jt.array(ref["input"]))
    for i, feature in enumerate(features):
        assert_close(feature.numpy(), ref[f"out{i}"], f"{name} stage {i + 1}")


def test_v1c_weights_need_their_own_stem():
    """V1c weights (stem 32-32-64 scaled down: 1-1-2) do not fit a default deep stem: the error names
    the stem widths they need; a model built with those widths takes them and matches torch."""
    tiny = dict(stem="deep", base_channels=2, output_stride=32, head_channels=8, aux_channels=4)
    with pytest.raises(ck.CheckpointError, match=r"'stem_widths': \(1, 1, 2\)"):
        ck.load_backbone_weights(models.build_model("resnet50", 3, **tiny), fixture("resnet_mmseg_v1c.pth"), log=None)
    model = models.build_model("resnet50", 3, stem_widths=(1, 1, 2), **tiny)
    ck.load_backbone_weights(model, fixture("resnet_mmseg_v1c.pth"), log=None)
    model.eval()
    ref = reference("resnet_mmseg_v1c.pth")
    assert_close(model.backbone(jt.array(ref["input"]))[3].numpy(), ref["out3"], "V1c stem")


def test_backbone_mismatch_names_keys_and_the_right_options():
    model = models.build_model("resnet50", 3, stem="deep", base_channels=2, head_channels=8, aux_channels=4)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_backbone_weights(model, fixture("resnet_torchvision.pth"), log=None)
    text = str(err.value)
    assert "conv2.weight" in text and "'backbone': 'resnet18'" in text and "'stem': 'standard'" in text


def test_segmentor_checkpoint_can_seed_a_backbone():
    model = models.build_model(**dict(ck.Checkpoint(fixture("ccnet_official.pth")).options, num_classes=7))
    report = ck.load_backbone_weights(model, fixture("ccnet_official.pth"), log=None)
    assert report["dropped"]["head.cca.gamma"] == "not part of the backbone"
    raw = ck.read_checkpoint(fixture("ccnet_official.pth"))
    np.testing.assert_array_equal(model.backbone.layer4[2].conv3.weight.numpy(), raw["module.layer4.2.conv3.weight"])


# ------------------------------------------------------------------ our own checkpoints

def test_save_and_rebuild_round_trip(tmp_path):
    model = ck.build_model_from_checkpoint(fixture("ccnet_mmseg.pth"), log=None)
    path = ck.save_checkpoint(tmp_path / "run" / "latest.pkl",
                              {"state_dict": model.state_dict(), "iteration": 5}, config=model.config)
    assert sorted(os.listdir(path.parent)) == ["latest.pkl"]          # no temp file left
    assert ck.read_checkpoint(str(path))["iteration"] == 5
    again = ck.build_model_from_checkpoint(str(path), log=None)
    assert again.config.options["stem_widths"] == (1, 1, 2)
    ref = reference("ccnet_mmseg.pth")
    assert_close(again(jt.array(ref["input"])).numpy(), ref["out0"], "re-loaded jittor checkpoint")


def test_files_of_the_earlier_format_still_load(tmp_path):
    """Earlier versions saved the options as a flat "arch" dict, with stem_widths None for the
    default deep stem: such files rebuild the same model."""
    model = ck.build_model_from_checkpoint(fixture("ccnet_official.pth"), log=None)
    arch = dict(model.config.to_dict(), stem_widths=None, stem_pool_ceil=True)
    path = str(tmp_path / "old.pkl")
    jt.save({"state_dict": {k: v.numpy() for k, v in model.state_dict().items()}, "arch": arch,
             "format": "ccnet-jittor"}, path)
    again = ck.build_model_from_checkpoint(path, log=None)
    assert again.config.options["head_act"] == "leaky_relu" and again.config.num_classes == 3
    ref = reference("ccnet_official.pth")
    assert_close(again(jt.array(ref["input"])).numpy(), ref["out0"], "earlier-format checkpoint")


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "latest.pkl"
    ck.save_checkpoint(path, {"iteration": 1})
    with pytest.raises(Exception):
        ck.save_checkpoint(path, {"iteration": 2, "bad": lambda: None})     # not picklable
    assert ck.read_checkpoint(str(path))["iteration"] == 1
    assert sorted(os.listdir(tmp_path)) == ["latest.pkl"]


# ------------------------------------------------------------------ sources and the zoo

def test_missing_file_and_unknown_name():
    with pytest.raises(ck.UnknownSourceError, match=r"checkpoint file not found: .*nope\.pth"):
        ck.load_checkpoint(None, "/tmp/nope/nope.pth")
    with pytest.raises(ck.UnknownSourceError, match=r"unknown model zoo name 'ccnet_r102'.*ccnet_r101_ade20k_mmseg"):
        ck.build_model_from_checkpoint("ccnet_r102")


def test_zoo_entries_are_consistent():
    for name in model_zoo.MODEL_ZOO:
        entry = model_zoo.zoo_entry(name)
        assert entry["layout"] in models.WEIGHT_LAYOUTS and models.WEIGHT_LAYOUTS[entry["layout"]].kind == entry["kind"], name
        models.resolve_backbone_name(entry["arch"]["backbone"])
        stamp = re.search(r"-([0-9a-f]{8})\.pth$", entry["url"])
        assert entry["sha256_prefix"] == (stamp.group(1) if stamp else None), name
        assert entry["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
    assert model_zoo.zoo_entry("van_base")["name"] == "van_b2"


class _FixtureServer(http.server.BaseHTTPRequestHandler):
    hits = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _FixtureServer.hits.append(self.path)
        data = open(fixture("ccnet_official.pth"), "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_zoo_name_downloads_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("CCNET_HOME", str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FixtureServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        digest = hashlib.sha256(open(fixture("ccnet_official.pth"), "rb").read()).hexdigest()
        entry = dict(model_zoo.MODEL_ZOO["ccnet_r101_cityscapes_official"], url=f"http://127.0.0.1:{httpd.server_address[1]}/x",
                     filename="tiny_official.pth", sha256=digest)
        entry["arch"] = dict(entry["arch"], recurrence=2)
        monkeypatch.setitem(model_zoo.MODEL_ZOO, "tiny_official", entry)
        # recurrence, activation, pooling come from the zoo entry; widths and depth from the weights
        model = ck.build_model_from_checkpoint("tiny_official", log=None)
        assert model.config.backbone == "resnet50" and model.config.options["head_act"] == "leaky_relu"
        assert _FixtureServer.hits == ["/x"]
        ck.read_checkpoint("tiny_official")
        assert _FixtureServer.hits == ["/x"]            # second use: from the cache
        ref = reference("ccnet_official.pth")
        assert_close(model(jt.array(ref["input"])).numpy(), ref["out0"], "zoo download")
    finally:
        httpd.shutdown()
        httpd.server_close()
