"""Which particles a run trains, validates and tests on: the split and its one JSON schema.

A run on a particle file (mode "star") keeps, per subset, the sorted particle indices and their rlnImageName,
so a split read back is checked against the file it is applied to. A run from a map (mode "map") trains on
fresh simulated particles and keeps its validation and test particles as files inside the run folder. The
run folder (:class:`cryo_forum.training.run.Run`) reads and writes it; this module only defines it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star

SPLIT_NAMES = ("train", "val", "test")
FORMAT = "cryo-forum split"
VERSION = 2
MODES = ("star", "map")


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Random split of particles 0..n-1 into {"train", "val", "test"}: sorted, disjoint int64 arrays covering all.

    Subset sizes are ``round(fraction * n)``; the same (n, fractions, seed) gives the same split. A fraction of 0
    gives an empty subset; a positive fraction too small to select one particle, negative fractions, fractions
    summing to 1 or more, or an empty training set raise InvalidSetting.
    """
    if int(n) != n or n < 1:
        raise CryoForumError(f"cannot split {n} particles: need at least one")
    if int(seed) != seed or seed < 0:
        raise InvalidSetting("seed", f"must be an integer >= 0, got {seed}")
    n = int(n)
    sizes = {}
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (np.isfinite(fraction) and fraction >= 0):
            raise InvalidSetting(name, f"must be a fraction >= 0, got {fraction}")
        sizes[name] = round(fraction * n)
        if fraction > 0 and sizes[name] == 0:
            raise InvalidSetting(name, f"{fraction} selects no particle of {n}; raise it or set it to 0")
    if val_fraction + test_fraction >= 1 or sizes["val_fraction"] + sizes["test_fraction"] >= n:
        raise InvalidSetting(
            "val_fraction", f"plus test_fraction ({val_fraction} + {test_fraction}) leaves no training particle of {n}"
        )
    order = np.random.default_rng(int(seed)).permutation(n)
    n_val, n_test = sizes["val_fraction"], sizes["test_fraction"]
    return {
        "train": np.sort(order[n_val + n_test :]),
        "val": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
    }


@dataclass(frozen=True)
class Split:
    """The subsets of a run. Star mode: ``indices`` and ``names`` per subset; map mode: ``files`` of val and test."""

    mode: str
    source: str
    indices: dict[str, np.ndarray] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_particles(cls, particles, indices: Mapping[str, np.ndarray], **settings) -> Split:
        """A star-mode split of ``particles`` (a ParticleSet) into ``indices`` (see :func:`split_indices`)."""
        clean = _checked(indices, len(particles), str(particles.source))
        names = particles.table[star.IMAGE_NAME].astype(str).to_numpy()
        return cls(
            "star",
            str(particles.source),
            clean,
            {key: names[value].tolist() for key, value in clean.items()},
            settings=dict(settings),
        )

    @classmethod
    def of_map(cls, volume: str, files: Mapping[str, str], **settings) -> Split:
        """A map-mode split: fresh training particles from ``volume``, fixed sets in ``files`` (run-relative)."""
        return cls("map", str(volume), files=dict(files), settings=dict(settings))

    def indices_for(self, particles) -> dict[str, np.ndarray]:
        """The star-mode subsets, after checking they were made for ``particles`` (same n, same names)."""
        if self.mode != "star":
            raise CryoForumError(f"the run trained on particles simulated from {self.source}, not on a particle file")
        n = sum(len(value) for value in self.indices.values())
        if len(particles) != n:
            raise CryoForumError(
                f"the split was made for {n} particles ({self.source}) but {particles.source} has {len(particles)}"
            )
        actual = particles.table[star.IMAGE_NAME].astype(str).to_numpy()
        for key in SPLIT_NAMES:
            differs = np.flatnonzero(actual[self.indices[key]] != np.asarray(self.names[key], dtype=object))
            if differs.size:
                index = self.indices[key][differs[0]]
                raise CryoForumError(
                    f"the split does not match {particles.source}: particle {index} is {actual[index]!r} there "
                    f"but {self.names[key][differs[0]]!r} in the split"
                )
        return self.indices

    def to_document(self) -> dict[str, Any]:
        """The JSON document (plain values)."""
        subsets: dict[str, Any] = {}
        for key in SPLIT_NAMES:
            if self.mode == "star":
                subsets[key] = {"indices": self.indices[key].tolist(), "names": self.names[key]}
            else:
                subsets[key] = {"file": self.files[key]} if key in self.files else {"fresh": True}
        return {"format": FORMAT, "version": VERSION, "mode": self.mode, "source": self.source,
                **self.settings, "subsets": subsets}  # fmt: skip

    @classmethod
    def from_document(cls, document: Any, where: str) -> Split:
        """The split of a document written by :meth:`to_document`; CryoForumError naming ``where`` otherwise."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise CryoForumError(f"{where}: not a cryo-forum split file")
        if document.get("version") != VERSION or document.get("mode") not in MODES:
            version = document.get("version")
            raise CryoForumError(f"{where}: split file version {version} (this version reads {VERSION})")
        settings = {key: value for key, value in document.items()
                    if key not in ("format", "version", "mode", "source", "subsets")}  # fmt: skip
        try:
            subsets = {key: document["subsets"][key] for key in SPLIT_NAMES}
            if document["mode"] == "map":
                files = {key: str(value["file"]) for key, value in subsets.items() if "file" in value}
                return cls.of_map(document["source"], files, **settings)
            indices = {key: np.asarray(value["indices"], dtype=np.int64).reshape(-1) for key, value in subsets.items()}
            names = {key: [str(name) for name in value["names"]] for key, value in subsets.items()}
        except (KeyError, TypeError, ValueError) as error:
            raise CryoForumError(f"{where}: malformed split file ({error!r} missing or invalid)") from None
        clean = _checked(indices, sum(len(value) for value in indices.values()), where)
        if any(len(names[key]) != len(clean[key]) for key in SPLIT_NAMES):
            raise CryoForumError(f"{where}: malformed split file (names and indices differ in number)")
        return cls("star", str(document["source"]), clean, names, settings=settings)


def _checked(split: Mapping[str, np.ndarray], n: int, where: str) -> dict[str, np.ndarray]:
    """The three subsets as sorted int64 arrays; CryoForumError unless they are disjoint and lie in [0, n)."""
    if set(split) != set(SPLIT_NAMES):
        raise CryoForumError(f"{where}: a split has exactly the subsets {', '.join(SPLIT_NAMES)}")
    clean = {key: np.sort(np.asarray(split[key], dtype=np.int64).reshape(-1)) for key in SPLIT_NAMES}
    everything = np.concatenate(list(clean.values()))
    if everything.size and (everything.min() < 0 or everything.max() >= n):
        raise CryoForumError(f"{where}: split indices must lie in [0, {n})")
    if len(np.unique(everything)) != len(everything):
        raise CryoForumError(f"{where}: split subsets overlap or repeat particles")
    return clean
