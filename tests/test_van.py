"""VAN backbone (models/van.py): sizes, official checkpoint layout, output stride, numerics.

The official layout below is written out by hand from the VAN-Classification code (not read
from our module), so a renamed or reshaped parameter in models/van.py fails here.
"""
import numpy as np
import pytest

import jittor as jt

import models
from models import van
from utils.checkpoint import load_backbone_weights


def load_official(model, source):
    """Official VAN weights into a VAN / VANClassifier; returns the ignored keys."""
    return list(load_backbone_weights(model, source, log=None)["dropped"])

PUBLISHED_PARAMS_M = {"van_b0": 4.1, "van_b1": 13.9, "van_b2": 26.6, "van_b3": 44.8}
SIZES = {  # embed dims / depths of the official configs (VAN-Classification)
    "van_b0": ((32, 64, 160, 256), (3, 3, 5, 2)),
    "van_b1": ((64, 128, 320, 512), (2, 2, 4, 2)),
    "van_b2": ((64, 128, 320, 512), (3, 3, 12, 3)),
    "van_b3": ((64, 128, 320, 512), (3, 5, 27, 3)),
}
MLP_RATIOS = (8, 8, 4, 4)
TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 2, 2, 1), mlp_ratios=(2, 2, 2, 2))


# --------------------------------------------------------------------------- official layout
def official_layout(embed_dims, depths, mlp_ratios=MLP_RATIOS, num_classes=1000, in_chans=3):
    """key -> shape of an official VAN checkpoint's state_dict (PyTorch, with BN counters)."""
    shapes = {}

    def conv(prefix, out_ch, in_per_group, k):
        shapes[prefix + ".weight"] = (out_ch, in_per_group, k, k)
        shapes[prefix + ".bias"] = (out_ch,)

    def batchnorm(prefix, ch):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (ch,)
        shapes[prefix + ".num_batches_tracked"] = ()

    for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios), start=1):
        conv(f"patch_embed{i}.proj", dim, in_chans if i == 1 else embed_dims[i - 2], 7 if i == 1 else 3)
        batchnorm(f"patch_embed{i}.norm", dim)
        for j in range(depth):
            block = f"block{i}.{j}"
            shapes[block + ".layer_scale_1"] = (dim,)
            shapes[block + ".layer_scale_2"] = (dim,)
            batchnorm(block + ".norm1", dim)
            conv(block + ".attn.proj_1", dim, dim, 1)
            conv(block + ".attn.spatial_gating_unit.conv0", dim, 1, 5)
            conv(block + ".attn.spatial_gating_unit.conv_spatial", dim, 1, 7)
            conv(block + ".attn.spatial_gating_unit.conv1", dim, dim, 1)
            conv(block + ".attn.proj_2", dim, dim, 1)
            batchnorm(block + ".norm2", dim)
            conv(block + ".mlp.fc1", dim * ratio, dim, 1)
            conv(block + ".mlp.dwconv.dwconv", dim * ratio, 1, 3)
            conv(block + ".mlp.fc2", dim, dim * ratio, 1)
        shapes[f"norm{i}.weight"] = (dim,)
        shapes[f"norm{i}.bias"] = (dim,)
    shapes["head.weight"] = (num_classes, embed_dims[-1])
    shapes["head.bias"] = (num_classes,)
    return shapes


