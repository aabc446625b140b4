"""The data of a training run: checked before anything is written, then turned into tf.data streams.

``inspect`` reads only metadata and headers (the particle file, the stacks' headers, the map) and returns the
config with the preprocessing completed from the data; ``training_data`` builds the batches the model sees:
labelled particles split by particle, or fresh particles simulated from a map every batch with fixed
simulated validation and test sets kept in the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io.particles import ParticleSet
from cryo_forum.streams.balance import view_balance_weights
from cryo_forum.streams.batch import to_model_batches
from cryo_forum.streams.cache import build_cache, cached_batches
from cryo_forum.streams.preprocess import DEFAULT_IMAGE_SIZE
from cryo_forum.streams.readers import particle_batches
from cryo_forum.streams.splits import Split, split_indices
from cryo_forum.tensorflow_quiet import tf
from cryo_forum.training.config import MapData, StarData, TrainingConfig
from cryo_forum.training.distribution import is_chief, worker_index
from cryo_forum.training.run import CACHE_NAME, Run

log = logging.getLogger(__name__)
VAL_SEED_OFFSET, TEST_SEED_OFFSET, WORKER_SEED_STRIDE = 1, 2, 1000
CTF_TABLE_ROWS = 4096


@dataclass
class TrainingData:
    """Batched datasets for Keras fit and what describes them."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    steps_per_epoch: int
    description: str


@dataclass
class Inspected:
    """What inspection found: the completed config and, for labelled particles, the set and its split."""

    config: TrainingConfig
    particles: ParticleSet | None = None
    split: Split | None = None


def inspect(config: TrainingConfig) -> Inspected:
    """Check the data against the settings (metadata and headers only) and complete the preprocessing."""
    if isinstance(config.data, StarData):
        return _inspect_particles(config, config.data)
    return _inspect_map(config, config.data)


def _inspect_particles(config: TrainingConfig, data: StarData) -> Inspected:
    particles = ParticleSet.open(data.star, datadir=data.datadir)
    if not particles.has_poses:
        raise CryoForumError(f"{data.star}: no rlnAngleRot/Tilt/Psi columns; training needs consensus poses")
    particles.quaternions()  # non-numeric angles fail here, with the column named
    particles.validate()
    images = config.images.resolved(particles.pixel_size, particles.box_size)
    origins = particles.shifts_px() * (images.image_size / images.input_size)  # px of the network's images
    augmentation = config.augmentation.with_shifts_of(origins)
    indices = split_indices(len(particles), data.val_fraction, data.test_fraction, config.seed)
    batch_size = config.optimisation.batch_size
    if len(indices["train"]) < batch_size:
        raise InvalidSetting("batch_size", f"{batch_size} is more than the {len(indices['train'])} training particles")
    if not len(indices["val"]):
        raise InvalidSetting("val_fraction", "selects no validation particle")
    split = Split.of_particles(
        particles, indices, val_fraction=data.val_fraction, test_fraction=data.test_fraction, seed=config.seed
    )
    return Inspected(dataclasses.replace(config, images=images, augmentation=augmentation), particles, split)


def _inspect_map(config: TrainingConfig, data: MapData) -> Inspected:
    if not Path(data.volume).is_file():
        raise CryoForumError(f"{data.volume}: file not found")
    box = data.box_size or config.images.image_size or DEFAULT_IMAGE_SIZE
    if config.images.image_size is not None and config.images.image_size > box:
        raise InvalidSetting(
            "image_size", f"must be at most the particles' box of {box} px, got {config.images.image_size}"
        )
    images = dataclasses.replace(config.images, image_size=config.images.image_size or min(DEFAULT_IMAGE_SIZE, box))
    return Inspected(dataclasses.replace(config, data=dataclasses.replace(data, box_size=box), images=images))


def training_data(
    inspected: Inspected, run: Run, resume: bool, first_epoch: int
) -> tuple[TrainingConfig, TrainingData]:
    """The streams of a run (the config comes back with the simulated pixel size filled in for map runs)."""
    if inspected.particles is not None:
        return inspected.config, _particle_data(inspected, run, resume)
    return _map_data(inspected.config, run, first_epoch)


def _particle_data(inspected: Inspected, run: Run, resume: bool) -> TrainingData:
    """Labelled particles split by particle (the split is saved in the run, or read back on resume)."""
    config, particles = inspected.config, inspected.particles
    data = config.data
    split = run.load_split() if resume and run.has_split else inspected.split
    indices = split.indices_for(particles)
    if is_chief() and not resume:
        run.save_split(split)
    batch_size, seed = config.optimisation.batch_size, config.seed + WORKER_SEED_STRIDE * worker_index()
    weights = view_balance_weights(particles.quaternions(), data.balance_views, config.symmetry)
    stream = {"shuffle": True, "seed": seed, "repeat": True, "drop_remainder": True, "weights": weights}
    if data.cache:
        cache = build_cache(particles, config.images, run.file(CACHE_NAME))
        train = cached_batches(cache, indices["train"], batch_size, **stream)
        val = cached_batches(cache, indices["val"], batch_size)
        preprocessor = None
    else:
        train = particle_batches(particles, indices["train"], batch_size, **stream)
        val = particle_batches(particles, indices["val"], batch_size)
        preprocessor = config.images
    policy = tf.data.experimental.AutoShardPolicy.DATA
    model_batches = {"has_ctf": particles.has_ctf, "recentre": True}
    return TrainingData(
        train=_shard(to_model_batches(train, preprocessor, config.augmentation, seed=seed, **model_batches), policy),
        val=_shard(to_model_batches(val, preprocessor, **model_batches), policy),
        steps_per_epoch=len(indices["train"]) // batch_size,
        description=(
            f"{len(indices['train'])} training / {len(indices['val'])} validation / {len(indices['test'])} test "
            f"particles from {data.star}"
        ),
    )


