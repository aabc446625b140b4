"""Training from a map: fresh simulated particles for every batch, generated in TensorFlow inside tf.data.

:class:`SyntheticParticles` draws and renders particles like :mod:`~cryo_forum.streams.simulation` (same image model,
same distributions of pose, defocus, B-factor and shift, the same absolute noise level, the same outlier kinds and the
same decoy and broken maps for a settings seed), so training batches and the fixed validation and test sets a run
writes with :func:`write_simulation` are statistically alike. Differences, all in how draws
are made rather than in what is drawn:

* random numbers come from TensorFlow's stateless generators, seeded by ``(seed, batch number)``;
* each particle is an outlier with probability ``outlier_fraction`` (simulate.py labels exactly
  ``round(fraction * n)``) and its kind is uniform among ``outlier_kinds`` (simulate.py cycles through them);
* ice comes from a bank of ICE_BANK_SIZE canvases drawn at construction, each used in its 8 flips and
  transpositions, with a fresh CTF and contrast every time.

Speed: the projections, shifts and CTFs of a whole batch are one XLA-compiled function with static shapes
(all maps in one table, one map per particle); only off-centre particles and ice, a few per batch, take the
dynamic canvas path. A batch of 64 at 64 px costs about 12-15 ms of CPU (2-core machine).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cryo_forum import geometry
from cryo_forum.physics.ctf import compute_ctf_tf
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.streams.preprocess import CTF_KEYS
from cryo_forum.streams.simulation import (
    INLIER_KIND,
    OUTLIER_KINDS,
    VARIANTS_PER_KIND,
    SimulationSettings,
    boxed_volume,
    ice_image,
    noise_levels,
    stream_rng,
    variant_projectors,
)
from cryo_forum.tensorflow_quiet import tf

KINDS = (INLIER_KIND, *OUTLIER_KINDS)
"""Particle kinds; the ``kind`` draw is an index into this tuple (0: a particle)."""
ICE_BANK_SIZE = 128
_ICE_BANK_STREAM = 4  # after simulate.py's streams 0-3 of the settings seed
_ICE_TRANSFORMS = 8  # flips and transpositions of a square canvas
_DRAWS = 13  # independent random streams of one batch's draws


class _SliceTable:
    """Central slices of several maps, one map per particle, as FourierProjector computes them.

    The same lookup (trilinear in the oversampled spectrum, read only strictly below Nyquist), with the
    projectors' spectra stacked in one table, each wrapped by one periodic plane per axis (no modulo for the
    upper corners), and only the frequencies inside the Nyquist circle read. Static shapes let XLA compile it.
    """

    def __init__(self, projectors: list[FourierProjector]):
        size, padded, over = projectors[0].size, projectors[0].padded_size, projectors[0].oversampling
        self.size, self.maps, self._wrapped = size, len(projectors), padded + 1
        self._centre = float(padded // 2)
        cubes = [np.pad(p._spectrum.numpy().reshape((padded,) * 3), [(0, 1)] * 3, mode="wrap") for p in projectors]
        self._table = tf.constant(np.concatenate([cube.ravel() for cube in cubes]))
        ky, kx = np.meshgrid(np.fft.fftfreq(size) * size, np.arange(size // 2 + 1.0), indexing="ij")
        inside = np.hypot(kx, ky) < size / 2.0
        self._points = tf.constant(np.stack([kx[inside], ky[inside]], axis=-1) * over, tf.float32)  # [P, 2]
        layout = np.full(inside.size, inside.sum(), dtype=np.int32)  # half-plane position -> point (or a zero)
        layout[inside.ravel()] = np.arange(inside.sum())
        self._layout = tf.constant(layout)
        corners = np.indices((2, 2, 2)).reshape(3, -1)  # (z, y, x) bits, x fastest
        q = self._wrapped
        self._corners = tf.constant((corners[0] * q + corners[1]) * q + corners[2], tf.int32)

    def __call__(self, quaternions: tf.Tensor, maps: tf.Tensor) -> tf.Tensor:
        """Half-plane spectra complex64 [B, D, D // 2 + 1] (origin at pixel 0) of map ``maps`` [B] at each pose;
        zeros where ``maps`` is the number of maps."""
        q = self._wrapped
        matrices = geometry.quaternion_to_matrix_tf(quaternions / tf.norm(quaternions, axis=-1, keepdims=True))
        coords = tf.einsum("pj,njc->npc", self._points, matrices[:, :2, :]) + self._centre  # [B, P, (x, y, z)]
        base = tf.floor(coords)
        frac = tf.complex(coords - base, 0.0)
        base = tf.cast(base, tf.int32)
        first = (base[..., 2] * q + base[..., 1]) * q + base[..., 0] + tf.minimum(maps, self.maps - 1)[:, None] * q**3
        values = tf.gather(self._table, first[..., None] + self._corners)  # [B, P, 8]
        values = tf.reshape(values, [-1, self._points.shape[0], 2, 2, 2])
        for axis in range(3):  # interpolate along x, then y, then z
            values = values[..., 0] + frac[..., axis, *(None,) * (2 - axis)] * (values[..., 1] - values[..., 0])
        values *= tf.cast(maps < self.maps, tf.complex64)[:, None]
        values = tf.concat([values, tf.zeros_like(values[:, :1])], axis=1)
        return tf.reshape(tf.gather(values, self._layout, axis=1), [-1, self.size, self.size // 2 + 1])


class SyntheticParticles:
    """An endless source of simulated particles of a map [z, y, x], drawn per batch in TensorFlow.

    The map is boxed as simulate.py boxes it (cubic, padded or cropped about voxel D // 2 to ``size``). The
    settings' ``seed`` fixes what is built once (decoy and broken maps, ice bank, noise level); ``n`` is unused.
    Memory: (2 D + 1)^3 complex64 values per map (17 MB at D = 64), five maps when decoys and broken
    particles are asked for.
    """

    def __init__(self, volume: np.ndarray, pixel_size: float, settings: SimulationSettings, size: int | None = None):
        settings.validate()
        self.settings = settings
        self.pixel_size = float(pixel_size)
        self.volume = boxed_volume(volume, pixel_size, size)
        self.size = self.volume.shape[0]
        projector = FourierProjector(self.volume)
        self.signal_std, self.noise_std = noise_levels(projector, self.pixel_size, settings)
        kinds = set(settings.outlier_kinds) if settings.outlier_fraction > 0 else set()
        self._kind_codes = tf.constant([KINDS.index(kind) for kind in settings.outlier_kinds], tf.int32)
        self._beyond_box = bool(kinds & {"off_centre", "ice"})

        # The map of each (kind, variant): 0 the particle's, then decoys and broken maps; noise and ice none.
        variants = variant_projectors(self.volume, settings.seed, kinds)
        self._slices = _SliceTable([projector, *(p for kind in variants for p in variants[kind])])
        maps = np.zeros((len(KINDS), VARIANTS_PER_KIND), dtype=np.int32)
        maps[[KINDS.index("noise"), KINDS.index("ice")]] = self._slices.maps
        for number, kind in enumerate(variants):
            maps[KINDS.index(kind)] = 1 + number * VARIANTS_PER_KIND + np.arange(VARIANTS_PER_KIND)
        self._maps = tf.constant(maps)

        self._ice_bank = None
        if "ice" in kinds:
            bank = [
                ice_image(2 * self.size, self.size, stream_rng(settings.seed, _ICE_BANK_STREAM, k))
                for k in range(ICE_BANK_SIZE)
            ]
            self._ice_bank = tf.constant(np.stack(bank), tf.float32)
        self._mates = None
        if geometry.normalise_symmetry_name(settings.symmetry) != "C1":
            group = geometry.quaternion_conjugate(geometry.symmetry_quaternions(settings.symmetry))
            self._mates = tf.constant(group, tf.float32)

    # ------------------------------------------------------------ drawing

    def draw(self, batch_size: int, seed) -> dict[str, tf.Tensor]:
        """The random choices behind ``batch_size`` particles, from a stateless seed (int tensor [2]).

        Returns float32 ``quaternion`` [B, 4] (uniform, or in the asymmetric unit), ``origin`` [B, 2] (px, x
        then y), ``defocus_u``, ``defocus_v``, ``defocus_angle``, ``bfactor`` [B] (compute_ctf units),
        ``displacement`` [B, 2] (px, the extra move of off-centre outliers), ``ice_contrast`` [B]; int32
        ``kind`` [B] (index into KINDS), ``variant`` [B] (which decoy or broken map), ``ice`` [B] (bank entry
        * 8 + flip code).
        """
        s, b = self.settings, batch_size
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), _DRAWS)

        def uniform(stream: int, shape, low: float, high: float) -> tf.Tensor:
            return tf.random.stateless_uniform(shape, seeds[stream], low, high)

        def integers(stream: int, high: int) -> tf.Tensor:
            return tf.random.stateless_uniform([b], seeds[stream], 0, high, dtype=tf.int32)

        q = tf.random.stateless_normal([b, 4], seeds[0])
        q = geometry.canonical_quaternion_tf(q / tf.norm(q, axis=-1, keepdims=True))
        if self._mates is not None:
            q = self._reduce_to_asymmetric_unit(q)
        mean_defocus = uniform(1, [b], *s.defocus_range)
        astigmatism = uniform(2, [b], 0.0, s.astigmatism)
        outlier = uniform(6, [b], 0.0, 1.0) < s.outlier_fraction
        angle = uniform(9, [b], 0.0, 2.0 * np.pi)
        reach = uniform(10, [b], 0.25, 0.4) * self.size
        return {
            "quaternion": q,
            "origin": uniform(5, [b, 2], -s.shift_px, s.shift_px),
            "defocus_u": mean_defocus + astigmatism / 2.0,
            "defocus_v": mean_defocus - astigmatism / 2.0,
            "defocus_angle": uniform(3, [b], 0.0, 180.0),
            "bfactor": uniform(4, [b], *s.bfactor_range),
            "kind": tf.where(outlier, tf.gather(self._kind_codes, integers(7, len(s.outlier_kinds))), 0),
            "variant": integers(8, VARIANTS_PER_KIND),
            "displacement": reach[:, None] * tf.stack([tf.cos(angle), tf.sin(angle)], axis=-1),
            "ice": integers(11, ICE_BANK_SIZE * _ICE_TRANSFORMS),
            "ice_contrast": uniform(12, [b], 1.0, 3.0),
        }

    def _reduce_to_asymmetric_unit(self, q: tf.Tensor) -> tf.Tensor:
        """TF twin of geometry.reduce_to_asymmetric_unit: the mate ``A g^T`` with the largest |w|, [B, 4]."""
        mates = geometry.quaternion_multiply_tf(q[:, None, :], self._mates)  # [B, G, 4]
        best = tf.argmax(tf.abs(mates[..., 3]), axis=1, output_type=tf.int32)
        return geometry.canonical_quaternion_tf(tf.gather(mates, best, batch_dims=1))

    # ------------------------------------------------------------ rendering

    def render(self, draws: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Noise-free images float32 [B, D, D] of the particles :meth:`draw` describes (or any such dict).

        Particles, decoys and broken maps: the projection moved by ``-origin`` (periodic phase ramp) and
        multiplied by the CTF on the box's grid, simulate.py's rendering to float32 precision. Off-centre
        particles and ice are moved and filtered on a canvas [2D, 2D] and cut out, as simulate.py does.
        """
        draws = {key: tf.convert_to_tensor(value) for key, value in draws.items()}
        draws = {
            key: tf.cast(value, tf.float32 if value.dtype.is_floating else tf.int32) for key, value in draws.items()
        }
        maps = tf.gather_nd(self._maps, tf.stack([draws["kind"], draws["variant"]], axis=-1))
        ctf = {key: draws[key] for key in ("defocus_u", "defocus_v", "defocus_angle", "bfactor")}
        images, spectra = self._render_in_box(draws["quaternion"], maps, draws["origin"], ctf)
        if self._beyond_box:
            kind = draws["kind"]
            rows = tf.where((kind == KINDS.index("off_centre")) | (kind == KINDS.index("ice")))
            chosen = {key: tf.gather_nd(value, rows) for key, value in draws.items()}
            moved = self._render_beyond_box(tf.gather_nd(spectra, rows), chosen)
            images = tf.tensor_scatter_nd_update(images, rows, moved)
        return images

    def _render_in_box(self, quaternions, maps, origins, ctf):
        """Images [B, D, D] moved and CTF-filtered in the box, and the centred slices [B, D, D // 2 + 1]."""
        spectra = self._compiled_slices(quaternions, maps)
        shifts = self.size // 2 - origins  # the image centre is pixel D // 2
        images = tf.signal.irfft2d(spectra * self._transfer(self.size, shifts, ctf), fft_length=[self.size] * 2)
        return images, spectra

    @tf.function(jit_compile=True)
    def _compiled_slices(self, quaternions, maps):
        return self._slices(quaternions, maps)  # XLA fuses the interpolation: ten times faster than plain TF

    def _transfer(self, size: int, shifts: tf.Tensor, ctf: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Half-plane multiplier complex64 [m, S, S // 2 + 1]: a move by shifts [m, 2] (px) times the CTF.

        The columns are the full grid's first S // 2 + 1 (frequency -1/2 at an even S's Nyquist column, which
        gives the same real image as +1/2)."""
        half = size // 2 + 1
        freq = np.fft.fftfreq(size).astype(np.float32)
        shifts = tf.cast(shifts, tf.float32)
        ramp_x = tf.exp(tf.complex(0.0, (-2.0 * np.pi) * shifts[:, 0, None] * freq[:half]))  # [m, S // 2 + 1]
        ramp_y = tf.exp(tf.complex(0.0, (-2.0 * np.pi) * shifts[:, 1, None] * freq))  # [m, S]
        multiplier = ramp_y[:, :, None] * ramp_x[:, None, :]
        if not self.settings.ctf:
            return multiplier
        s = self.settings
        values = compute_ctf_tf(
            size,
            self.pixel_size,
            ctf["defocus_u"],
            ctf["defocus_v"],
            ctf["defocus_angle"],
            s.voltage,
            s.cs,
            s.amplitude_contrast,
            ctf["bfactor"],
        )
        return multiplier * tf.complex(values[..., :half], 0.0)

    def _render_beyond_box(self, spectra: tf.Tensor, draws: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """Off-centre particles and ice [m, D, D]: moved and CTF-filtered on a canvas [m, 2D, 2D], cut out."""
        size = self.size
        centred = tf.roll(tf.signal.irfft2d(spectra, fft_length=[size, size]), [size // 2] * 2, axis=[1, 2])
        start = size - size // 2  # the box's place in the canvas: its centre on the canvas centre
        canvas = tf.pad(centred, [[0, 0], [start, size - start], [start, size - start]])
        ice = draws["kind"] == KINDS.index("ice")
        if self._ice_bank is not None:
            canvas = tf.where(ice[:, None, None], self._ice_canvases(draws["ice"]), canvas)
        shifts = tf.where(ice[:, None], 0.0, draws["displacement"] - draws["origin"])
        transfer = self._transfer(2 * size, shifts, draws)
        out = tf.signal.irfft2d(tf.signal.rfft2d(canvas) * transfer, fft_length=[2 * size] * 2)
        out = out[:, start : start + size, start : start + size]
        # ice contrast relative to particles, after the CTF's high-pass
        scale = draws["ice_contrast"] * self.signal_std / tf.maximum(tf.math.reduce_std(out, axis=[1, 2]), 1e-12)
        return out * tf.where(ice, scale, 1.0)[:, None, None]

    def _ice_canvases(self, codes: tf.Tensor) -> tf.Tensor:
        """Bank entries codes // 8 [m, 2D, 2D], transposed (bit 0) and flipped (bits 1, 2) as codes % 8 says."""
        canvas = tf.gather(self._ice_bank, codes // _ICE_TRANSFORMS)
        transform = codes % _ICE_TRANSFORMS
        for bit, turn in (
            (1, lambda c: tf.transpose(c, [0, 2, 1])),
            (2, lambda c: tf.reverse(c, [1])),
            (4, lambda c: tf.reverse(c, [2])),
        ):
            canvas = tf.where((transform & bit > 0)[:, None, None], turn(canvas), canvas)
        return canvas

    # ------------------------------------------------------------ batches

    def batch(self, batch_size: int, seed) -> dict:
        """One RawBatch of ``batch_size`` particles from a stateless seed (int tensor [2])."""
        seed = tf.cast(seed, tf.int64)
        draws = self.draw(batch_size, tf.random.experimental.stateless_fold_in(seed, 0))
        images = self.render(draws)
        noise = tf.random.stateless_normal(tf.shape(images), tf.random.experimental.stateless_fold_in(seed, 1))
        if self.noise_std > 0.0:
            images += self.noise_std * noise
        else:  # noise outliers of a noise-free data set: noise with the signal's standard deviation
            images = tf.where((draws["kind"] == KINDS.index("noise"))[:, None, None], self.signal_std * noise, images)
        batch = {
            "images": tf.ensure_shape(images, [batch_size, self.size, self.size]),
            "quaternion": draws["quaternion"],
            "outlier": tf.cast(draws["kind"] != 0, tf.float32),
            "index": tf.fill([batch_size], tf.constant(-1, tf.int64)),
        }
        if self.settings.ctf:
            s, ones = self.settings, tf.ones([batch_size])
            values = dict(
                draws,
                voltage=s.voltage * ones,
                spherical_aberration=s.cs * ones,
                amplitude_contrast=s.amplitude_contrast * ones,
                phase_shift=0.0 * ones,
            )
            batch["ctf"] = {key: values[key] for key in CTF_KEYS}
        return batch

    def dataset(self, batch_size: int, seed: int = 0, start: int = 0) -> tf.data.Dataset:
        """Endless tf.data.Dataset of RawBatch dicts; batch k (from ``start`` on) is drawn from the seed (seed, k)."""
        seed = int(seed)
        return tf.data.Dataset.counter(int(start)).map(
            lambda step: self.batch(batch_size, tf.stack([tf.constant(seed, tf.int64), step])),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