def random_official_weights(layout, seed=0):
    """Values for every key with non-trivial BN statistics and layer scales, activations O(1)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            weights[key] = np.array(7, dtype=np.int64)
        elif key.endswith("running_var"):
            weights[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith("weight") and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            weights[key] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif "layer_scale" in key or (key.endswith(".weight") and len(shape) == 1):
            weights[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # biases, running means
            weights[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return weights


def own_shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def trainable_params(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- sizes and registry
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name):
    model = models.BACKBONES[name](num_classes=1000)
    count_m = trainable_params(model) / 1e6
    assert abs(count_m - PUBLISHED_PARAMS_M[name]) <= 0.01 * PUBLISHED_PARAMS_M[name], count_m
    assert model.out_channels == list(SIZES[name][0])


@pytest.mark.parametrize("name", sorted(SIZES))
def test_keys_and_shapes_equal_official_layout(name):
    dims, depths = SIZES[name]
    official = official_layout(dims, depths)
    official = {k: s for k, s in official.items() if not k.endswith("num_batches_tracked")}
    assert own_shapes(models.BACKBONES[name](num_classes=1000)) == official
    backbone_official = {k: s for k, s in official.items() if not k.startswith("head.")}
    for output_stride in (32, 16, 8):  # the stride option must not touch names or shapes
        assert own_shapes(models.BACKBONES[name](output_stride=output_stride)) == backbone_official


def test_registry_names_and_alias():
    for name in SIZES:
        assert models.resolve_backbone_name(name) == name
    assert models.resolve_backbone_name("van_base") == "van_b2"
    with pytest.raises(ValueError, match="van_b3"):
        models.resolve_backbone_name("van_b4")


def test_bad_options_are_rejected_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"output_stride must be one of \[8, 16, 32\], got 4"):
        van.van_b0(output_stride=4)
    with pytest.raises(TypeError, match="unknown option.*dilation.*output_stride"):
        models.build_model("van_b0", num_classes=3, dilation=2)
    with pytest.raises(ValueError, match="4 stages"):
        van.van_b0(depths=(1, 1, 1))
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\], got shape \[2, 1, 32, 32\]"):
        van.van_b0(**TINY)(jt.zeros((2, 1, 32, 32)))


# --------------------------------------------------------------------------- depthwise kernel
@pytest.mark.parametrize("kernel,padding,dilation,shape,dtype", [
    (7, 9, 3, (2, 5, 13, 11), "float32"),   # LKA conv_spatial
    (5, 2, 1, (1, 3, 8, 9), "float32"),     # LKA conv0
    (3, 2, 2, (2, 4, 6, 7), "float64"),     # MLP dwconv in a stride-8 stage
    (7, 18, 6, (1, 2, 5, 5), "float64"),    # kernel reaching past the map on every side
    (3, 0, 1, (1, 2, 6, 4), "float32"),     # 'valid' convolution: output smaller than input
])
def test_depthwise_kernel_matches_jittor_grouped_conv(kernel, padding, dilation, shape, dtype):
    """The OpenMP depthwise kernels against jittor's generic grouped convolution: outputs and the
    gradients of input, weight and bias."""
    rng = np.random.default_rng(0)
    conv = van.DepthwiseConv2d(shape[1], kernel, padding, dilation)
    # jt.array turns float64 arrays into float32 and assign() keeps a Var's dtype: cast explicitly
    array = lambda *s: jt.array(rng.standard_normal(s).astype(np.float32)).astype(dtype)   # noqa: E731
    conv.weight, conv.bias = array(*conv.weight.shape), array(*conv.bias.shape)
    x = array(*shape)
    out, ref = conv(x), jt.nn.Conv2d.execute(conv, x)
    assert out.shape == ref.shape and str(out.dtype) == dtype
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=tol, atol=tol)
    projection = array(*out.shape)
    wrt = [x, conv.weight, conv.bias]
    for name, g, r in zip(("x", "weight", "bias"), jt.grad((out * projection).sum(), wrt),
                          jt.grad((ref * projection).sum(), wrt)):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=tol, atol=tol * 10, err_msg=name)


# --------------------------------------------------------------------------- output stride
@pytest.mark.parametrize("output_stride,strides", [(32, [4, 8, 16, 32]), (16, [4, 8, 16, 16]),
                                                    (8, [4, 8, 8, 8])])
def test_stage_shapes_and_strides(output_stride, strides):
    model = van.van_b0(output_stride=output_stride, **TINY)
    assert model.out_strides == strides
    model.eval()
    features = model(jt.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 96 // s)
                                                 for c, s in zip(TINY["embed_dims"], strides)]
    assert all(np.isfinite(f.numpy()).all() for f in features)


@pytest.mark.parametrize("output_stride,embed,block", [
    (32, [(4, 1), (2, 1), (2, 1), (2, 1)], [1, 1, 1, 1]),
    (16, [(4, 1), (2, 1), (2, 1), (1, 1)], [1, 1, 1, 2]),
    (8, [(4, 1), (2, 1), (1, 1), (1, 2)], [1, 1, 2, 4]),
])
def test_lka_dilations_and_paddings(output_stride, embed, block):
    model = van.van_b0(output_stride=output_stride, **TINY)
    for i in range(4):
        proj = getattr(model, f"patch_embed{i + 1}").proj
        stride, dilation = embed[i]
        k = 7 if i == 0 else 3
        assert (proj.kernel_size, proj.stride, proj.dilation) == ((k, k), (stride, stride), (dilation, dilation))
        assert proj.padding == (dilation * (k // 2),) * 2
        d = block[i]
        for blk in getattr(model, f"block{i + 1}"):
            lka = blk.attn.spatial_gating_unit
            # official at d = 1: 5x5 pad 2; 7x7 dilation 3 pad 9; 3x3 pad 1
            assert (lka.conv0.kernel_size, lka.conv0.dilation, lka.conv0.padding) == ((5, 5), (d, d), (2 * d,) * 2)
            assert (lka.conv_spatial.kernel_size, lka.conv_spatial.dilation,
                    lka.conv_spatial.padding) == ((7, 7), (3 * d,) * 2, (9 * d,) * 2)
            assert lka.conv0.groups == lka.conv_spatial.groups == TINY["embed_dims"][i]
            assert lka.conv1.kernel_size == (1, 1)
            dw = blk.mlp.dwconv.dwconv
            assert (dw.kernel_size, dw.dilation, dw.padding) == ((3, 3), (d, d), (d, d))


def test_dilated_variants_sample_the_same_features_densely():
    """With the same weights, the stride-8/16 features subsampled at the stride-32 grid equal the
    stride-32 features exactly: the dilation makes every filter see the pixels it was trained on."""
    weights = {"state_dict": random_official_weights(official_layout(**TINY), seed=1)}
    x = jt.randn(1, 3, 64, 96)
    outputs = {}
    for output_stride in (32, 16, 8):
        model = van.van_b0(output_stride=output_stride, **TINY)
        load_official(model, weights)
        model.eval()
        outputs[output_stride] = [f.numpy() for f in model(x)]
    ref = outputs[32]
    for output_stride, feats in ((16, outputs[16]), (8, outputs[8])):
        for stage, (f, r, s) in enumerate(zip(feats, ref, [4, 8, 16, 32])):
            step = s // (64 // f.shape[2])   # stride-32 stride / own stride
            np.testing.assert_allclose(f[:, :, ::step, ::step], r, rtol=1e-4, atol=1e-4,
                                       err_msg=f"os={output_stride} stage {stage + 1}")
    assert outputs[8][3].shape[2:] == (8, 12) and ref[3].shape[2:] == (2, 3)


# --------------------------------------------------------------------------- checkpoints
def test_official_state_dict_loads_key_for_key():
    layout = official_layout(**TINY)
    weights = random_official_weights(layout)
    classifier = van.VANClassifier(**TINY, num_classes=1000)
    ignored = load_official(classifier, {"state_dict": weights})
    assert sorted(ignored) == sorted(k for k in layout if k.endswith("num_batches_tracked"))
    state = classifier.state_dict()
    assert set(state) == {k for k in layout if not k.endswith("num_batches_tracked")}
    for key, value in state.items():
        np.testing.assert_array_equal(value.numpy(), weights[key], err_msg=key)

    backbone = van.van_b0(output_stride=8, **TINY)   # segmentation backbone: head.* is unused
    ignored = load_official(backbone, {"state_dict": weights})
    assert {"head.weight", "head.bias"} <= set(ignored)
    np.testing.assert_array_equal(backbone.block3[1].attn.spatial_gating_unit.conv_spatial.weight.numpy(),
                                  weights["block3.1.attn.spatial_gating_unit.conv_spatial.weight"])


def test_checkpoint_problems_name_the_keys():
    weights = random_official_weights(official_layout(**TINY))
    model = van.van_b0(**TINY)
    broken = dict(weights)
    del broken["block2.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"1 missing keys:\s+block2.1.mlp.fc2.bias"):
        load_official(model, {"state_dict": broken})
    broken = dict(weights, **{"block1.0.attn.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys:\s+block1.0.attn.extra.weight"):
        load_official(model, {"state_dict": broken})
    broken = dict(weights, **{"norm4.weight": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"norm4.weight: checkpoint \[5\] vs model \[32\]"):
        load_official(model, broken)
    with pytest.raises(ValueError, match="missing keys"):   # b0 weights into a b2 model
        load_official(van.van_b2(), weights)


def test_official_checkpoint_file_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    weights = random_official_weights(official_layout(**TINY))
    path = str(tmp_path / "van_tiny.pth.tar")
    torch.save({"epoch": 300, "state_dict": {"module." + k: torch.from_numpy(v) for k, v in weights.items()}},
               path)
    model = van.VANClassifier(**TINY)
    load_official(model, path)
    np.testing.assert_array_equal(model.head.weight.numpy(), weights["head.weight"])


# --------------------------------------------------------------------------- numerics vs PyTorch
def _torch_reference_van(torch, embed_dims, depths, mlp_ratios, num_classes):
    """The official VAN architecture written in plain PyTorch (stride 32, no drop path)."""
    tnn = torch.nn

    class LKA(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.conv0 = tnn.Conv2d(dim, dim, 5, padding=2, groups=dim)
            self.conv_spatial = tnn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
            self.conv1 = tnn.Conv2d(dim, dim, 1)

        def forward(self, x):
            return x * self.conv1(self.conv_spatial(self.conv0(x)))

    class Attention(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj_1, self.activation = tnn.Conv2d(dim, dim, 1), tnn.GELU()
            self.spatial_gating_unit, self.proj_2 = LKA(dim), tnn.Conv2d(dim, dim, 1)

        def forward(self, x):
            return self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x)))) + x

    class DW(tnn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dwconv = tnn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

        def forward(self, x):
            return self.dwconv(x)

    class Mlp(tnn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.dwconv, self.fc2 = tnn.Conv2d(dim, hidden, 1), DW(hidden), tnn.Conv2d(hidden, dim, 1)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.dwconv(self.fc1(x))))

    class Block(tnn.Module):
        def __init__(self, dim, ratio):
            super().__init__()
            self.norm1, self.attn = tnn.BatchNorm2d(dim), Attention(dim)
            self.norm2, self.mlp = tnn.BatchNorm2d(dim), Mlp(dim, dim * ratio)
            self.layer_scale_1 = tnn.Parameter(1e-2 * torch.ones(dim))
            self.layer_scale_2 = tnn.Parameter(1e-2 * torch.ones(dim))

        def forward(self, x):
            x = x + self.layer_scale_1[:, None, None] * self.attn(self.norm1(x))
            return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))

    class Embed(tnn.Module):
        def __init__(self, cin, dim, k, s):
            super().__init__()
            self.proj, self.norm = tnn.Conv2d(cin, dim, k, s, k // 2), tnn.BatchNorm2d(dim)

        def forward(self, x):
            return self.norm(self.proj(x))

    class VAN(tnn.Module):
        def __init__(self):
            super().__init__()
            for i in range(4):
                setattr(self, f"patch_embed{i + 1}", Embed(3 if i == 0 else embed_dims[i - 1], embed_dims[i],
                                                          7 if i == 0 else 3, 4 if i == 0 else 2))
                setattr(self, f"block{i + 1}",
                        tnn.ModuleList([Block(embed_dims[i], mlp_ratios[i]) for _ in range(depths[i])]))
                setattr(self, f"norm{i + 1}", tnn.LayerNorm(embed_dims[i], eps=1e-6))
            self.head = tnn.Linear(embed_dims[3], num_classes)

        def forward(self, x):
            features = []
            for i in range(1, 5):
                x = getattr(self, f"patch_embed{i}")(x)
                for blk in getattr(self, f"block{i}"):
                    x = blk(x)
                x = getattr(self, f"norm{i}")(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                features.append(x)
            return features, self.head(x.mean(dim=(2, 3)))

    return VAN()


@pytest.mark.parametrize("training", [False, True])
def test_matches_pytorch_reference(training):
    """Weights exported from a PyTorch model in the official layout give the same features and
    logits; in training mode BatchNorm uses batch statistics on both sides."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = _torch_reference_van(torch, num_classes=10, **TINY)
    weights = random_official_weights(official_layout(**TINY, num_classes=10), seed=3)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    reference.train(training)
    model = van.VANClassifier(num_classes=10, drop_path_rate=0.0, **TINY)
    load_official(model, {"state_dict": reference.state_dict()})
    model.train() if training else model.eval()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref_features, ref_logits = reference(torch.from_numpy(x))
    logits = model(jt.array(x))
    features = van.VAN.execute(model, jt.array(x))
    np.testing.assert_allclose(logits.numpy(), ref_logits.detach().numpy(), rtol=1e-4, atol=1e-4)
    for stage, (f, r) in enumerate(zip(features, ref_features)):
        np.testing.assert_allclose(f.numpy(), r.detach().numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=f"stage {stage + 1}")
    if not training:
        return
    # backward: gradients of a random projection of the logits w.r.t. every parameter
    projection = rng.standard_normal(logits.shape).astype(np.float32)
    (ref_logits * torch.from_numpy(projection)).sum().backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = jt.grad((logits * jt.array(projection)).sum(), [dict(model.named_parameters())[n] for n in names])
    ref_params = dict(reference.named_parameters())
    assert set(names) == set(ref_params)
    # the conv biases right before a training-mode BatchNorm have zero gradient, so the absolute
    # tolerance follows the largest gradient of the whole model, not the parameter's own
    scale = max(np.abs(p.grad.numpy()).max() for p in ref_params.values())
    for name, grad in zip(names, grads):
        np.testing.assert_allclose(grad.numpy(), ref_params[name].grad.numpy(), rtol=1e-3, atol=1e-5 * scale,
                                   err_msg=name)


