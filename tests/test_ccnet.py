"""CCNet segmentor: outputs in both modes, RCCA recurrence with one shared module, official names,
build_model routing and errors, gradients, and agreement with an independent torch.nn build."""
import numpy as np
import pytest

import jittor as jt
from jittor import nn

from models import build_model
from scripts import load_script
from models.cc_attention import CrissCrossAttention
from models.ccnet import CCNet, BatchNormAct
from models.losses import SegLoss

TINY = dict(base_channels=8, head_channels=16, aux_channels=16)   # resnet18: C3 = 32, C4 = 64


def tiny(backbone="resnet18", num_classes=5, recurrence=2, **opts):
    jt.set_global_seed(0)
    return build_model(backbone, num_classes, recurrence=recurrence, **{**TINY, **opts})


def set_gamma(cca, value):
    cca.gamma.update(jt.array([value]))
    cca.gamma.sync()     # Jittor 1.3.11 bug: a fresh 1-element Var broadcast in a fused op fails to compile


def load_benchmark_module():
    return load_script("benchmarks/model.py")


def test_training_and_eval_outputs_at_odd_size():
    model = tiny(ccl_dim=16)
    x = jt.randn(2, 3, 97, 129)
    main, aux, ccl = model(x)
    assert list(main.shape) == [2, 5, 13, 17] and list(aux.shape) == [2, 5, 13, 17]
    assert list(ccl.shape) == [2, 16, 13, 17]
    assert model.num_classes == 5
    model.eval()
    out = model(x)
    assert isinstance(out, jt.Var) and list(out.shape) == [2, 5, 97, 129]
    assert np.isfinite(out.numpy()).all()


