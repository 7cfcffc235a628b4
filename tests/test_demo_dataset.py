"""The synthetic demo set: deterministic bytes, atomic generation, ADE20K layout, and the property
it exists for (the context classes are decided only by the frame colour far along the row/column)."""
import hashlib
import json

import numpy as np
import pytest

import datasets
from datasets import demo, demo_clips

SMALL = {"training": 4, "validation": 2}


def file_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    demo.generate(tmp_path / "a", seed=0, splits=SMALL, progress=False)
    demo.generate(tmp_path / "b", seed=0, splits=SMALL, progress=False)
    demo.generate(tmp_path / "c", seed=1, splits=SMALL, progress=False)
    a, b, c = (file_hashes(tmp_path / n) for n in "abc")
    assert len(a) == 2 * 6 + 1 and a == b
    images = [k for k in a if k.startswith("images/")]
    assert all(a[k] != c[k] for k in images)


def test_ensure_demo_is_atomic_and_reuses_the_set(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    real = demo.make_sample
    calls = []

    def failing(rng, size=demo.DEMO_SIZE):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt              # as if the user pressed Ctrl-C mid-way
        return real(rng, size)

    monkeypatch.setattr(demo, "make_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(root, splits=SMALL, progress=False)
    assert not root.exists() and list(tmp_path.iterdir()) == []      # no half-written set left
    monkeypatch.setattr(demo, "make_sample", real)

    assert demo.ensure_demo(root, splits=SMALL, progress=False) == root
    before = file_hashes(root)
    stamp = (root / "demo_info.json").stat().st_mtime_ns
    demo.ensure_demo(root, splits=SMALL, progress=False)                # cached: untouched
    assert (root / "demo_info.json").stat().st_mtime_ns == stamp

    info = json.loads((root / "demo_info.json").read_text())
    info["version"] = -1                                                # made by another version
    (root / "demo_info.json").write_text(json.dumps(info))
    demo.ensure_demo(root, splits=SMALL, progress=False)
    assert file_hashes(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def user_folder(root):
    """A user's own data in ADE20K's layout (what the demo generator once deleted), plus a note."""
    for sub in ("images/training", "annotations/training", "images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
        rgb, label = demo.make_sample(np.random.default_rng(len(sub)))
        demo._write_png(rgb, root / sub / "mine_0001.png")
    (root / "notes.txt").write_text("my own files")
    return file_hashes(root)


def test_a_folder_that_is_not_a_demo_set_is_never_written(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    before = user_folder(mine)
    for build in (lambda: datasets.build_dataset("demo", data_root=mine, split="val", splits=SMALL),
                  lambda: demo.ensure_demo(mine, splits=SMALL, progress=False),
                  lambda: demo_clips.ensure_demo_clips(mine, splits=SMALL)):
        with pytest.raises(datasets.DatasetError, match=f"{mine} is neither empty nor a (demo|clip) set") as info:
            build()
        assert "--data-root is for" in str(info.value) and "\n" not in str(info.value)
        assert file_hashes(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]        # no temporary folder left
    # $CCNET_HOME/demo taken by something else: the same refusal.
    monkeypatch.setenv("CCNET_HOME", str(tmp_path))
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "keep.txt").write_text("x")
    with pytest.raises(datasets.DatasetError, match="neither empty nor a demo set"):
        datasets.build_dataset("demo", split="val", splits=SMALL)
    assert (tmp_path / "demo" / "keep.txt").read_text() == "x"


def test_an_outdated_set_holding_a_users_file_is_not_replaced(tmp_path):
    root = tmp_path / "demo"
    demo.ensure_demo(root, splits=SMALL, progress=False)
    info = json.loads((root / "demo_info.json").read_text())
    (root / "demo_info.json").write_text(json.dumps(dict(info, version=-1)))
    (root / "my_results.csv").write_text("1,2,3")
    before = file_hashes(root)
    with pytest.raises(datasets.DatasetError, match=r"outdated demo set that also holds files it did not write "
                                                    r"\(my_results.csv\)"):
        demo.ensure_demo(root, splits=SMALL, progress=False)
    assert file_hashes(root) == before


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "folder", "demo", "demo_clips"])
def test_a_data_root_that_does_not_exist_is_an_error(tmp_path, name):
    missing = tmp_path / "typo"
    with pytest.raises(datasets.DatasetNotFoundError, match=f"data root {missing} does not exist"):
        datasets.build_dataset(name, data_root=missing, split="val", mode="test")
    assert list(tmp_path.iterdir()) == []                               # nothing generated there


def test_clips_of_your_own_are_read_and_never_written(tmp_path):
    mine = tmp_path / "clips"
    demo_clips.generate(mine, splits={"training": 2, "validation": 1})
    (mine / "demo_clips_info.json").unlink()          # now an ordinary folder of clips in the layout
    before = file_hashes(mine)
    ds = datasets.build_dataset("demo_clips", data_root=mine, split="val", mode="test")
    assert ds.num_samples == 1 and file_hashes(mine) == before


def test_default_location_follows_ccnet_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CCNET_HOME", str(tmp_path / "home"))
    assert demo.default_root() == tmp_path / "home" / "demo"
    monkeypatch.delenv("CCNET_HOME")
    assert str(demo.default_root()).endswith(".cache/ccnet-jittor/demo")


def test_demo_is_read_by_the_ade20k_loader(tmp_path):
    (tmp_path / "demo").mkdir()                      # an empty folder given as data root: generated there
    ds = datasets.build_dataset("demo", data_root=tmp_path / "demo", split="val", mode="train",
                                splits=SMALL)
    assert isinstance(ds, datasets.ADE20KDataset) and ds.num_samples == 2
    assert ds.num_classes == len(ds.PALETTE) == 11
    assert ds.context_class_names == ("disc/red-row", "disc/blue-row", "square/cyan-col", "square/orange-col")
    assert (tmp_path / "demo/images/validation/demo_validation_00000.png").is_file()
    assert (tmp_path / "demo/annotations/validation/demo_validation_00000.png").is_file()
    rgb, label = ds.load_raw(0)
    assert rgb.shape == (128, 128, 3) and label.shape == (128, 128)
    assert set(np.unique(label).tolist()) <= set(range(11))          # every pixel labelled
    image, crop = ds[0]
    assert image.shape == (3, 128, 128) and crop.shape == (128, 128)
    picture = demo.sample_grid(ds, [0, 1])
    assert picture.size[0] > 2 * 2 * 128 and picture.mode == "RGB"


def nearest(colour, table):
    return min(table, key=lambda k: np.abs(np.asarray(table[k], float) - colour).sum())


def test_context_classes_are_decided_by_the_frame_only():
    f, m = demo.FRAME, demo.MARKER
    pixels = {c: [] for c in demo.CONTEXT_CLASSES}
    images_with = {c: 0 for c in demo.CONTEXT_CLASSES}
    for index in range(12):
        rgb, label = demo.make_sample(np.random.default_rng([5, index]))
        left, top = rgb[:, :m].mean(1), rgb[:m].mean(0)
        # Only the left and top strips carry markers; the right and bottom ones are neutral.
        for strip in (rgb[m:-f, -f:], rgb[-f:, m:-f]):
            assert np.abs(strip.mean((0, 1)) - demo.NEUTRAL_GREY).max() < 3
        for cls in demo.CONTEXT_CLASSES:
            ys, xs = np.nonzero(label == cls)
            images_with[cls] += int(len(ys) > 0)
            pixels[cls].append(rgb[ys, xs].astype(float))
            if len(ys) == 0:
                continue
            if cls in demo.ROW_COLOURS:       # the marker at the start of the row says the class
                assert all(nearest(left[y], demo.ROW_COLOURS) == cls for y in np.unique(ys))
                assert np.all(label[np.unique(ys), 0] == demo.MARKER_OF[cls])   # markers labelled too
                assert xs.min() - m >= 50                                   # far from it
            else:
                assert all(nearest(top[x], demo.COLUMN_COLOURS) == cls for x in np.unique(xs))
                assert np.all(label[0, np.unique(xs)] == demo.MARKER_OF[cls])
                assert ys.min() - m >= 50
    assert min(images_with.values()) >= 3
    # Locally identical: the two classes of a pair have the same pixel statistics.
    for a, b in [(demo.DISC_RED, demo.DISC_BLUE), (demo.SQUARE_CYAN, demo.SQUARE_ORANGE)]:
        pa, pb = np.concatenate(pixels[a]), np.concatenate(pixels[b])
        assert np.abs(pa.mean(0) - pb.mean(0)).max() < 1.0
        assert abs(pa.std() - pb.std()) < 1.0
