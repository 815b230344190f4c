from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

import badnet_repair as br
from badnet_repair.errors import DataError, DataWarning


def write_raw(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def nchw(n=6, h=5, w=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, size=(n, 3, h, w))


def test_load_h5_transposes_nchw_to_nhwc_without_scaling(tmp_path):
    data = nchw()
    p = write_raw(tmp_path / "d.h5", data=data, label=np.arange(6.0))
    ds = br.load_h5(p)
    assert ds.x.shape == (6, 5, 4, 3) and ds.x.dtype == np.float32
    # pixel (row 2, col 3, channel 1) of image 4 is data[4, 1, 2, 3]
    assert ds.x[4, 2, 3, 1] == np.float32(data[4, 1, 2, 3])
    np.testing.assert_array_equal(ds.x, data.transpose(0, 2, 3, 1).astype(np.float32))
    assert ds.y.dtype == np.int64 and list(ds.y) == [0, 1, 2, 3, 4, 5]
    assert ds.name == "d" and ds.path == str(p)


def test_chunked_read_equals_whole_read(tmp_path):
    data = nchw(n=37)
    p = write_raw(tmp_path / "d.h5", data=data, label=np.zeros(37))
    whole = br.load_h5(p, chunk_size=1000).x
    for chunk in (1, 5, 36, 37):
        np.testing.assert_array_equal(br.load_h5(p, chunk_size=chunk).x, whole)


def test_nhwc_is_detected_and_accepted_explicitly(tmp_path):
    data = nchw().transpose(0, 2, 3, 1)
    p = write_raw(tmp_path / "d.h5", data=data, label=np.zeros(6))
    with pytest.raises(DataError, match=r"d\.h5.*channel-last.*layout='nhwc'"):
        br.load_h5(p)
    np.testing.assert_array_equal(br.load_h5(p, layout="nhwc").x, data.astype(np.float32))
    np.testing.assert_array_equal(br.load_h5(p, layout="auto").x, data.astype(np.float32))


def test_save_h5_round_trips_in_lab_format(tmp_path):
    x = nchw().transpose(0, 2, 3, 1).astype(np.float32)
    p = br.save_h5(tmp_path / "s.h5", x, np.array([3, 1, 4, 1, 5, 9]))
    with h5py.File(p) as f:
        assert f["data"].shape == (6, 3, 5, 4)
        assert f["label"].shape == (6,)
    ds = br.load_h5(p)
    np.testing.assert_array_equal(ds.x, x)
    assert list(ds.y) == [3, 1, 4, 1, 5, 9]
    with pytest.raises(br.OutputExistsError, match="s.h5"):
        br.save_h5(p, x, np.zeros(6))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: dict(data=nchw(), lbl=np.zeros(6)), r"no dataset 'label'; entries found: \['data', 'lbl'\]"),
        (lambda d: dict(images=nchw(), label=np.zeros(6)), r"no dataset 'data'"),
        (lambda d: dict(data=nchw()[0], label=np.zeros(3)), r"expected 4 axes"),
        (lambda d: dict(data=np.zeros((6, 2, 5, 4)), label=np.zeros(6)), r"no axis of size 3"),
        (lambda d: dict(data=nchw(), label=np.zeros(5)), r"6 images but 5 labels"),
        (lambda d: dict(data=np.zeros((0, 3, 5, 4)), label=np.zeros(0)), r"contains no images"),
        (lambda d: dict(data=nchw(), label=np.array([0, 1, 2, 3, 4, 2.5])), r"label 5 is 2.5, not an integer"),
        (lambda d: dict(data=nchw(), label=np.array([0, 1, -1, 3, 4, 2])), r"labels must be >= 0"),
        (lambda d: dict(data=nchw(), label=np.array([b"a"] * 6)), r"expected integers"),
    ],
)
def test_malformed_files_raise_data_error_naming_the_file(tmp_path, make, message):
    p = write_raw(tmp_path / "bad.h5", **make(None))
    with pytest.raises(DataError, match=message) as info:
        br.load_h5(p)
    assert str(p) in str(info.value)


