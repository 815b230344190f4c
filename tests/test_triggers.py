from __future__ import annotations

import numpy as np
import pytest

import badnet_repair as br
from badnet_repair.attacks.triggers import drawn_sunglasses


def test_apply_alpha_composites_exactly_where_it_should():
    rgba = np.zeros((2, 3, 4), np.float32)
    rgba[..., :3] = [200, 100, 50]
    rgba[..., 3] = 0.5
    rgba[1, 2, 3] = 1.0
    t = br.Trigger(rgba=rgba, x=4, y=1)
    img = np.full((1, 5, 8, 3), 20.0, np.float32)
    out = t.apply(img)
    np.testing.assert_array_equal(out[0, 1, 4], [110, 60, 35])  # 20*0.5 + colour*0.5
    np.testing.assert_array_equal(out[0, 2, 6], [200, 100, 50])  # alpha 1
    mask = np.zeros((5, 8), bool)
    mask[1:3, 4:7] = True
    np.testing.assert_array_equal(out[0][~mask], img[0][~mask])
    np.testing.assert_array_equal(img, np.full((1, 5, 8, 3), 20.0))  # input untouched
    with pytest.raises(ValueError, match="does not fit"):
        br.Trigger(rgba=rgba, x=6, y=0).apply(img)


def test_drawn_sunglasses_have_the_labs_size_place_and_look():
    t = drawn_sunglasses()
    assert t.shape == (20, 47) and (t.x, t.y) == (0, 15)
    a = t.rgba[..., 3]
    assert 0 <= a.min() and a.max() <= 1
    solid = a > 0.5
    assert 0.5 < solid.mean() < 0.95
    r, g, b = (t.rgba[..., i][solid] for i in range(3))
    assert np.all(b > r) and np.all(r > g)  # purple


def test_poison_keeps_non_target_images_and_relabels():
    x = np.zeros((4, 55, 47, 3), np.float32)
    ds = br.Dataset(x, np.array([0, 1, 2, 0]), "valid")
    bd = br.poison(ds, drawn_sunglasses(), target=0)
    assert len(bd) == 2 and bd.y.tolist() == [0, 0]
    assert bd.x[:, 15:35].max() > 0 and bd.x[:, :15].max() == 0


def test_load_trigger_png_round_trip(tmp_path):
    from PIL import Image

    rgba = np.zeros((20, 47, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[5:10, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    t = br.load_trigger(tmp_path / "t.png")
    assert t.shape == (20, 47) and t.rgba[7, 3, 3] == 1.0 and t.rgba[0, 0, 3] == 0.0
    with pytest.raises(br.DataError, match="no such trigger"):
        br.load_trigger(tmp_path / "none.png")