def test_drop_path_drops_whole_samples_in_training_only():
    drop = van.DropPath(0.5)
    x = jt.ones((400, 2, 3, 3))
    drop.train()
    y = drop(x).numpy()
    per_sample = y.reshape(400, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()               # the whole sample or nothing
    assert 0.35 < (per_sample[:, 0] == 0).mean() < 0.65
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())


def test_drop_path_rate_rises_linearly_over_blocks():
    model = van.van_b0(drop_path_rate=0.3, **TINY)
    rates = [blk.drop_path.drop_prob for i in range(1, 5) for blk in getattr(model, f"block{i}")]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, sum(TINY["depths"])))


# --------------------------------------------------------------------------- CCNet on VAN
@pytest.mark.parametrize("name", sorted(SIZES))
def test_ccnet_with_each_van_size_runs_forward_and_backward(name):
    """Real sizes, tiny input: the RCCA head sits on stage 4 and the auxiliary head on stage 3,
    both at stride 8, with channel counts taken from the backbone."""
    from models.losses import SegLoss
    # stochastic depth may drop a block's branch for both images of this tiny batch (its
    # parameters then get no gradient): a fixed seed keeps the check from depending on test order
    jt.set_global_seed(0)
    model = models.build_model(name, num_classes=4, recurrence=2)
    dims = SIZES[name][0]
    assert model.head.conva[0].in_channels == dims[3] and model.dsn[0].in_channels == dims[2]
    model.train()
    rng = np.random.default_rng(0)
    x = jt.array(rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    main, aux = model(x)
    assert tuple(main.shape) == tuple(aux.shape) == (2, 4, 8, 8)
    loss, _ = SegLoss(4)([main, aux], jt.array(rng.integers(0, 4, (2, 64, 64)).astype(np.int32)))
    watched = {"backbone.patch_embed1.proj.weight", f"backbone.block4.{SIZES[name][1][3] - 1}.layer_scale_2",
               "backbone.block3.0.attn.spatial_gating_unit.conv_spatial.weight", "head.conva.0.weight",
               "dsn.0.weight"}
    params = [p for n, p in model.named_parameters() if n in watched]
    assert len(params) == len(watched)
    for grad in jt.grad(loss, params):
        g = grad.numpy()
        assert np.isfinite(g).all() and np.abs(g).max() > 0
    model.eval()
    assert tuple(model(x).shape) == (2, 4, 64, 64)
