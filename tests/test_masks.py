"""The automatic soft mask: the largest blob that stands out of the noise, its raised-cosine edge, nothing for
noise alone, the low-pass it is made at, and refusing bad settings."""

import numpy as np
import pytest

from cryo_forum.errors import InvalidSetting
from cryo_forum.physics.masks import auto_mask, half_map_mask, mask_lowpass, soft_edge

SIZE = 32
PIXEL_SIZE = 2.0


def blob(centre, sigma, height=1.0, size=SIZE):
    z, y, x = np.indices((size,) * 3)
    distance2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    return height * np.exp(-distance2 / (2 * sigma**2))


def test_auto_mask_keeps_the_largest_blob_only():
    rng = np.random.default_rng(0)
    big, small = blob((16, 16, 16), 2.5), blob((3, 16, 16), 1.5)  # 13 px apart
    noisy = big + small + 0.02 * rng.standard_normal((SIZE,) * 3)
    mask = auto_mask(noisy, PIXEL_SIZE, extend_px=1.0, soft_edge_px=2.0)
    assert mask.dtype == np.float32 and mask.shape == (SIZE,) * 3
    assert (mask[big > 0.5] == 1.0).all()
    assert not mask[small > 0.5].any()  # a separate component, though well above the threshold itself
    assert auto_mask(noisy - big, PIXEL_SIZE)[small > 0.5].min() == 1.0  # alone, it is the particle
    assert mask[0, 0, 0] == 0.0


def test_soft_edge_is_a_raised_cosine_beyond_the_extension():
    core = np.zeros((SIZE,) * 3, dtype=bool)
    core[16, 16, 16] = True
    mask = soft_edge(core, extend_px=2.0, soft_edge_px=4.0)
    profile = mask[16, 16, 16:24]  # distance 0 ... 7 along x
    expected = [1.0, 1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 - np.cos(np.pi / 4)), 0.0, 0.0]
    np.testing.assert_allclose(profile, expected, atol=1e-6)
    assert not soft_edge(np.zeros_like(core), 2.0, 4.0).any()


def test_noise_alone_gives_an_empty_mask():
    rng = np.random.default_rng(1)
    for seed in range(3):
        noise = np.random.default_rng(seed).standard_normal((SIZE,) * 3)
        assert not auto_mask(noise, PIXEL_SIZE).any()
    # two independent noise "half maps": their FSC says nothing, their mean has no particle
    assert not half_map_mask(rng.standard_normal((SIZE,) * 3), rng.standard_normal((SIZE,) * 3), PIXEL_SIZE).any()


def test_half_map_mask_holds_the_particle_of_noisy_half_maps():
    rng = np.random.default_rng(2)
    particle = blob((16, 16, 16), 3.0) + blob((20, 14, 15), 2.0, 0.7)
    halves = [particle + 0.1 * rng.standard_normal((SIZE,) * 3) for _ in range(2)]
    mask = half_map_mask(*halves, PIXEL_SIZE)
    assert (mask * particle).sum() / particle.sum() > 0.95
    assert 0.01 < mask.mean() < 0.3


def test_mask_lowpass_is_twice_the_resolution_within_bounds():
    assert mask_lowpass(4.0, 64, 2.0) == 15.0  # never sharper than 15 A
    assert mask_lowpass(10.0, 64, 2.0) == 20.0
    assert mask_lowpass(60.0, 64, 2.0) == 32.0  # never smoother than a quarter of the 128 A box


@pytest.mark.parametrize(
    "options, setting",
    [
        ({"pixel_size": 0.0}, "pixel_size"),
        ({"lowpass_angstrom": -1.0}, "lowpass_angstrom"),
        ({"extend_px": -1.0}, "extend_px"),
        ({"soft_edge_px": float("nan")}, "soft_edge_px"),
    ],
)
def test_bad_settings_are_refused(options, setting):
    arguments = {"pixel_size": PIXEL_SIZE, **options}
    with pytest.raises(InvalidSetting) as error:
        auto_mask(np.zeros((8, 8, 8)), **arguments)
    assert error.value.setting == setting
    with pytest.raises(InvalidSetting, match="cubic"):
        auto_mask(np.zeros((8, 8, 6)), PIXEL_SIZE)
