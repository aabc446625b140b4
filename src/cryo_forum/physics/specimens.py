"""What besides the particle a simulated micrograph patch shows: decoy molecules, broken particles, ice, carbon.

The decoy and broken maps [D, D, D] are built once per simulation seed in NumPy (:func:`outlier_volumes`);
ice textures are drawn per particle in TensorFlow from that particle's uniforms (:func:`ice_images`), so they
depend on nothing but the particle. A carbon film's edge (:func:`carbon_texture`, NumPy) is drawn per particle
from a generator of its own.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from cryo_forum import geometry
from cryo_forum.io.maps import center_of_mass
from cryo_forum.tensorflow_quiet import tf

VARIANTS_PER_KIND = 2  # distinct decoy molecules and broken maps
OUTLIER_MAP_KINDS = ("decoy", "broken")
ICE_BLOBS = 3  # at most, per particle
_BLOB_DRAWS = 7  # centre x, y; semi-axes x, y; angle; edge softness; height
ICE_DRAWS = 1 + ICE_BLOBS * _BLOB_DRAWS + 3  # blob count, blobs, straight edge (whether, angle, offset)
_VARIANT_STREAM = 3  # the NumPy stream of a simulation seed that builds the outlier maps


def _grid(size: int) -> np.ndarray:
    """Voxel coordinates (z, y, x) relative to the box centre, [3, D, D, D]."""
    return np.indices((size,) * 3, dtype=np.float64) - size // 2


def decoy_volume(volume: np.ndarray, rng: np.random.Generator, blobs: int = 40) -> np.ndarray:
    """Another molecule [D, D, D]: Gaussian blobs filling a randomly oriented ellipsoid with the second moments of
    the map's positive density; the total equals the map's."""
    size = volume.shape[0]
    weights = np.clip(volume, 0.0, None)
    offsets = _grid(size).reshape(3, -1) - (center_of_mass(volume) - size // 2)[:, None]
    covariance = (offsets * weights.ravel()) @ offsets.T / weights.sum()
    semi_axes = np.sqrt(5.0 * np.clip(np.linalg.eigvalsh(covariance), 1.0, None))  # solid ellipsoid: var = a^2/5
    directions = rng.standard_normal((blobs, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    inside = directions * rng.uniform(0.0, 1.0, size=(blobs, 1)) ** (1.0 / 3.0) * semi_axes
    centres = inside @ geometry.quaternion_to_matrix(geometry.random_quaternions(1, rng))[0].T
    widths = rng.uniform(0.06, 0.12, size=blobs) * semi_axes.mean() + 1.0
    heights = rng.uniform(0.5, 1.5, size=blobs)
    z, y, x = _grid(size)
    decoy = np.zeros((size,) * 3)
    for (cz, cy, cx), width, height in zip(centres, widths, heights, strict=True):
        decoy += height * np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2.0 * width**2))
    return decoy * (volume.sum() / decoy.sum())


def broken_volume(volume: np.ndarray, rng: np.random.Generator, edge_px: float = 1.5) -> np.ndarray:
    """The map [D, D, D] with the density beyond a random plane removed (soft edge); the plane passes within 0.3
    radii of gyration of the centre of mass, so roughly 40-60 % of the mass goes."""
    size = volume.shape[0]
    weights = np.clip(volume, 0.0, None)
    offsets = _grid(size) - (center_of_mass(volume) - size // 2)[:, None, None, None]
    radius_of_gyration = np.sqrt((np.sum(offsets**2, axis=0) * weights).sum() / weights.sum())
    normal = rng.standard_normal(3)
    normal /= np.linalg.norm(normal)
    distance = np.tensordot(normal, offsets, axes=1) - rng.uniform(-0.3, 0.3) * radius_of_gyration
    return volume / (1.0 + np.exp(distance / edge_px))


def outlier_volumes(volume: np.ndarray, seed: int, kinds) -> dict[str, list[np.ndarray]]:
    """VARIANTS_PER_KIND decoy molecules and broken maps [D, D, D] of a simulation seed, for those of
    OUTLIER_MAP_KINDS among ``kinds``; map k of a kind is the same whichever others are built."""
    builders = dict(zip(OUTLIER_MAP_KINDS, (decoy_volume, broken_volume), strict=True))
    return {
        kind: [
            builders[kind](volume, np.random.default_rng([int(seed), _VARIANT_STREAM, number, k]))
            for k in range(VARIANTS_PER_KIND)
        ]
        for number, kind in enumerate(OUTLIER_MAP_KINDS)
        if kind in kinds
    }


def ice_images(draws: tf.Tensor, canvas: int, box: int) -> tf.Tensor:
    """Ice textures float32 [m, canvas, canvas] from uniforms [m, ICE_DRAWS] in (0, 1), one row per particle.

    One to three soft-edged elliptical blobs about a box of ``box`` px (centres within 0.6 box of its centre,
    semi-axes 0.1-0.45 box, heights 0.5-1), often reaching beyond it, and half the time a straight edge (a carbon
    or ice boundary within 0.4 box of the centre), drawn on the larger canvas with the box in its middle.
    """
    y, x = (tf.constant(axis, tf.float32) for axis in np.indices((canvas, canvas)) - canvas // 2)

    def uniform(column: int, low: float, high: float) -> tf.Tensor:
        return (low + (high - low) * draws[:, column])[:, None, None]

    count = 1.0 + tf.floor(3.0 * draws[:, 0])
    image = tf.zeros([tf.shape(draws)[0], canvas, canvas])
    for blob in range(ICE_BLOBS):
        first = 1 + blob * _BLOB_DRAWS
        cx, cy = uniform(first, -0.6 * box, 0.6 * box), uniform(first + 1, -0.6 * box, 0.6 * box)
        ax, ay = uniform(first + 2, 0.1 * box, 0.45 * box), uniform(first + 3, 0.1 * box, 0.45 * box)
        angle = uniform(first + 4, 0.0, math.pi)
        u = ((x - cx) * tf.cos(angle) + (y - cy) * tf.sin(angle)) / ax
        v = (-(x - cx) * tf.sin(angle) + (y - cy) * tf.cos(angle)) / ay
        edge = (tf.sqrt(u**2 + v**2) - 1.0) * tf.minimum(ax, ay) / uniform(first + 5, 1.0, 4.0)
        drawn = tf.cast(blob < count, tf.float32)[:, None, None]
        image += drawn * uniform(first + 6, 0.5, 1.0) * tf.sigmoid(-edge)
    last = 1 + ICE_BLOBS * _BLOB_DRAWS
    angle = uniform(last + 1, 0.0, 2.0 * math.pi)
    distance = x * tf.cos(angle) + y * tf.sin(angle) - uniform(last + 2, -0.4 * box, 0.4 * box)
    straight = tf.cast(draws[:, last] < 0.5, tf.float32)[:, None, None]
    return image + straight * tf.sigmoid(distance / 1.5)


def carbon_texture(rng: np.random.Generator, canvas: int, box: int) -> np.ndarray:
    """The projected potential of a carbon film's edge, float64 [canvas, canvas], about a box of ``box`` px in the
    canvas's middle (box pixel ``box // 2`` on canvas pixel ``canvas // 2``).

    The film covers one side of a boundary that crosses the box within 0.35 box of its centre, straight half the
    time and otherwise gently curved (a parabola of curvature up to 1 / box, bowing by at most box / 8 across the
    box), with a soft edge of 0.5-2 px. Its thickness is 1 plus amorphous grain: Gaussian texture of standard
    deviation 0.2-0.4, correlated over 1-2 px. Zero off the film.
    """
    y, x = np.indices((canvas, canvas), dtype=np.float64) - canvas // 2
    angle = rng.uniform(0.0, 2.0 * math.pi)
    across = x * math.cos(angle) + y * math.sin(angle)
    along = -x * math.sin(angle) + y * math.cos(angle)
    curvature = 0.0 if rng.uniform() < 0.5 else rng.uniform(-1.0, 1.0) / box
    distance = across - rng.uniform(-0.35, 0.35) * box + 0.5 * curvature * along**2
    film = 0.5 * (1.0 + np.tanh(distance / (2.0 * rng.uniform(0.5, 2.0))))  # a logistic edge
    grain = ndimage.gaussian_filter(rng.standard_normal((canvas, canvas)), rng.uniform(1.0, 2.0), mode="wrap")
    return film * (1.0 + rng.uniform(0.2, 0.4) * grain / grain.std())
