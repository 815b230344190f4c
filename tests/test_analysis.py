from __future__ import annotations

import numpy as np
import pytest

import badnet_repair as br

from .conftest import tiny_conv_model


def rgb_images(r: float, g: float, b: float, n: int = 2) -> np.ndarray:
    x = np.empty((n, 4, 4, 3), np.float32)
    x[...] = (r, g, b)
    return x


def identity_model():
    """Conv channel c = relu(pixel channel c): activations can be read off the images."""
    return tiny_conv_model(np.eye(3), np.zeros((12, 2), np.float32))


def test_trigger_response_by_hand():
    m = identity_model()
    clean = rgb_images(10, 1, 5)
    poisoned = clean.copy()
    poisoned[:, :2, :2, 2] = 255  # the trigger: blue 255 on a 2x2 patch of 16 pixels
    r = br.trigger_response(m, clean, poisoned, layer="conv")
    np.testing.assert_allclose(r.clean_mean, [10, 1, 5], rtol=1e-6)
    # (12 * 5 + 4 * 255) / 16 = 67.5
    np.testing.assert_allclose(r.poisoned_mean, [10, 1, 67.5], rtol=1e-6)
    np.testing.assert_allclose(r.rise, [0, 0, 62.5], rtol=1e-6, atol=1e-6)
    assert r.top(1).tolist() == [2]
    # ranked on the clean images: channel 1 (1) is pruned first, then 2 (5), then 0 (10)
    assert r.place.tolist() == [2, 0, 1]


def test_trigger_response_uses_the_given_ranking_and_checks_it():
    m = identity_model()
    clean, poisoned = rgb_images(10, 1, 5), rgb_images(10, 1, 200)
    ranking = br.rank_channels(m, rgb_images(1, 2, 3), layer="conv")
    r = br.trigger_response(m, br.Dataset(clean, np.zeros(2, np.int64)), poisoned, layer="conv", ranking=ranking)
    assert r.place.tolist() == [0, 1, 2]
    np.testing.assert_allclose(r.rise, [0, 0, 195], rtol=1e-6, atol=1e-6)
    other = br.ChannelRanking(layer="conv_3", measured_at="conv_3", mean_activation=np.zeros(3),
                              order=np.arange(3))
    with pytest.raises(ValueError, match="ranking is of layer 'conv_3'"):
        br.trigger_response(m, clean, poisoned, layer="conv", ranking=other)
    with pytest.raises(ValueError, match="at least one"):
        br.trigger_response(m, clean, poisoned[:0], layer="conv")
    with pytest.raises(ValueError, match="images are 4x4x1 .* the model expects 4x4x3"):
        br.trigger_response(m, clean, poisoned[..., :1], layer="conv")


def test_plot_trigger_response_draws_bars_in_pruning_order():
    m = identity_model()
    clean = rgb_images(10, 1, 5)
    poisoned = clean.copy()
    poisoned[:, :2, :2, 2] = 255
    r = br.trigger_response(m, clean, poisoned, layer="conv")
    fig = br.plot_trigger_response(r, channels_pruned=1)
    bars = fig.axes[0].patches
    # pruning order is channels 1, 2, 0, so the trigger's channel 2 is the second bar
    np.testing.assert_allclose([b.get_height() for b in bars], [0, 62.5, 0], atol=1e-5)
    assert bars[0].get_facecolor() != bars[1].get_facecolor()  # the pruned bar is greyed out
    assert "conv" in fig.axes[0].get_xlabel()
    legend = fig.axes[0].get_legend()  # the legend says which colour is which
    assert [t.get_text() for t in legend.get_texts()] == ["pruned by the defense (1)", "kept (2)"]


@pytest.mark.slow
def test_trigger_response_command_on_the_demo_writes_json_md_png(small_demo, tmp_path, capsys):
    import json

    from badnet_repair.cli import main

    out = tmp_path / "tr"
    args = ["trigger-response", "-q", "--demo", "pruning-aware", "--demo-dir", str(small_demo.root),
            "--out", str(out), "--top", "3"]
    assert main(args) == 0
    saved = json.loads((out / "trigger_response.json").read_text())
    model = br.load_model(small_demo.pruning_aware_model)
    channels = int(model.get_layer("conv_3").filters)
    assert saved["layer"] == "conv_3" and len(saved["channels"]) == channels
    assert sorted(c["place"] for c in saved["channels"]) == list(range(channels))
    assert 0 <= saved["channels_pruned"] <= channels
    # the library gives the same numbers on the same data
    valid, test = br.load_h5(small_demo.valid), br.load_h5(small_demo.test)
    bd = br.load_h5(small_demo.bd_test)
    sweep = br.prune_sweep(model, valid, thresholds=[10.0])
    lib = br.trigger_response(model, test.x[test.y != 0], bd, ranking=sweep.ranking)
    np.testing.assert_allclose([c["rise"] for c in saved["channels"]], lib.rise, rtol=1e-5, atol=1e-4)
    assert [c["place"] for c in saved["channels"]] == lib.place.tolist()
    table = (out / "trigger_response.md").read_text()
    assert table.count("\n| ") == 3 + 1  # header and the 3 channels asked for
    assert f"| {lib.top(1)[0]} |" in table
    assert (out / "trigger_response.png").stat().st_size > 1000
    # nothing is overwritten without --overwrite
    assert main(args) == 1
    assert "already exist" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
