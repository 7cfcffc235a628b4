"""ADE20K / Cityscapes / folder loaders on tiny trees written here: label mapping, batching through
jittor.dataset.Dataset, and every bad-input path (clear errors, skip_bad with warnings)."""
import json
import warnings

import numpy as np
import pytest
from PIL import Image

import datasets
from datasets import BadSampleError, BadSampleWarning, DatasetError, DatasetNotFoundError
from datasets.cityscapes import CITYSCAPES_LABELS

# The official Cityscapes table, written out independently of datasets/cityscapes.py:
# label id -> train id for the 19 evaluated classes; every other id is ignored (255).
OFFICIAL_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                           24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def write_pair(image_path, label_path, label, seed=0, image_size=None):
    h, w = label.shape
    ih, iw = image_size or (h, w)
    rgb = np.random.default_rng(seed).integers(0, 256, size=(ih, iw, 3)).astype(np.uint8)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(image_path)
    Image.fromarray(label.astype(np.uint8)).save(label_path)
    return rgb


def ade_tree(root, n_train=3, n_val=2, size=(24, 32)):
    """ADEChallengeData2016 layout with random annotation values 0..150."""
    rng = np.random.default_rng(0)
    raws = {}
    for split, count in (("training", n_train), ("validation", n_val)):
        for i in range(count):
            raw = rng.integers(0, 151, size=size).astype(np.uint8)
            name = f"ADE_{split}_{i:08d}"
            write_pair(root / "images" / split / f"{name}.jpg", root / "annotations" / split / f"{name}.png",
                       raw, seed=i)
            raws[(split, name)] = raw
    return raws


def cityscapes_tree(root, split="train", cities=("aachen", "bochum"), size=(16, 32), kind="labelIds"):
    rng = np.random.default_rng(1)
    raws = {}
    for city in cities:
        for frame in range(2):
            stem = f"{city}_000000_{frame:06d}"
            if kind == "labelIds":
                raw = rng.integers(0, 34, size=size)
            else:
                raw = rng.choice(list(range(19)) + [255], size=size)
            write_pair(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                       root / "gtFine" / split / city / f"{stem}_gtFine_{kind}.png", raw, seed=frame)
            raws[f"{city}/{stem}"] = raw.astype(np.uint8)
    return raws


