"""Summaries of particle files and maps, from metadata and MRC headers only (``cryo-forum info``).

A STAR or .cs summary looks at every stack it names: its box comes from the stack headers, and stacks that
are missing, unreadable, truncated or hold fewer images than the metadata asks for are listed rather than
raised, since finding them is what the summary is for. No image data are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.mrc import mrc_info
from cryo_forum.io.particles import STACK_SUFFIXES, ParticleSet


def describe_volume(path: Path) -> dict:
    """Summary of a 3-D MRC map from its header; ``pixel_size`` is None when the header has none."""
    info = mrc_info(path)
    return {
        "file": str(path),
        "kind": "volume",
        "format": "mrc",
        "shape": list(info.shape),
        "box_size": info.shape[-1],
        "pixel_size": info.pixel_size or None,  # 0 means "not set" in an MRC header
        "truncated": info.truncated,
        "n_particles": 0,
        "optics_groups": 0,
        "has_poses": False,
        "has_ctf": False,
    }


def describe_particles(path: Path, datadir: Path | None) -> dict:
    """Summary of a particle file; box and stack faults come from the stack headers (no image is read)."""
    particles = ParticleSet.open(path, datadir=datadir)
    sizes, faults = _check_stacks(particles)
    declared = _metadata_box_sizes(particles)
    pixel_sizes = _pixel_sizes(particles)
    if particles.optics is not None:
        groups = len(particles.optics)
    else:
        groups = 1 if len(particles) else 0
    return {
        "file": str(path),
        "kind": "particles",
        "format": particles.kind,
        "relion_version": particles.relion_version,
        "n_particles": len(particles),
        "box_size": sizes[0] if len(sizes) == 1 else None,
        "box_sizes_stacks": sizes,
        "box_size_metadata": declared[0] if len(declared) == 1 else None,
        "pixel_size": pixel_sizes[0] if len(pixel_sizes) == 1 else None,
        "pixel_sizes": pixel_sizes,
        "optics_groups": groups,
        "has_poses": particles.has_poses,
        "has_ctf": particles.has_ctf,
        "stacks": len(particles.stack_names),
        **faults,
    }


def _check_stacks(particles: ParticleSet) -> tuple[list[int], dict[str, list[str]]]:
    """Open the header of each referenced stack once: the distinct image sizes found, and the stacks at fault.

    The faults (``stacks_*`` keys, lists of names): missing; unreadable (not MRC, or not square images);
    truncated (the file is shorter than its header says); short (fewer images than the highest the
    metadata refers to).
    """
    highest = particles.highest_image_per_stack()
    faults: dict[str, list[str]] = {"missing": [], "unreadable": [], "truncated": [], "short": []}
    sizes = set()
    for name in particles.stack_names:
        try:
            path = particles.resolve_stack(name)
        except CryoForumError:
            faults["missing"].append(name)
            continue
        try:
            info = mrc_info(path)
        except CryoForumError:
            faults["unreadable"].append(name)
            continue
        if len(info.shape) not in (2, 3) or info.shape[-1] != info.shape[-2]:
            faults["unreadable"].append(name)
            continue
        sizes.add(info.shape[-1])
        if info.truncated:
            faults["truncated"].append(name)
        if (info.shape[0] if len(info.shape) == 3 else 1) < highest[name]:
            faults["short"].append(name)
    return sorted(sizes), {f"stacks_{fault}": names for fault, names in faults.items()}


def _metadata_box_sizes(particles: ParticleSet) -> list[int]:
    """The distinct rlnImageSize values of the particles' optics groups (empty when the metadata has none)."""
    if star.IMAGE_SIZE not in particles.table:
        return []
    return [int(size) for size in np.unique(particles.table[star.IMAGE_SIZE].dropna().astype(np.int64))]


def _pixel_sizes(particles: ParticleSet) -> list[float]:
    if star.IMAGE_PIXEL_SIZE in particles.table:
        return [float(p) for p in np.unique(particles.table[star.IMAGE_PIXEL_SIZE].dropna())]
    try:
        return [particles.pixel_size]
    except CryoForumError:
        return []


def describe(path: Path, datadir: Path | None = None) -> dict:
    """The summary dict printed by ``cryo-forum info`` (``--json`` prints it as is)."""
    if path.suffix.lower() in (*STACK_SUFFIXES, ".map") and mrc_info(path).is_volume:
        return describe_volume(path)
    return describe_particles(path, datadir)