def test_non_finite_pixels_name_the_image(tmp_path):
    data = nchw(n=9)
    data[7, 2, 1, 1] = np.nan
    p = write_raw(tmp_path / "nan.h5", data=data, label=np.zeros(9))
    with pytest.raises(DataError, match=r"nan\.h5: image 7 has non-finite"):
        br.load_h5(p, chunk_size=4)
    data[7, 2, 1, 1] = np.inf
    p = write_raw(tmp_path / "inf.h5", data=data, label=np.zeros(9))
    with pytest.raises(DataError, match="image 7"):
        br.load_h5(p)


def test_labels_outside_the_models_classes(tmp_path):
    p = write_raw(tmp_path / "d.h5", data=nchw(), label=np.array([0, 1, 2, 3, 4, 5]))
    with pytest.raises(DataError, match=r"in \[0, 5\).*found 5"):
        br.load_h5(p, num_classes=5)
    assert br.load_h5(p, num_classes=6).y.max() == 5


def test_image_shape_mismatch(tmp_path):
    p = write_raw(tmp_path / "d.h5", data=nchw(), label=np.zeros(6))
    with pytest.raises(DataError, match=r"images are 5x4x3 \(HxWxC\) but the model expects 55x47x3"):
        br.load_h5(p, image_shape=(55, 47, 3))


def test_missing_folder_not_hdf5_and_truncated(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        br.load_h5(tmp_path / "nope.h5")
    with pytest.raises(DataError, match="is a folder"):
        br.load_h5(tmp_path)
    txt = tmp_path / "t.h5"
    txt.write_text("hello")
    with pytest.raises(DataError, match="not an HDF5 file"):
        br.load_h5(txt)
    good = write_raw(tmp_path / "good.h5", data=nchw(n=200, h=30, w=30), label=np.zeros(200))
    blob = good.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.h5"):
        br.load_h5(cut)


def test_warns_when_pixels_look_scaled(tmp_path):
    p = write_raw(tmp_path / "s.h5", data=nchw() / 255.0, label=np.zeros(6))
    with pytest.warns(DataWarning, match="0..1"):
        br.load_h5(p)


def test_load_images_png_jpeg_grey_and_folder(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(55, 47, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "b.png")  # grey
    smooth = np.broadcast_to(np.linspace(0, 250, 47, dtype=np.uint8)[None, :, None], (55, 47, 3)).copy()
    Image.fromarray(smooth).save(tmp_path / "c.jpg", quality=95)
    x = br.load_images(tmp_path)
    assert x.shape == (3, 55, 47, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], rgb.astype(np.float32))
    np.testing.assert_array_equal(x[1], np.repeat(rgb[..., :1], 3, axis=2).astype(np.float32))
    assert np.abs(x[2] - smooth).mean() < 3  # JPEG is lossy
    one = br.load_images(tmp_path / "a.png")
    assert one.shape == (1, 55, 47, 3)


def test_load_images_errors(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small\.png: image is 20x20 .* 55x47 is expected"):
        br.load_images(tmp_path / "small.png")
    assert br.load_images(tmp_path / "small.png", resize=True).shape == (1, 55, 47, 3)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png: is not an image"):
        br.load_images(tmp_path / "junk.png")
    with pytest.raises(DataError, match="no such file"):
        br.load_images(tmp_path / "missing.png")


def test_a_group_where_the_data_should_be_is_named_as_a_group(tmp_path):
    p = tmp_path / "grp.h5"
    with h5py.File(p, "w") as f:
        f.create_group("data")
        f["label"] = np.arange(3)
    with pytest.raises(DataError, match=r"'data' is a group, not a dataset") as info:
        br.load_h5(p)
    assert str(p) in str(info.value)


def test_lazy_images_become_an_array_whole_and_read_the_same(tmp_path):
    x = np.random.default_rng(0).uniform(0, 255, (7, 55, 47, 3)).astype(np.float32)
    p = br.save_h5(tmp_path / "d.h5", x, np.arange(7))
    lazy = br.load_h5(p, lazy=True).x
    np.testing.assert_array_equal(np.asarray(lazy), x)
    np.testing.assert_array_equal(np.asarray(lazy, np.float64), x.astype(np.float64))
    np.testing.assert_array_equal(lazy[[5, 1]], x[[5, 1]])


def test_a_multi_target_poisoned_set_keeps_each_inputs_target():
    ds = br.Dataset(np.zeros((4, 2, 2, 3), np.float32), np.array([0, 33, 66, 0]), name="bd")
    with pytest.raises(DataError, match="--target"):
        br.poisoned_labels(ds, None)
    kept, first = br.poisoned_labels(ds, None, several=True)
    assert first == 0 and kept.y.tolist() == [0, 33, 66, 0]
    assert br.poisoned_labels(ds, 5)[0].y.tolist() == [5] * 4


def test_an_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path):
    from badnet_repair.formats.files import check_writable

    (tmp_path / "afile").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(br.OutputExistsError, match="afile: is a file, not a folder"):
            check_writable([tmp_path / "afile" / "results.json"], overwrite=overwrite)
    assert (tmp_path / "afile").read_text() == "mine"
    check_writable([tmp_path / "new" / "results.json"])  # a folder still to make is fine


def _hold_lock(folder: str, log: str, name: str) -> None:
    import time

    from badnet_repair.formats.files import folder_lock

    with folder_lock(folder):
        with open(log, "a") as f:
            f.write(f"{name} in\n")
        time.sleep(2.0)  # far longer than the two processes' start-up gap
        with open(log, "a") as f:
            f.write(f"{name} out\n")


def test_folder_lock_makes_processes_take_turns(tmp_path):
    """Two processes making files in one folder (a benchmark's workers making BadNets of one
    demo) never hold it at once: each one's in/out lines are adjacent in the shared log."""
    import multiprocessing

    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hold_lock, args=(str(tmp_path / "demo"), str(log), n)) for n in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().split()  # e.g. "b in b out a in a out"
    assert len(lines) == 8 and {lines[0], lines[4]} == {"a", "b"}
    for start in (0, 4):  # one process in and out, then the other
        assert lines[start] == lines[start + 2] and lines[start + 1] == "in" and lines[start + 3] == "out"


