"""The run's figures (``train.plots``), drawn from the logs a run leaves."""

import numpy as np
import pytest
from PIL import Image

from train.plots import plot_loss


def test_the_loss_plot_of_a_single_logged_step_shows_it(tmp_path):
    pytest.importorskip("matplotlib")
    plot_loss([{"step": 10, "loss": 39.2, "lr": 0.07}], str(tmp_path / "loss.png"))
    pixels = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    middle = pixels[h // 4:3 * h // 4, w // 4:3 * w // 4]  # where a lone point lands, away from the axis label
    blue = (np.abs(middle - (31, 119, 180)).sum(axis=2) < 30).sum()  # matplotlib's tab:blue, the loss's colour
    assert blue > 20, "the loss's only point is not drawn"
