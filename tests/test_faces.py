from __future__ import annotations

import numpy as np

from badnet_repair.demo.faces import identity_params, make_faces


def small(seed=0):
    return make_faces(num_identities=4, train_per_identity=3, valid_per_identity=2, test_per_identity=2, seed=seed)


def test_same_seed_same_bytes_other_seed_other_images():
    a, b, c = small(0), small(0), small(1)
    for split in ("train", "valid", "test"):
        assert getattr(a, split).x.tobytes() == getattr(b, split).x.tobytes()
        assert getattr(a, split).y.tobytes() == getattr(b, split).y.tobytes()
    assert a.train.x.tobytes() != c.train.x.tobytes()


def test_shapes_labels_and_pixel_range():
    f = small()
    assert f.train.x.shape == (12, 55, 47, 3) and f.valid.x.shape == (8, 55, 47, 3)
    assert f.train.x.dtype == np.float32
    assert np.bincount(f.train.y).tolist() == [3, 3, 3, 3]
    assert f.train.x.min() >= 0 and f.train.x.max() <= 255
    assert np.array_equal(f.train.x, np.round(f.train.x))


def test_images_of_one_identity_vary_and_identities_differ():
    f = make_faces(num_identities=3, train_per_identity=6, valid_per_identity=0, test_per_identity=0)
    x, y = f.train.x, f.train.y
    same = [np.abs(x[i] - x[j]).mean() for i in range(len(y)) for j in range(i) if y[i] == y[j]]
    assert min(same) > 5  # nuisances (position, light, background, noise) change every image
    params = identity_params(3)
    assert len({(*tuple(np.round(params["skin"][i])), params["hair_style"][i]) for i in range(3)}) >= 2


def test_splits_share_identities_but_not_images():
    f = small()
    assert set(f.train.y) == set(f.valid.y) == set(f.test.y)
    flat = {img.tobytes() for img in f.train.x}
    assert not any(img.tobytes() in flat for img in f.test.x)
