"""The CTFs of the particles of a set, each at its own pixel size (ones for particles without CTF parameters)."""

from __future__ import annotations

import numpy as np

from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.ctf import compute_ctf


class ParticleCTFs:
    """CTFs on the rfft grid of chosen particles of a set, each at its own pixel size (ones without CTF columns).

    The per-particle parameters are taken from the table once, not for every batch.
    """

    def __init__(self, particles: ParticleSet):
        self.size = particles.box_size
        self.parameters = particles.ctf_parameters() if particles.has_ctf else None
        self.pixel_sizes = particles.pixel_sizes()

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        """CTFs [B, D, D // 2 + 1] of particles ``indices``."""
        out = np.ones((len(indices), self.size, self.size // 2 + 1))
        if self.parameters is None:
            return out
        pixel_sizes = self.pixel_sizes[indices]
        for pixel_size in np.unique(pixel_sizes):
            chosen = np.asarray(indices)[pixel_sizes == pixel_size]
            parameters = {name: values[chosen] for name, values in self.parameters.items()}
            out[pixel_sizes == pixel_size] = compute_ctf(self.size, float(pixel_size), **parameters, rfft=True)
        return out