def test_folder_lock_on_a_folder_it_cannot_write_runs_the_block_unlocked(tmp_path, monkeypatch):
    import builtins

    from badnet_repair.formats.files import folder_lock

    real_open = builtins.open

    def read_only(file, *args, **kwargs):
        if str(file).endswith(".lock"):
            raise PermissionError(13, "Read-only file system", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    ran = []
    with folder_lock(tmp_path / "demo") as root:
        ran.append(root)
    assert ran == [tmp_path / "demo"] and not (tmp_path / "demo" / ".lock").exists()


def test_per_class_keeps_at_most_n_images_of_each_class_in_file_order():
    y = np.array([2, 0, 2, 1, 2, 0, 2])
    data = br.Dataset(np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1), y, name="valid")
    two = data.per_class(2, seed=1)
    assert np.bincount(two.y).tolist() == [2, 1, 2]  # class 1 has one image: kept
    kept = two.x.ravel().astype(int)
    assert (np.diff(kept) > 0).all() and (data.y[kept] == two.y).all()  # file order, labels with their images
    assert two.name == "valid (2 a class)"
    np.testing.assert_array_equal(data.per_class(2, seed=1).x, two.x)  # seeded
    assert len(data.per_class(10)) == 7
    draws = {tuple(data.per_class(1, seed=s).x.ravel().astype(int)) for s in range(20)}
    assert len(draws) > 1  # the seed draws which images
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="whole number"):
            data.per_class(bad)  # type: ignore[arg-type]
