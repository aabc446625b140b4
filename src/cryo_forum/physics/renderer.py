"""The one forward model of simulated particles, in TensorFlow: draws and images from (seed, particle index).

A particle image is the Fourier-slice projection of the map at a pose drawn uniformly from SO(3) (optionally
reduced to the asymmetric unit of a point group), moved so that it appears at ``box centre - origin`` (a periodic
phase ramp, as RELION's ``rlnOriginX/YAngst`` re-centre it), multiplied in Fourier space by the CTF of its
defocus U/V/angle and B-factor (:mod:`cryo_forum.physics.ctf`) on the box's grid, and given Gaussian noise: white,
or coloured by the settings' ``noise_spectrum`` (the white noise's spectrum times the square root of the relative
power of each coefficient's radial shell, scaled so that the variance over the box is unchanged). The noise level
is one for the whole data set (as a constant dose gives): ``sqrt(var_signal / snr)`` with the mean signal variance
of PILOT_PARTICLES pilot particles, drawn like the real ones from a stream of their own. With a ``ctf_table`` each
particle's CTF parameters (voltage, Cs and amplitude contrast too) are one row of it, drawn uniformly.

Each particle is an outlier with probability ``outlier_fraction``, its kind uniform among ``outlier_kinds``:

* ``noise``: noise only (in a noise-free data set: noise with the signal's standard deviation);
* ``decoy``: another molecule, a pseudo-molecule of Gaussian blobs with the map's size, shape and mass;
* ``broken``: the map cut by a random plane near its centre (a dissociated or damaged particle);
* ``off_centre``: the particle displaced by 25-40 % of the box (a bad pick);
* ``ice``: smooth blobs and an occasional straight edge, 1-3 times the signal's contrast (ice, carbon).

Decoys and broken maps (VARIANTS_PER_KIND of each; a particle draws which) are projected and filtered like
particles. Off-centre particles and ice reach beyond the box, so they are moved and filtered on a canvas twice
as large and cut out: what leaves the box is lost instead of wrapping around.

Every random choice of particle i (pose, origin, defocus, B-factor, half set, outlier kind and variant,
displacement, ice, noise, CTF-table row) comes from its own key, a hash of (seed, i)
(:mod:`cryo_forum.physics.keyed_random`): its image depends on nothing else (to float32 rounding), not on the batch
it is drawn in nor on the number of particles. The seed of the settings fixes what is shared: the outlier maps and
the noise level. The draws of the measured properties (CTF-table row, normal origins) use words of the key far
beyond the others, so settings without them draw exactly what they drew before they existed.
"""

from __future__ import annotations

import math

import numpy as np

from cryo_forum import geometry, resources
from cryo_forum.errors import InvalidSetting
from cryo_forum.physics import keyed_random
from cryo_forum.physics.ctf import compute_ctf_tf
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.settings import CTF_TABLE_COLUMNS, KINDS, SimulationSettings
from cryo_forum.physics.slices import SpectrumTable
from cryo_forum.physics.specimens import ICE_DRAWS, VARIANTS_PER_KIND, ice_images, outlier_volumes
from cryo_forum.tensorflow_quiet import tf

"""Particle kinds; a draw's ``kind`` is an index into this tuple (0: a particle)."""
PILOT_PARTICLES = 256
_PARTICLES, _PILOTS = 0, 1  # key domains of a seed: the particles, the pilot particles
_UNIFORMS = {  # a particle's uniform draws, in order
    "defocus": 1,
    "astigmatism": 1,
    "defocus_angle": 1,
    "bfactor": 1,
    "origin": 2,
    "subset": 1,
    "outlier": 1,
    "kind": 1,
    "variant": 1,
    "displacement": 2,  # direction, reach
    "ice_contrast": 1,
    "ice": ICE_DRAWS,
}
_COLUMNS = dict(zip(_UNIFORMS, np.cumsum([0, *_UNIFORMS.values()])[:-1].tolist(), strict=True))
_UNIFORM_COUNT = sum(_UNIFORMS.values())
_POSE_WORD = 0  # the random words of a particle's key: 4 normals of its pose, its uniforms, then its noise
_UNIFORM_WORD = _POSE_WORD + keyed_random.words_for(4)
_NOISE_WORD = _UNIFORM_WORD + keyed_random.words_for(_UNIFORM_COUNT)
_TABLE_ROW_WORD = 2**32  # beyond the noise words of any box (D^2 / 2 of them): the uniform of a CTF-table row
_NORMAL_ORIGIN_WORD = _TABLE_ROW_WORD + 1  # two normals of a normal origin
_OPTICS = CTF_TABLE_COLUMNS[3:6]  # voltage, spherical_aberration, amplitude_contrast: fixed by the settings


