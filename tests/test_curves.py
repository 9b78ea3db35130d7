"""The training curves as PNGs: the smoothing against its closed form, the files' properties."""
from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from ddpm import curves


def test_smoothing_of_a_step_is_the_debiased_average_in_closed_form():
    """x_n = 0 before k, 1 from k: s_n = sum_{i=k..n} w^(n-i) / sum_{i=0..n} w^(n-i)
    = (1 - w^(n-k+1)) / (1 - w^(n+1))."""
    span, k, n = 8.0, 5, np.arange(40)
    w = 1 - 1 / span
    expected = np.where(n >= k, (1 - w ** (n - k + 1)) / (1 - w ** (n + 1)), 0.0)
    np.testing.assert_allclose(curves.smooth((n >= k).astype(float), span), expected, rtol=1e-12)


def test_smoothing_keeps_a_constant_and_a_span_of_one_is_no_smoothing():
    np.testing.assert_allclose(curves.smooth([0.7] * 10, 5.0), 0.7, rtol=1e-12)
    values = [3.0, 1.0, 4.0, 1.0, 5.0]
    np.testing.assert_array_equal(curves.smooth(values, 1.0), values)
    assert curves.loss_span(3) == 1.0 and curves.loss_span(5160) == pytest.approx(103.2)


def loss_rows(n: int) -> list[list[float]]:
    rng = np.random.default_rng(0)
    steps = np.arange(1, n + 1) * 50
    return [[float(s), float(0.03 + np.exp(-s / 5000) * (1 + 0.2 * rng.random())), 300.0]
            for s in steps]


@pytest.mark.parametrize("rows", [3, 5160])
def test_the_loss_png_has_one_size_whatever_the_data_and_holds_both_series(tmp_path, rows):
    data = loss_rows(rows)
    curves.write(tmp_path, data, [])
    with Image.open(tmp_path / "loss.png") as png:
        assert png.format == "PNG" and png.size == (640, 400) and png.mode == "RGBA"
        assert "Software" not in png.info  # the bytes follow the pixels, not the library version
        assert len(np.unique(np.asarray(png).reshape(-1, 4), axis=0)) > 10  # drawn, not blank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no temp file, no fid.png
    ax = curves.loss_figure(data).axes[0]
    raw, smoothed = ax.lines
    loss = [row[1] for row in data]
    np.testing.assert_array_equal(raw.get_ydata(), loss)
    np.testing.assert_array_equal(raw.get_xdata(), [row[0] for row in data])
    np.testing.assert_allclose(smoothed.get_ydata(), curves.smooth(loss, curves.loss_span(rows)))
    assert ax.get_yscale() == "log"


def test_a_non_positive_loss_keeps_a_linear_axis():
    ax = curves.loss_figure([[1, 0.5, 1.0], [2, 0.0, 1.0]]).axes[0]
    assert ax.get_yscale() == "linear"


def test_the_fid_png_exists_only_while_there_are_fids(tmp_path):
    fid_rows = [[7, 434, 366.8, 65.0], [14, 868, 301.2, 66.0], [21, 1302, 310.5, 64.0]]
    curves.write(tmp_path, loss_rows(5), fid_rows)
    with Image.open(tmp_path / "fid.png") as png:
        assert png.size == (640, 400)
    ax = curves.fid_figure(fid_rows).axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [7, 14, 21])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [366.8, 301.2, 310.5])
    assert "301.20 at epoch 14" in ax.get_legend().get_texts()[1].get_text()  # the lowest
    curves.write(tmp_path, loss_rows(5), [])  # train.fid_every = 0: no curve, and no stale one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_kids_go_on_a_right_hand_axis_with_their_std(tmp_path):
    """Rows with KID (fid.tsv's columns 5 and 6): a second axis with the KIDs as error bars;
    a row without one (nan: no real features, or a run from before KID) is left out of it."""
    nan = float("nan")
    rows = [[7, 434, 366.8, 65.0, 0.31, 0.01], [14, 868, 301.2, 66.0, nan, nan],
            [21, 1302, 310.5, 64.0, 0.27, 0.02]]
    fig = curves.fid_figure(rows)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "KID"
    bars = fig.axes[1].containers[0]
    np.testing.assert_array_equal(bars.lines[0].get_xdata(), [7, 21])
    np.testing.assert_array_equal(bars.lines[0].get_ydata(), [0.31, 0.27])
    low, high = bars.lines[2][0].get_segments()[1][:, 1]  # the second bar: 0.27 +- 0.02
    assert (low, high) == pytest.approx((0.25, 0.29))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][2].startswith("KID")
    assert len(curves.fid_figure([row[:4] for row in rows]).axes) == 1  # rows of before


def test_a_failed_write_keeps_the_previous_png_whole(tmp_path, monkeypatch):
    curves.write(tmp_path, loss_rows(5), [])
    before = (tmp_path / "loss.png").read_bytes()

    def half_then_fail(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(before[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        curves.write(tmp_path, loss_rows(50), [])
    assert (tmp_path / "loss.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]