def simulation_options(data: MapData, symmetry: str) -> dict:
    """The :class:`~cryo_forum.physics.settings.SimulationSettings` fields a map run simulates with."""
    options = {
        "snr": data.snr,
        "ctf": data.ctf,
        "defocus_range": tuple(data.defocus_range),
        "max_shift_px": data.max_shift_px,
        "origin_sigma_px": data.origin_sigma_px,
        "outlier_fraction": data.outliers,
        "symmetry": symmetry,
    }
    if data.noise_spectrum is not None:
        options["noise_spectrum"] = tuple(float(value) for value in data.noise_spectrum)
    if data.ctf_from is not None:
        options["ctf_table"] = ctf_table(ParticleSet.open(data.ctf_from))
    return options


def ctf_table(particles: ParticleSet) -> tuple[tuple[float, ...], ...]:
    """The particles' CTF parameters as rows in CTF_KEYS order (at most CTF_TABLE_ROWS, evenly chosen)."""
    from cryo_forum.streams.preprocess import CTF_KEYS

    params = particles.ctf_parameters()
    rows = np.linspace(0, len(particles) - 1, min(len(particles), CTF_TABLE_ROWS)).round().astype(int)
    return tuple(tuple(float(params[key][row]) for key in CTF_KEYS) for row in rows)


def _map_data(config: TrainingConfig, run: Run, first_epoch: int) -> tuple[TrainingConfig, TrainingData]:
    """Fresh simulated particles for every batch, fixed simulated validation and test sets in the run folder."""
    from cryo_forum.io.maps import load_volume
    from cryo_forum.streams.simulation import SimulationSettings, SNRCurriculum, simulated_batches, write_simulation

    data = config.data
    volume, pixel_size = load_volume(data.volume, pixel_size=data.apix, size=data.box_size)
    config = dataclasses.replace(config, images=config.images.resolved(pixel_size, data.box_size))
    options = simulation_options(data, config.symmetry)
    settings = SimulationSettings(n=data.particles_per_epoch, seed=config.seed, **options)
    settings.validate()
    fixed = {"val": (data.n_val, VAL_SEED_OFFSET), "test": (data.n_test, TEST_SEED_OFFSET)}
    for name, (n, offset) in fixed.items():
        if n > 0 and is_chief() and not run.fixed_set(name).exists():
            log.info(f"simulating {n} fixed {name} particles into {run.fixed_set(name).parent}")
            write_simulation(run.fixed_set(name).parent, volume, pixel_size, n, seed=config.seed + offset, **options)
    if is_chief():
        files = {name: str(run.fixed_set(name).relative_to(run.path)) for name, (n, _) in fixed.items() if n > 0}
        run.save_split(Split.of_map(data.volume, files, seed=config.seed))
    batch_size = config.optimisation.batch_size
    steps_per_epoch = max(1, data.particles_per_epoch // batch_size)
    curriculum = None
    if data.snr_start is not None:
        curriculum = SNRCurriculum(data.snr_start, steps_per_epoch * max(1, config.optimisation.epoch_limit // 2))
    train = simulated_batches(
        volume,
        pixel_size,
        settings,
        batch_size,
        seed=config.seed + WORKER_SEED_STRIDE * worker_index(),
        start=first_epoch * steps_per_epoch,
        curriculum=curriculum,
    )
    val_particles = ParticleSet.open(run.fixed_set("val"))
    val = particle_batches(val_particles, np.arange(len(val_particles)), batch_size)
    return config, TrainingData(
        train=_shard(
            to_model_batches(train, config.images, has_ctf=data.ctf), tf.data.experimental.AutoShardPolicy.OFF
        ),
        val=_shard(to_model_batches(val, config.images, has_ctf=data.ctf), tf.data.experimental.AutoShardPolicy.DATA),
        steps_per_epoch=steps_per_epoch,
        description=(
            f"fresh particles simulated from {data.volume} ({data.box_size} px at {pixel_size:.2f} A/px, "
            f"SNR {_snr_text(data)}, CTF {'on' if data.ctf else 'off'}, {data.outliers:.0%} outliers), "
            f"{data.n_val} fixed validation particles"
        ),
    )


def _snr_text(data: MapData) -> str:
    if data.snr is None:
        return "none"
    if data.snr_start is None:
        return f"{data.snr:.3g}"
    return f"{data.snr_start:.3g} falling to {data.snr:.3g} over the first half"


def _shard(dataset: tf.data.Dataset, policy) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def validation_set(run: Run, config: TrainingConfig) -> tuple[ParticleSet, np.ndarray | None]:
    """The run's validation particles: the fixed set of a map run, the split's val subset of a particle run."""
    if isinstance(config.data, MapData):
        return ParticleSet.open(run.fixed_set("val")), None
    particles = ParticleSet.open(config.data.star, datadir=config.data.datadir)
    return particles, run.load_split().indices_for(particles)["val"]