# Quaternion algebra of :mod:`cryo_forum.geometry` ([x, y, z, w], Hamilton product), written out here because
# geometry's TensorFlow versions import tensorflow-graphics, a slow import for two small formulas.


def _multiply(q1: tf.Tensor, q2: tf.Tensor) -> tf.Tensor:
    """Hamilton products [..., 4] of quaternions [..., 4] (broadcast): ``R(q1 q2) = R(q1) R(q2)``."""
    x1, y1, z1, w1 = tf.unstack(q1, axis=-1)
    x2, y2, z2, w2 = tf.unstack(q2, axis=-1)
    return tf.stack(
        [
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        ],
        axis=-1,
    )


def _rotation_matrices(q: tf.Tensor) -> tf.Tensor:
    """Rotation matrices [B, 3, 3] of unit quaternions [B, 4]."""
    x, y, z, w = tf.unstack(q, axis=-1)
    rows = [
        [1.0 - 2.0 * (y * y + z * z), 2.0 * (x * y - z * w), 2.0 * (x * z + y * w)],
        [2.0 * (x * y + z * w), 1.0 - 2.0 * (x * x + z * z), 2.0 * (y * z - x * w)],
        [2.0 * (x * z - y * w), 2.0 * (y * z + x * w), 1.0 - 2.0 * (x * x + y * y)],
    ]
    return tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)