@pytest.fixture
def ade_root(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    return root, ade_tree(root)


# --------------------------------------------------------------------------------- registry
def test_registry_and_unknown_name():
    assert {"ade20k", "cityscapes", "folder", "demo"} <= set(datasets.DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'ade21k'.*ade20k.*cityscapes"):
        datasets.build_dataset("ade21k")


# ----------------------------------------------------------------------------------- ADE20K
def test_ade20k_metadata():
    cls = datasets.ADE20KDataset
    assert len(cls.CLASSES) == 150 and len(cls.PALETTE) == 150
    assert cls.CLASSES[:3] == ("wall", "building", "sky") and cls.CLASSES[-1] == "flag"
    assert cls.CLASSES[7] == "bed"                          # mmseg's 'bed ' without the space
    assert cls.PALETTE[0] == [120, 120, 120] and cls.PALETTE[-1] == [92, 0, 255]


def test_ade20k_reduce_zero_label_and_encoding(ade_root):
    root, raws = ade_root
    ds = datasets.build_dataset("ade20k", data_root=root, split="val", mode="test")
    assert ds.num_samples == 2 and ds.num_classes == 150 and ds.ignore_index == 255
    assert [p[0].endswith(".jpg") and p[1].endswith(".png") for p in ds.samples] == [True, True]
    for i, (image_path, _) in enumerate(ds.samples):
        raw = raws[("validation", image_path.split("/")[-1][:-4])]
        rgb, label = ds.load_raw(i)
        assert rgb.dtype == np.uint8 and rgb.shape == raw.shape + (3,)
        assert label.dtype == np.int32
        expected = np.where(raw == 0, 255, raw.astype(np.int32) - 1)
        np.testing.assert_array_equal(label, expected)
        pred = np.where(label == 255, 0, label)
        encoded = ds.encode_prediction(pred)
        assert encoded.dtype == np.uint8
        np.testing.assert_array_equal(encoded[raw > 0], raw[raw > 0])
    with pytest.raises(ValueError, match="0..149"):
        ds.encode_prediction(np.array([[150]]))


def test_ade20k_accepts_parent_folder(ade_root):
    root, _ = ade_root
    ds = datasets.build_dataset("ade20k", data_root=root.parent, split="train")
    assert ds.data_root == root and ds.num_samples == 3


def test_train_items_and_jittor_batching(ade_root):
    import jittor as jt
    root, _ = ade_root
    ds = datasets.build_dataset("ade20k", data_root=root, split="train", mode="train", crop_size=16)
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == np.float32
    assert label.shape == (16, 16) and label.dtype == np.int32
    assert set(np.unique(label).tolist()) <= set(range(150)) | {255}
    assert len(ds) == 3                                       # batch size 1 by default

    ds.set_attrs(batch_size=2, shuffle=True, drop_last=False)
    batches = list(ds)
    assert len(ds) == 2 and [b[0].shape[0] for b in batches] == [2, 1]
    images, labels = batches[0]
    assert isinstance(images, jt.Var) and images.shape == [2, 3, 16, 16] and images.dtype == "float32"
    assert labels.shape == [2, 16, 16] and labels.dtype == "int32"

    ds.set_attrs(batch_size=2, drop_last=True)
    assert len(ds) == 1 and [b[0].shape[0] for b in ds] == [2]


def test_jittor_workers_load_batches(ade_root):
    root, _ = ade_root
    ds = datasets.build_dataset("ade20k", data_root=root, split="train", crop_size=16,
                                batch_size=2, num_workers=2, drop_last=True)
    try:
        shapes = [(tuple(x.shape), tuple(y.shape)) for x, y in ds]
    finally:
        ds.terminate()
    assert shapes == [((2, 3, 16, 16), (2, 16, 16))]


def test_test_mode_items_keep_full_resolution(ade_root):
    root, raws = ade_root
    ds = datasets.build_dataset("ade20k", data_root=root, split="val", mode="test")
    image, label = ds[1]
    assert image.shape == (3, 24, 32) and label.shape == (24, 32)
    rgb, _ = ds.load_raw(1)
    np.testing.assert_allclose(image, datasets.transforms.normalize(rgb))


# ------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_table_is_the_official_one():
    table = {l.id: l.train_id for l in CITYSCAPES_LABELS if l.id >= 0}
    assert sorted(table) == list(range(34))
    assert {i: t for i, t in table.items() if t != 255} == OFFICIAL_ID_TO_TRAIN_ID
    assert datasets.CityscapesDataset.CLASSES == (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle")
    assert datasets.CityscapesDataset.PALETTE[0] == [128, 64, 128]
    assert datasets.CityscapesDataset.PALETTE[13] == [0, 0, 142]


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    raws = cityscapes_tree(tmp_path)
    ds = datasets.build_dataset("cityscapes", data_root=tmp_path, split="train", mode="test")
    assert ds.num_samples == 4 and ds.num_classes == 19
    lut = np.full(256, 255)
    for label_id, train_id in OFFICIAL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    for i, (image_path, label_path) in enumerate(ds.samples):
        assert label_path.endswith("_gtFine_labelIds.png")
        key = image_path.split("/")[-2] + "/" + image_path.split("/")[-1][:-len("_leftImg8bit.png")]
        _, label = ds.load_raw(i)
        np.testing.assert_array_equal(label, lut[raws[key]])
        evaluated = label != 255
        np.testing.assert_array_equal(ds.encode_prediction(np.where(evaluated, label, 0))[evaluated],
                                      raws[key][evaluated])


def test_cityscapes_accepts_label_train_ids(tmp_path):
    raws = cityscapes_tree(tmp_path, split="val", kind="labelTrainIds")
    ds = datasets.build_dataset("cityscapes", data_root=tmp_path, split="val", mode="test")
    for i, (image_path, label_path) in enumerate(ds.samples):
        assert label_path.endswith("_gtFine_labelTrainIds.png")
        key = image_path.split("/")[-2] + "/" + image_path.split("/")[-1][:-len("_leftImg8bit.png")]
        np.testing.assert_array_equal(ds.load_raw(i)[1], raws[key])


def test_cityscapes_out_of_range_label(tmp_path):
    cityscapes_tree(tmp_path, cities=("aachen",))
    bad = tmp_path / "gtFine/train/aachen/aachen_000000_000001_gtFine_labelIds.png"
    Image.fromarray(np.full((16, 32), 40, np.uint8)).save(bad)
    ds = datasets.build_dataset("cityscapes", data_root=tmp_path, mode="test")
    with pytest.raises(BadSampleError, match=r"aachen_000000_000001_gtFine_labelIds.png has value\(s\) 40 .*0..33"):
        ds.load_raw(1)


# ----------------------------------------------------------------------------------- folder
def folder_tree(root, names=("a", "b", "sub/c"), classes=3, size=(12, 20)):
    rng = np.random.default_rng(2)
    raws = {}
    for i, name in enumerate(names):
        raw = rng.choice(list(range(classes)) + [255], size=size)
        write_pair(root / "images" / f"{name}.jpg", root / "masks" / f"{name}.png", raw, seed=i)
        raws[name] = raw
    return raws


def test_folder_dataset_with_json_classes_and_list_file(tmp_path):
    raws = folder_tree(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps(
        {"classes": ["bg", "cat", "dog"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]]}))
    (tmp_path / "val.txt").write_text("b\nsub/c.jpg\n")
    ds = datasets.build_dataset("folder", data_root=tmp_path, split="val", mode="test")
    assert ds.CLASSES == ("bg", "cat", "dog") and ds.num_classes == 3 and ds.PALETTE[1] == [255, 0, 0]
    assert [p[0].split("images/")[1] for p in ds.samples] == ["b.jpg", "sub/c.jpg"]
    np.testing.assert_array_equal(ds.load_raw(1)[1], raws["sub/c"])
    np.testing.assert_array_equal(ds.encode_prediction(np.array([[0, 2]])), [[0, 2]])


def test_folder_dataset_split_folders_classes_by_args_and_reduce_zero_label(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 4, size=(8, 8))
    write_pair(tmp_path / "images/train/x.png", tmp_path / "labels/train/x.png", raw)
    ds = datasets.build_dataset("folder", data_root=tmp_path, num_classes=3, reduce_zero_label=True,
                                mode="test")
    assert ds.CLASSES == ("class_0", "class_1", "class_2")
    np.testing.assert_array_equal(ds.load_raw(0)[1], np.where(raw == 0, 255, raw - 1))
    np.testing.assert_array_equal(ds.encode_prediction(np.array([[0, 2]])), [[1, 3]])


def test_folder_split_folders_warn_only_when_the_split_folder_is_missing(tmp_path):
    raw = np.zeros((8, 8), dtype=np.int64)
    write_pair(tmp_path / "images/val/x.png", tmp_path / "masks/val/x.png", raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # images/val exists: nothing to warn about
        ds = datasets.build_dataset("folder", data_root=tmp_path, split="val", num_classes=3, mode="test")
    assert ds.num_samples == 1
    with pytest.warns(UserWarning, match="no 'test' sub-folder"):
        datasets.build_dataset("folder", data_root=tmp_path, split="test", num_classes=3,
                               mode="test")


def test_folder_dataset_needs_classes(tmp_path):
    folder_tree(tmp_path)
    with pytest.raises(DatasetError, match="classes are unknown.*classes.json"):
        datasets.build_dataset("folder", data_root=tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a"], "colours": []}))
    with pytest.raises(DatasetError, match=r"unknown key\(s\) \['colours'\]"):
        datasets.build_dataset("folder", data_root=tmp_path)
    (tmp_path / "classes.json").unlink()
    with pytest.raises(DatasetError, match="palette needs one"):
        datasets.build_dataset("folder", data_root=tmp_path, classes="a,b", palette=[[0, 0, 0]])


def test_folder_list_file_naming_missing_sample(tmp_path):
    folder_tree(tmp_path)
    (tmp_path / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(DatasetError, match="train.txt names 1 sample.*zzz"):
        datasets.build_dataset("folder", data_root=tmp_path, num_classes=3)


def test_folder_label_out_of_range(tmp_path):
    folder_tree(tmp_path, classes=5)                       # masks hold 0..4 but only 3 classes
    ds = datasets.build_dataset("folder", data_root=tmp_path, num_classes=3, mode="test")
    with pytest.raises(BadSampleError, match=r"value\(s\) 3, 4 outside .*0..2, 255"):
        ds.load_raw(0)


# ------------------------------------------------------------------------------- bad input
def test_missing_root_shows_layout_and_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        datasets.build_dataset("ade20k", data_root=tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere does not exist" in message and "annotations/training" in message
    assert "ADEChallengeData2016.zip" in message
    with pytest.raises(DatasetNotFoundError, match="(?s)leftImg8bit.*cityscapes-dataset.com"):
        datasets.build_dataset("cityscapes", data_root=tmp_path / "nowhere")


def test_missing_split_folder(ade_root):
    root, _ = ade_root
    for path in (root / "annotations" / "validation").iterdir():
        path.unlink()
    (root / "annotations" / "validation").rmdir()
    with pytest.raises(DatasetNotFoundError, match="annotation folder .*annotations/validation does not exist"):
        datasets.build_dataset("ade20k", data_root=root, split="val")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        datasets.build_dataset("ade20k", data_root=root, split="test")


def test_image_without_label_and_label_without_image(ade_root):
    root, _ = ade_root
    (root / "annotations/training/ADE_training_00000001.png").unlink()
    Image.fromarray(np.ones((4, 4), np.uint8)).save(root / "annotations/training/orphan.png")
    with pytest.raises(DatasetError) as info:
        datasets.build_dataset("ade20k", data_root=root)
    message = str(info.value)
    assert "1 image(s)" in message and "ADE_training_00000001.jpg" in message and "have no label" in message
    assert "1 label(s)" in message and "orphan.png" in message and "have no image" in message
    assert "skip_bad=True" in message
    with pytest.warns(BadSampleWarning, match="skipping these 2 unpaired"):
        ds = datasets.build_dataset("ade20k", data_root=root, skip_bad=True)
    assert ds.num_samples == 2


def test_size_mismatch_names_both_files(tmp_path):
    root = tmp_path / "ade"
    write_pair(root / "images/validation/x.jpg", root / "annotations/validation/x.png",
               np.ones((10, 12)), image_size=(10, 14))
    ds = datasets.build_dataset("ade20k", data_root=root, split="val", mode="test")
    with pytest.raises(BadSampleError, match=r"x.jpg is 14x10 .* label .*x.png is 12x10.*same size"):
        ds.load_raw(0)


def test_truncated_and_unreadable_images(ade_root):
    root, _ = ade_root
    image = root / "images/validation/ADE_validation_00000000.jpg"
    image.write_bytes(image.read_bytes()[:200])                        # truncated JPEG
    label = root / "annotations/validation/ADE_validation_00000001.png"
    label.write_bytes(b"this is not a png")
    ds = datasets.build_dataset("ade20k", data_root=root, split="val", mode="test")
    with pytest.raises(BadSampleError, match="cannot read image .*ADE_validation_00000000.jpg.*truncated"):
        ds.load_raw(0)
    with pytest.raises(BadSampleError, match="cannot read label .*ADE_validation_00000001.png"):
        ds.load_raw(1)


def test_label_out_of_range_and_colour_label(ade_root):
    root, raws = ade_root
    Image.fromarray(np.full((24, 32), 200, np.uint8)).save(root / "annotations/training/ADE_training_00000000.png")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(root / "annotations/training/ADE_training_00000001.png")
    ds = datasets.build_dataset("ade20k", data_root=root, mode="test")
    with pytest.raises(BadSampleError, match=r"ADE_training_00000000.png has value\(s\) 200 .*0..150"):
        ds.load_raw(0)
    with pytest.raises(BadSampleError, match="ADE_training_00000001.png has image mode 'RGB'.*single-channel"):
        ds.load_raw(1)


def test_skip_bad_replaces_bad_samples_with_warnings_and_a_count(ade_root):
    root, _ = ade_root
    image = root / "images/training/ADE_training_00000001.jpg"
    image.write_bytes(image.read_bytes()[:100])
    strict = datasets.build_dataset("ade20k", data_root=root, crop_size=16, batch_size=3)
    with pytest.raises(BadSampleError, match="ADE_training_00000001.jpg"):
        list(strict)

    ds = datasets.build_dataset("ade20k", data_root=root, crop_size=16, batch_size=3, skip_bad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(ds)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadSampleWarning)]
    assert len(batches) == 1 and batches[0][0].shape == [3, 3, 16, 16]     # the batch stays full
    assert any("skipping sample 1" in m and "ADE_training_00000001.jpg" in m for m in messages)
    assert any("skipped 1 bad sample load(s) out of 3" in m for m in messages)
    assert ds.skipped_count == 1 and 1 in ds.bad_samples

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        indices = [i for i, _, _ in ds.iter_raw()]
    assert indices == [0, 2]
    assert any("skipped 1" in str(w.message) for w in caught)
    with pytest.raises(BadSampleError):
        ds.load_raw(1)                                   # direct loads still say what is wrong


# ---------------------------------------------------------------------------------------- MPI
MPI_SCRIPT = r'''
import sys
sys.path.insert(0, {repo!r})
import numpy as np
import datasets, jittor as jt
ds = datasets.build_dataset("ade20k", data_root={root!r}, split="train", mode="test", batch_size=4,
                            shuffle=True)
for epoch in range(2):
    seen = [np.asarray(y.numpy())[:, 0, 0].tolist() for _, y in ds]
    # one file per rank and epoch: mpirun may interleave the ranks' stdout mid-line
    with open({out!r} + f"/result_{{jt.rank}}_{{epoch}}.txt", "w") as f:
        f.write(" ".join(map(str, ("RESULT", jt.rank, jt.world_size, epoch, seen))))
'''


@pytest.mark.skipif(__import__("shutil").which("mpirun") is None, reason="needs mpirun (OpenMPI)")
def test_mpi_ranks_get_disjoint_shares_of_each_batch(tmp_path):
    """Under `mpirun -np 2` Jittor splits every global batch of 4 into 2 + 2; our dataset must not
    get in the way (no overridden index logic)."""
    import ast
    import os
    import subprocess
    import sys
    root = tmp_path / "ade"
    for i in range(10):                          # sample i has label value i everywhere
        write_pair(root / f"images/training/{i:03d}.png", root / f"annotations/training/{i:03d}.png",
                   np.full((4, 4), i + 1), seed=i)
    script = tmp_path / "mpi_check.py"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(MPI_SCRIPT.format(repo=repo, root=str(root), out=str(tmp_path)))
    command = ["mpirun", "-np", "2"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    env = dict(os.environ, CCNET_QUIET="1", OMP_NUM_THREADS="1")
    run = subprocess.run(command + [sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env)
    lines = [path.read_text() for path in sorted(tmp_path.glob("result_*.txt"))]
    results = [line.split(" ", 4)[1:] for line in lines if line.startswith("RESULT")]
    assert len(results) == 4, run.stdout + run.stderr
    for epoch in ("0", "1"):
        shares = {rank: ast.literal_eval(seen) for rank, world, ep, seen in results if ep == epoch}
        assert sorted(shares) == ["0", "1"]
        assert [len(b) for b in shares["0"]] == [2, 2, 1] == [len(b) for b in shares["1"]]
        together = sum(shares["0"], []) + sum(shares["1"], [])
        assert sorted(together) == list(range(10))          # every sample once per epoch
