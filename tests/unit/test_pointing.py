"""The pointing game and heat-mass measures (benchmarks/explain_pointing.py), and the
Grad-CAM target stage that measurement chose."""

from __future__ import annotations

import numpy as np
import pytest

from vision_tl.reports.pointing import centre_map, dilate, mass_inside, pointing_hit, random_map


def _mask(shape=(16, 16), at=((4, 12),)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for y, x in at:
        mask[y, x] = True
    return mask


def test_dilate_grows_a_disc_and_stays_in_the_image():
    grown = dilate(_mask(at=((0, 0), (8, 8))), 2)
    assert grown[8, 10] and grown[10, 8] and grown[9, 9] and not grown[10, 10]  # (2, 2) is 2.8 px off
    assert grown[0, 2] and grown[2, 0] and not grown[0, 3]
    assert grown.sum() == 13 + 6  # a full disc of radius 2 and a corner's quarter of one
    np.testing.assert_array_equal(dilate(_mask(), 0), _mask())


def test_a_hit_is_a_maximum_within_tolerance_of_the_mask():
    heat = np.zeros((16, 16))
    heat[4, 9] = 1.0
    mask = _mask()  # the defect 3 px to the right of the peak
    assert not pointing_hit(heat, mask, tolerance=2)
    assert pointing_hit(heat, mask, tolerance=3)
    heat[4, 12] = 0.5  # heat on the defect that is not the maximum does not count
    assert not pointing_hit(heat, mask, tolerance=0)


def test_a_flat_or_split_maximum_is_not_a_hit_by_luck():
    mask = _mask()
    assert not pointing_hit(np.zeros((16, 16)), mask, tolerance=3)  # no evidence anywhere
    heat = np.zeros((16, 16))
    heat[4, 12] = heat[12, 2] = 1.0  # a tie: one peak on the defect, one far away
    assert not pointing_hit(heat, mask, tolerance=1)
    assert pointing_hit(np.zeros((16, 16)), np.ones((16, 16), bool))


def test_mass_inside_is_the_share_of_heat_on_the_mask():
    mask = np.zeros((4, 4), bool)
    mask[:, :1] = True
    assert mass_inside(np.ones((4, 4)), mask) == pytest.approx(0.25)  # uniform: the area share
    heat = np.zeros((4, 4))
    heat[:, 0], heat[0, 3] = 3.0, -5.0  # negative heat is no heat
    assert mass_inside(heat, mask) == pytest.approx(1.0)
    assert mass_inside(np.zeros((4, 4)), mask) == 0.0


def test_bad_inputs_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match=r"one shape, got \(4, 4\) and \(4, 5\)"):
        pointing_hit(np.zeros((4, 4)), np.ones((4, 5), bool))
    with pytest.raises(ValueError, match="mask is empty"):
        pointing_hit(np.ones((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="NaN"):
        mass_inside(np.full((4, 4), np.nan), np.ones((4, 4), bool))


def test_baselines_peak_at_the_centre_and_at_random():
    centre = centre_map((10, 20))
    assert centre.shape == (10, 20)
    assert set(zip(*np.nonzero(centre == centre.max()))) == {(4, 9), (4, 10), (5, 9), (5, 10)}
    a, b = random_map((8, 8), np.random.default_rng(0)), random_map((8, 8), np.random.default_rng(1))
    assert a.argmax() != b.argmax()


def test_gradcam_explains_the_deepest_stage_with_a_grid_fine_enough_for_a_defect():
    """At 128 px Lite0's last stage is a 4 x 4 grid, and the demo's Grad-CAM put its peak on the
    defect less often than a centred Gaussian (benchmarks/explain_pointing.py: 0.15-0.17 against
    0.32; the stride-16 stage: 0.82-0.83). The stage now depends on the input size."""
    import timm

    from vision_tl.reports.explain import MIN_CELLS, target_layer, target_stage

    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    assert [s["reduction"] for s in backbone.feature_info] == [2, 4, 8, 16, 32]
    assert MIN_CELLS == 8
    assert target_stage(backbone, (128, 128))["reduction"] == 16
    assert target_stage(backbone, (256, 256))["reduction"] == 32  # 8 x 8 at the last stage
    assert target_stage(backbone, (96, 160))["reduction"] == 8  # the shorter side counts
    assert target_stage(backbone, (8, 8))["reduction"] == 2  # nothing fine enough: the finest
    assert target_stage(backbone)["module"] == "blocks.4"
    assert target_layer(backbone, (128, 128)) is backbone.blocks[3]