class ParticleRenderer:
    """Particles of a cubic map [D, D, D] (boxed, float) at ``pixel_size`` A/px, as :class:`SimulationSettings` say.

    :meth:`render` gives the images float32 [B, D, D] and the draws of any particles of the stream of a seed.
    Memory: one spectrum table of ``(2 D + 2)^3`` complex64 values per map (17 MB at D = 64), five maps when
    decoys and broken particles are asked for.
    """

    def __init__(self, volume: np.ndarray, pixel_size: float, settings: SimulationSettings):
        volume = np.asarray(volume, dtype=np.float64)
        self.size = int(volume.shape[0])
        self.pixel_size = float(pixel_size)
        self.settings = settings
        kinds = set(settings.outlier_kinds) if settings.outlier_fraction > 0 else set()
        maps = [volume]
        map_numbers = np.zeros((len(KINDS), VARIANTS_PER_KIND), dtype=np.int32)  # per (kind, variant)
        for kind, variants in outlier_volumes(volume, settings.seed, kinds).items():
            map_numbers[KINDS.index(kind)] = len(maps) + np.arange(VARIANTS_PER_KIND)
            maps += variants
        self._table = SpectrumTable(maps)
        self._map_numbers = tf.constant(map_numbers)
        self._projected = tf.constant([kind not in ("noise", "ice") for kind in KINDS])
        self._kind_codes = tf.constant([KINDS.index(kind) for kind in settings.outlier_kinds], tf.int32)
        self._beyond_box = bool(kinds & {"off_centre", "ice"})
        self._mates = None
        if geometry.normalise_symmetry_name(settings.symmetry) != "C1":
            group = geometry.quaternion_conjugate(geometry.symmetry_quaternions(settings.symmetry))
            self._mates = tf.constant(group, tf.float32)
        self._box, self._canvas = FourierGrid(self.size), FourierGrid(2 * self.size)
        self._noise_filter = None
        if settings.noise_spectrum is not None:
            self._noise_filter = tf.constant(noise_filter(self.size, settings.noise_spectrum), tf.complex64)
        self._ctf_rows = None
        if settings.ctf_table is not None:
            self._ctf_rows = tf.constant(settings.ctf_table, tf.float32)  # [R, len(CTF_TABLE_COLUMNS)]
        self.signal_std, self.noise_std = self._noise_levels()
        self._render = tf.function(
            self._render_eager,
            input_signature=[
                tf.TensorSpec([None], tf.int64),  # particle indices
                tf.TensorSpec([], tf.int64),  # stream seed
                tf.TensorSpec([], tf.float32),  # noise factor
            ],
            autograph=False,  # plain Python control flow only: converting this call tree is slow and buys nothing
        )

    # ------------------------------------------------------------ drawing

    def draw(self, index, seed: int) -> dict[str, tf.Tensor]:
        """The random choices behind particles ``index`` (int64 [B]) of the stream of ``seed``.

        Float32 ``quaternion`` [B, 4] (uniform, or in the asymmetric unit; canonical), ``origin`` [B, 2] (px, x
        then y), the CTF parameters ``defocus_u``, ``defocus_v``, ``defocus_angle``, ``voltage``,
        ``spherical_aberration``, ``amplitude_contrast``, ``bfactor``, ``phase_shift`` [B] (CTF_TABLE_COLUMNS, in
        compute_ctf units; the settings' constants where no ctf_table says otherwise), ``displacement`` [B, 2]
        (px, the extra move of off-centre outliers), ``ice_contrast`` [B] and ``ice`` [B, ICE_DRAWS] (the uniforms
        of its texture); int32 ``kind`` [B] (index into KINDS), ``variant`` [B] (which decoy or broken map),
        ``subset`` [B] (half set, 1 or 2) and ``ctf_row`` [B] (the row of the ctf_table, 0 without one).
        """
        index = tf.convert_to_tensor(index, tf.int64)
        return self._draw(keyed_random.particle_keys(seed, _PARTICLES, index))

    def _draw(self, keys: tf.Tensor) -> dict[str, tf.Tensor]:
        s = self.settings
        u = keyed_random.uniforms(keys, _UNIFORM_COUNT, _UNIFORM_WORD)

        def uniform(name: str, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
            column = _COLUMNS[name]
            return low + (high - low) * u[:, column : column + _UNIFORMS[name]]

        def choice(name: str, count: int) -> tf.Tensor:
            return tf.minimum(tf.cast(uniform(name)[:, 0] * count, tf.int32), count - 1)

        q = keyed_random.normals(keys, 4, _POSE_WORD)
        q = geometry.canonical_quaternion_tf(q / tf.norm(q, axis=-1, keepdims=True))
        if self._mates is not None:
            q = self._reduce_to_asymmetric_unit(q)
        outlier = uniform("outlier")[:, 0] < s.outlier_fraction
        direction, reach = tf.unstack(uniform("displacement"), axis=1)
        reach = (0.25 + 0.15 * reach) * self.size
        direction = 2.0 * math.pi * direction
        return {
            "quaternion": q,
            "origin": self._origins(keys, uniform("origin", -s.max_shift_px, s.max_shift_px)),
            **self._ctf_draws(keys, uniform),
            "subset": 1 + choice("subset", 2),
            "kind": tf.where(outlier, tf.gather(self._kind_codes, choice("kind", len(s.outlier_kinds))), 0),
            "variant": choice("variant", VARIANTS_PER_KIND),
            "displacement": reach[:, None] * tf.stack([tf.cos(direction), tf.sin(direction)], axis=-1),
            "ice_contrast": uniform("ice_contrast", 1.0, 3.0)[:, 0],
            "ice": uniform("ice"),
        }

    def _origins(self, keys: tf.Tensor, uniform_origins: tf.Tensor) -> tf.Tensor:
        """Origins [B, 2] (px): the uniform ones, or normal of std origin_sigma_px (clipped at max_shift_px > 0)."""
        s = self.settings
        if s.origin_sigma_px is None:
            return uniform_origins
        origins = s.origin_sigma_px * keyed_random.normals(keys, 2, _NORMAL_ORIGIN_WORD)
        return tf.clip_by_value(origins, -s.max_shift_px, s.max_shift_px) if s.max_shift_px > 0 else origins

    def _ctf_draws(self, keys: tf.Tensor, uniform) -> dict[str, tf.Tensor]:
        """The CTF_TABLE_COLUMNS [B] and ``ctf_row`` [B] of particles: a row of the ctf_table each, or drawn from
        the settings' ranges with their fixed optics (``uniform(name, low, high)`` gives the particle uniforms)."""
        s = self.settings
        count = tf.shape(keys)[0]
        if self._ctf_rows is not None:
            rows = len(s.ctf_table)
            row = tf.cast(keyed_random.uniforms(keys, 1, _TABLE_ROW_WORD)[:, 0] * rows, tf.int32)
            row = tf.minimum(row, rows - 1)
            columns = tf.unstack(tf.gather(self._ctf_rows, row), axis=1)
            return {**dict(zip(CTF_TABLE_COLUMNS, columns, strict=True)), "ctf_row": row}
        mean_defocus = uniform("defocus", *s.defocus_range)[:, 0]
        astigmatism = uniform("astigmatism", 0.0, s.astigmatism)[:, 0]
        optics = dict(zip(_OPTICS, (s.voltage, s.cs, s.amplitude_contrast), strict=True))
        return {
            "defocus_u": mean_defocus + astigmatism / 2.0,
            "defocus_v": mean_defocus - astigmatism / 2.0,
            "defocus_angle": uniform("defocus_angle", 0.0, 180.0)[:, 0],
            **{name: tf.fill([count], float(value)) for name, value in optics.items()},
            "bfactor": uniform("bfactor", *s.bfactor_range)[:, 0],
            "phase_shift": tf.zeros([count]),
            "ctf_row": tf.zeros([count], tf.int32),
        }

    def _reduce_to_asymmetric_unit(self, q: tf.Tensor) -> tf.Tensor:
        """TF twin of geometry.reduce_to_asymmetric_unit: the mate ``A g^T`` with the largest |w|, [B, 4]."""
        mates = _multiply(q[:, None, :], self._mates)  # [B, G, 4]
        best = tf.argmax(tf.abs(mates[..., 3]), axis=1, output_type=tf.int32)
        return geometry.canonical_quaternion_tf(tf.gather(mates, best, batch_dims=1))

    # ------------------------------------------------------------ rendering

    def render(self, index, seed: int, noise_factor=1.0) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """Images float32 [B, D, D] (noise included) and :meth:`draw`'s draws of particles ``index`` (int64 [B]).

        ``noise_factor`` (a float32 scalar) multiplies the noise: a training curriculum renders the same particles
        at a higher SNR, ``snr / noise_factor^2``."""
        index = tf.convert_to_tensor(index, tf.int64)
        return self._render(index, tf.constant(seed, tf.int64), tf.cast(noise_factor, tf.float32))

    def _render_eager(self, index: tf.Tensor, seed: tf.Tensor, noise_factor: tf.Tensor) -> tuple[tf.Tensor, dict]:
        keys = keyed_random.particle_keys(seed, _PARTICLES, index)
        draws = self._draw(keys)
        images = self.signal(draws)
        noise = self._unit_noise(keys)
        if self.noise_std > 0.0:
            images += self.noise_std * noise_factor * noise
        else:  # noise outliers of a noise-free data set: noise with the signal's standard deviation
            images = tf.where((draws["kind"] == KINDS.index("noise"))[:, None, None], self.signal_std * noise, images)
        return images, draws

    def unit_noise(self, index, seed: int) -> tf.Tensor:
        """The noise of particles ``index`` (int64 [B]) of the stream of ``seed`` before scaling: float32 [B, D, D]
        of expected variance 1 over the box, coloured by the settings' noise_spectrum. :meth:`render` adds
        ``noise_std`` times it."""
        return self._unit_noise(keyed_random.particle_keys(seed, _PARTICLES, tf.convert_to_tensor(index, tf.int64)))

    def _unit_noise(self, keys: tf.Tensor) -> tf.Tensor:
        white = tf.reshape(keyed_random.normals(keys, self.size**2, _NOISE_WORD), [-1, self.size, self.size])
        if self._noise_filter is None:
            return white
        return tf.signal.irfft2d(tf.signal.rfft2d(white) * self._noise_filter, fft_length=[self.size, self.size])

    def signal(self, draws: dict[str, tf.Tensor]) -> tf.Tensor:
        """Noise-free images float32 [B, D, D] of the particles ``draws`` describe (see :meth:`draw`)."""
        kind = draws["kind"]
        maps = tf.gather_nd(self._map_numbers, tf.stack([kind, draws["variant"]], axis=-1))
        spectra = self._slices(draws["quaternion"], maps, tf.gather(self._projected, kind))
        images = self._filtered(spectra, self._box, self.size // 2 - draws["origin"], draws)
        if not self._beyond_box:
            return images
        rows = tf.where((kind == KINDS.index("off_centre")) | (kind == KINDS.index("ice")))
        chosen = {key: tf.gather_nd(value, rows) for key, value in draws.items()}
        return tf.tensor_scatter_nd_update(images, rows, self._beyond_box_images(tf.gather_nd(spectra, rows), chosen))

    def _slices(self, quaternions: tf.Tensor, maps: tf.Tensor, projected: tf.Tensor) -> tf.Tensor:
        """Central slices complex64 [B, D, D // 2 + 1] of maps ``maps`` [B]; zero where not ``projected`` [B]."""
        matrices = _rotation_matrices(quaternions)
        return self._table.half_planes(matrices, maps) * tf.cast(projected, tf.complex64)[:, None, None]

    def _filtered(self, spectra: tf.Tensor, grid: FourierGrid, shifts: tf.Tensor, draws) -> tf.Tensor:
        """Real images [m, S, S] of half-plane spectra [m, S, S // 2 + 1] (phases about pixel 0) moved by shifts
        [m, 2] (px, x then y; periodic) and multiplied by the CTF of ``draws`` (if the settings have one)."""
        size = grid.size
        kx, ky = (((-2.0 * math.pi / size) * k).astype(np.float32) for k in (grid.kx[0], grid.ky[:, 0]))
        ramp_x = tf.exp(tf.complex(0.0, shifts[:, 0, None] * kx))  # [m, S // 2 + 1]
        ramp_y = tf.exp(tf.complex(0.0, shifts[:, 1, None] * ky))  # [m, S]
        spectra = spectra * ramp_y[:, :, None] * ramp_x[:, None, :]
        if self.settings.ctf:
            spectra *= tf.complex(self._ctf(size, draws), 0.0)
        return tf.signal.irfft2d(spectra, fft_length=[size, size])

    def _ctf(self, size: int, draws) -> tf.Tensor:
        return compute_ctf_tf(size, self.pixel_size, *(draws[name] for name in CTF_TABLE_COLUMNS), rfft=True)

    def canvas_images(self, canvases, draws: dict[str, tf.Tensor]) -> tf.Tensor:
        """Textures float32 [m, 2D, 2D] (the box in their middle: box pixel D // 2 on canvas pixel D) multiplied by
        the CTF of ``draws`` on the canvas and cut to the box: [m, D, D]. What lies beyond the box contributes
        through the CTF's spread without wrapping around; this is how ice is drawn, and how other textures of
        a micrograph (a carbon film's edge) can be."""
        canvases = tf.convert_to_tensor(canvases, tf.float32)
        return self._cut_from_canvas(canvases, tf.zeros([tf.shape(canvases)[0], 2]), draws)

    def _cut_from_canvas(self, canvases: tf.Tensor, shifts: tf.Tensor, draws) -> tf.Tensor:
        """Canvases [m, 2D, 2D] moved by shifts [m, 2] (px), CTF-filtered and cut to the box [m, D, D]."""
        size = self.size
        start = size - size // 2  # the box's place in the canvas: its centre on the canvas centre
        out = self._filtered(tf.signal.rfft2d(canvases), self._canvas, shifts, draws)
        return out[:, start : start + size, start : start + size]

    def _beyond_box_images(self, spectra: tf.Tensor, draws) -> tf.Tensor:
        """Off-centre particles and ice [m, D, D]: moved and CTF-filtered on a canvas [m, 2D, 2D], cut out."""
        size = self.size
        centred = tf.roll(tf.signal.irfft2d(spectra, fft_length=[size, size]), [size // 2] * 2, axis=[1, 2])
        start = size - size // 2  # the box's place in the canvas: its centre on the canvas centre
        canvas = tf.pad(centred, [[0, 0], [start, size - start], [start, size - start]])
        ice = draws["kind"] == KINDS.index("ice")
        canvas = tf.where(ice[:, None, None], ice_images(draws["ice"], 2 * size, size), canvas)
        shifts = tf.where(ice[:, None], 0.0, draws["displacement"] - draws["origin"])
        out = self._cut_from_canvas(canvas, shifts, draws)
        # ice contrast relative to particles, after the CTF's high-pass
        scale = draws["ice_contrast"] * self.signal_std / tf.maximum(tf.math.reduce_std(out, axis=[1, 2]), 1e-12)
        return out * tf.where(ice, scale, 1.0)[:, None, None]

    def _noise_levels(self) -> tuple[float, float]:
        """(signal std, noise std): the signal's from the pilot particles of the settings' seed (centred particles,
        CTF-filtered), the noise's from it and ``snr`` (0 without noise)."""
        chunk = resources.chunk_of(PILOT_PARTICLES, self.size**2)
        variances = []
        for start in range(0, PILOT_PARTICLES, chunk):
            index = tf.range(start, min(start + chunk, PILOT_PARTICLES), dtype=tf.int64)
            draws = self._draw(keyed_random.particle_keys(self.settings.seed, _PILOTS, index))
            inliers = tf.zeros_like(draws["kind"])
            spectra = self._slices(draws["quaternion"], inliers, tf.ones_like(inliers, tf.bool))
            images = self._filtered(spectra, self._box, tf.fill([len(index), 2], float(self.size // 2)), draws)
            variances.append(tf.math.reduce_variance(images, axis=[1, 2]).numpy())
        signal_std = float(np.sqrt(np.mean(np.concatenate(variances), dtype=np.float64)))
        snr = self.settings.snr
        return signal_std, 0.0 if snr is None else signal_std / math.sqrt(snr)


def noise_filter(size: int, spectrum) -> np.ndarray:
    """Amplitudes float64 [D, D // 2 + 1] (rfft2 layout) that colour white noise of a D px box: the square root of
    ``spectrum``'s relative power at each coefficient's integer radial shell (shells beyond ``D // 2``, the box's
    corners, take the last value), scaled to mean power 1 over the full plane, so the variance stays the same.

    Raises :class:`~cryo_forum.errors.InvalidSetting` ``noise_spectrum`` unless ``spectrum`` holds ``D // 2 + 1``
    values.
    """
    spectrum = np.asarray(spectrum, dtype=np.float64)
    if spectrum.shape != (size // 2 + 1,):
        message = f"needs D // 2 + 1 = {size // 2 + 1} values for a {size} px box, got {spectrum.size}"
        raise InvalidSetting("noise_spectrum", message)
    grid = FourierGrid(size)
    power = spectrum[np.minimum(grid.shells, size // 2)]
    mean_power = np.sum(grid.hermitian_weights * power) / size**2
    return np.sqrt(power / mean_power)