def test_eval_output_is_main_logits_upsampled():
    model = tiny(recurrence=1)
    model.eval()
    x = jt.randn(1, 3, 65, 81)
    feats = model.backbone(x)
    expected = nn.interpolate(model.head(feats[3]), size=(65, 81), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(model(x).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recurrence", [0, 1, 2, 3])
def test_recurrence_applies_one_shared_module(recurrence):
    model = tiny(recurrence=recurrence)
    modules = [m for m in model.modules() if isinstance(m, CrissCrossAttention)]
    assert len(modules) == (0 if recurrence == 0 else 1)
    cca_keys = [k for k in model.state_dict() if k.startswith("head.cca.")]
    assert len(cca_keys) == (0 if recurrence == 0 else 7)
    if recurrence == 0:
        return
    cca = model.head.cca
    set_gamma(cca, 0.8)
    calls = []
    original = cca.execute

    def counting(x):
        calls.append(id(cca))
        return original(x)

    cca.execute = counting
    model.eval()
    x = jt.randn(1, 3, 65, 81)
    out = model.head(model.backbone(x)[3])
    assert len(calls) == recurrence
    # The same result by hand: conva, then the one module R times, convb, concat, bottleneck.
    feat = model.backbone(x)[3]
    context = model.head.conva(feat)
    for _ in range(recurrence):
        context = original(context)
    manual = model.head.bottleneck(jt.concat([feat, model.head.convb(context)], dim=1))
    np.testing.assert_allclose(out.numpy(), manual.numpy(), rtol=1e-5, atol=1e-5)


def test_recurrence_changes_the_output_once_attention_is_on():
    x = jt.randn(1, 3, 65, 81)
    outs = []
    for r in (1, 2):
        model = tiny(recurrence=r)
        set_gamma(model.head.cca, 0.8)
        model.eval()
        outs.append(model(x).numpy())
    assert np.abs(outs[0] - outs[1]).max() > 1e-4


def test_head_and_aux_names_match_the_official_layout():
    keys = [k for k in tiny().state_dict() if k.startswith(("head.", "dsn."))]
    bn = ("weight", "bias", "running_mean", "running_var")
    expected = (["head.conva.0.weight"] + [f"head.conva.1.{s}" for s in bn]
                + [f"head.cca.{c}_conv.{s}" for c in ("query", "key", "value") for s in ("weight", "bias")]
                + ["head.cca.gamma", "head.convb.0.weight"] + [f"head.convb.1.{s}" for s in bn]
                + ["head.bottleneck.0.weight"] + [f"head.bottleneck.1.{s}" for s in bn]
                + ["head.bottleneck.3.weight", "head.bottleneck.3.bias", "dsn.0.weight", "dsn.0.bias"]
                + [f"dsn.1.{s}" for s in bn] + ["dsn.3.weight", "dsn.3.bias"])
    assert sorted(keys) == sorted(expected)


def test_channel_counts_follow_the_backbone():
    model = tiny()
    sd = model.state_dict()
    assert list(sd["head.conva.0.weight"].shape) == [16, 64, 3, 3]          # C4 / 4 = 16
    assert list(sd["head.cca.query_conv.weight"].shape) == [2, 16, 1, 1]     # 16 / 8
    assert list(sd["head.bottleneck.0.weight"].shape) == [16, 64 + 16, 3, 3]
    assert list(sd["dsn.0.weight"].shape) == [16, 32, 3, 3]
    real = build_model("resnet101", 150)
    sd = real.state_dict()
    assert list(sd["head.conva.0.weight"].shape) == [512, 2048, 3, 3]
    assert list(sd["head.bottleneck.0.weight"].shape) == [512, 2560, 3, 3]
    assert list(sd["head.bottleneck.3.weight"].shape) == [150, 512, 1, 1]
    assert list(sd["dsn.0.weight"].shape) == [512, 1024, 3, 3]


class ToyBackbone(nn.Module):
    """Any module with out_channels and four features plugs into CCNet."""

    def __init__(self):
        super().__init__()
        self.out_channels = [4, 6, 8, 32]
        self.out_strides = [4, 8, 8, 8]
        self.convs = nn.ModuleList([nn.Conv2d(3, c, 1) for c in self.out_channels])

    def execute(self, x):
        small = nn.pool(x, 8, "mean", stride=8)
        return [conv(small) for conv in self.convs]


def test_other_backbones_plug_in():
    model = CCNet(ToyBackbone(), 3, recurrence=1, head_channels=8, aux_channels=8)
    main, aux = model(jt.randn(2, 3, 64, 48))
    assert list(main.shape) == [2, 3, 8, 6] and list(aux.shape) == [2, 3, 8, 6]
    assert list(model.head.cca.value_conv.weight.shape) == [8, 8, 1, 1]       # 32 / 4


def test_head_activations():
    x = jt.array(np.array([-2.0, 3.0], np.float32).reshape(1, 2, 1, 1))
    leaky, relu = BatchNormAct(2, "leaky_relu"), BatchNormAct(2, "relu")
    leaky.eval(), relu.eval()                         # running stats 0 / 1: BN is ~identity
    np.testing.assert_allclose(leaky(x).numpy().ravel(), np.array([-0.02, 3.0]) / np.sqrt(1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(relu(x).numpy().ravel(), np.array([0.0, 3.0]) / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(ValueError, match="gelu"):
        BatchNormAct(2, "gelu")
    assert tiny(head_act="relu").head.conva[1].activation == "relu"


def test_build_model_routes_options_and_reports_errors():
    model = tiny(output_stride=16, dropout=0.0)
    main, _ = model(jt.randn(1, 3, 97, 129))
    assert list(main.shape) == [1, 5, 7, 9]
    assert model.head.bottleneck[2].p == 0.0 and model.dsn[2].p == 0.0
    with pytest.raises(ValueError, match="resnet101.*van_b2|valid backbones"):
        build_model("resnet1O1", 5)
    with pytest.raises(TypeError, match="bogus_option"):
        build_model("resnet18", 5, bogus_option=1, **TINY)
    with pytest.raises(ValueError, match="recurrence"):
        build_model("resnet18", 5, recurrence=-1, **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", 0, **TINY)
    assert float(tiny().head.cca.gamma.numpy()[0]) == 0.0                     # official start
    assert float(tiny(cca_gamma_init=1.0).head.cca.gamma.numpy()[0]) == 1.0
    with pytest.raises(ValueError, match="cca_gamma_init must be a number, got 'one'"):
        build_model("resnet18", 5, cca_gamma_init="one", **TINY)


def test_build_model_records_its_config():
    import models
    model = build_model("resnet18", 5, recurrence=1, stem_widths=(4, 4, 8), head_act="relu", **TINY)
    config = model.config
    assert config == models.ModelConfig("resnet18", 5, 1, dict(stem_widths=(4, 4, 8), head_act="relu", **TINY))
    assert config.to_dict() == dict(backbone="resnet18", num_classes=5, recurrence=1, stem_widths=(4, 4, 8),
                                    head_act="relu", **TINY)
    again = build_model(**config.to_dict())
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert models.ModelConfig.from_dict(config.to_dict()) == config
    effective = config.effective_options()
    assert effective["head_act"] == "relu" and effective["contract_dilation"] is False and effective["dropout"] == 0.1
    assert config.replace(recurrence=2, head_act=None).options.get("head_act") is None
    on_van = config.with_backbone("van_b0")
    assert on_van.backbone == "van_b0" and on_van.options == {k: v for k, v in TINY.items()
                                                              if k in models.HEAD_OPTIONS} | {"head_act": "relu"}
    assert build_model("van_base", 2).config.backbone == "van_b2"          # the canonical name
    with pytest.raises(ValueError, match="needs num_classes"):
        models.ModelConfig.from_dict({"backbone": "resnet18"})


def test_gradients_reach_every_parameter_including_the_stem():
    model = tiny(dropout=0.0)
    set_gamma(model.head.cca, 0.5)      # else query/key get exactly zero gradient
    label = np.random.RandomState(0).randint(0, 5, (2, 65, 81))
    loss, terms = SegLoss(5)(model(jt.randn(2, 3, 65, 81)), label)
    named = [(k, p) for k, p in model.named_parameters() if not p.is_stop_grad()]
    grads = jt.grad(loss, [p for _, p in named])
    for (name, _), grad in zip(named, grads):
        g = grad.numpy()
        assert np.isfinite(g).all(), name
        assert np.abs(g).max() > 0, name
    assert terms["loss"] == pytest.approx(terms["main"] + 0.4 * terms["aux"], rel=1e-5)


@pytest.mark.parametrize("backbone,opts", [
    ("resnet50", dict(recurrence=2)),
    ("resnet18", dict(recurrence=1, stem="standard", output_stride=16, head_act="relu")),
])
def test_agrees_with_an_independent_torch_build(backbone, opts):
    torch = pytest.importorskip("torch")
    bench = load_benchmark_module()
    model = tiny(backbone, dropout=0.0, **opts)
    set_gamma(model.head.cca, 0.7)
    reference = bench.build_torch_ccnet(backbone, 5, dropout=0.0, **{**TINY, **opts})
    bench.copy_jittor_to_torch(model, reference)
    x = np.random.RandomState(1).randn(2, 3, 65, 81).astype(np.float32)
    # Training mode: batch statistics in every BN (Jittor computes the variance as E[x^2] - E[x]^2,
    # torch in two passes: a few 1e-4 apart after 50 layers).
    ours = model(jt.array(x))
    theirs = reference(torch.from_numpy(x))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.detach().numpy(), atol=3e-3, rtol=1e-3)
    model.eval()
    reference.eval()
    np.testing.assert_allclose(model(jt.array(x)).numpy(), reference(torch.from_numpy(x)).detach().numpy(),
                               atol=5e-5, rtol=1e-4)
