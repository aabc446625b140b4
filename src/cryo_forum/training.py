"""Training runs: data, model, optimiser and callbacks from a TrainingConfig, written into a run folder.

A run folder holds ``config.yaml`` (every setting), ``split.json`` (which particles train, validate and
test), ``model.keras`` (the best epoch by validation median error, replaced atomically), ``history.csv``,
``logs/`` (TensorBoard), ``checkpoints/`` (state for ``--resume``) and, when training from a map,
``val/`` and ``test/`` (fixed simulated particle sets). An interrupted run continues from its last
completed epoch with ``resume=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryo_forum.config import TrainingConfig
from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output
from cryo_forum.io.particles import ParticleSet
from cryo_forum.losses import LossSchedule
from cryo_forum.model import LossWeightScheduler, OrientationEstimator
from cryo_forum.pipeline import (
    Augmentation,
    build_cache,
    cached_batches,
    load_split,
    particle_batches,
    prepare_for_model,
    save_split,
    split_indices,
)
from cryo_forum.preprocess import Preprocessor
from cryo_forum.tensorflow_quiet import keras, tf

MODEL_NAME = "model.keras"
CONFIG_NAME = "config.yaml"
SPLIT_NAME = "split.json"
HISTORY_NAME = "history.csv"
MONITOR = "val_median_error_deg"


@dataclass
class TrainingData:
    """Batched datasets for Keras fit and what describes them."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    steps_per_epoch: int
    preprocessor: Preprocessor
    description: str


def make_strategy(name: str) -> tf.distribute.Strategy:
    """default: one device; mirrored: every local device; multiworker: the cluster in TF_CONFIG."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise CryoForumError("--strategy multiworker: set TF_CONFIG to describe the cluster and this worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise CryoForumError(f"--strategy: unknown strategy '{name}'")


def _tf_config() -> dict:
    return json.loads(os.environ.get("TF_CONFIG", "{}"))


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker of a multi-worker cluster."""
    config = _tf_config()
    task = config.get("task", {})
    if task.get("type") == "chief":
        return True
    if "chief" in config.get("cluster", {}):
        return False
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def worker_index() -> int:
    return int(_tf_config().get("task", {}).get("index", 0))


def build_model(config: TrainingConfig) -> OrientationEstimator:
    encoder = {
        "name": config.encoder,
        "image_size": config.image_size,
        "pooling": config.pooling,
        "lowpass": config.lowpass,
        "widths": config.widths,
        "dropout": config.dropout,
    }
    head_options = {"psd": config.psd} if config.head == "qcqp" else {}
    try:
        model = OrientationEstimator(
            encoder,
            head=config.head,
            head_options=head_options,
            symmetry=config.symmetry,
            direct_loss=config.direct_loss,
            pair_weighting=config.pair_weighting,
            uncertainty_weight=config.uncertainty_weight,
        )
    except ValueError as error:
        raise CryoForumError(str(error)) from None
    model.build((None, config.image_size, config.image_size, 1))
    return model


def make_optimizer(config: TrainingConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """AdamW with a linear warm-up and cosine decay over the whole run."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate / 10 if warmup else config.learning_rate,
        decay_steps=total - warmup,
        alpha=0.01,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay, clipnorm=5.0)


def loss_schedule(config: TrainingConfig) -> LossSchedule:
    try:
        return LossSchedule(
            kind=config.loss_schedule,
            switch_epoch=config.switch_epoch,
            ramp_epochs=config.ramp_epochs,
            distance_weight=config.distance_weight,
            direct_weight=config.direct_weight,
        )
    except ValueError as error:
        raise CryoForumError(f"--loss-schedule: {error}") from None


def _shard_policy(dataset: tf.data.Dataset, policy) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def particle_data(config: TrainingConfig, run: Path, resume: bool) -> TrainingData:
    """Labelled particles from a STAR/.cs file, split by particle and saved as RUN/split.json."""
    particles = ParticleSet.open(config.star, datadir=config.datadir)
    if not particles.has_poses:
        raise CryoForumError(f"{config.star}: no rlnAngleRot/Tilt/Psi columns; training needs consensus poses")
    particles.validate()
    split_path = run / SPLIT_NAME
    if resume and split_path.exists():
        split = load_split(split_path, particles)
    else:
        split = split_indices(len(particles), config.val_fraction, config.test_fraction, config.seed)
        if is_chief():
            save_split(
                split_path,
                split,
                particles,
                val_fraction=config.val_fraction,
                test_fraction=config.test_fraction,
                seed=config.seed,
            )
    if len(split["train"]) < config.batch_size:
        raise CryoForumError(
            f"--batch-size {config.batch_size}: larger than the {len(split['train'])} training particles"
        )
    preprocessor = Preprocessor(
        image_size=config.image_size,
        pixel_size_in=particles.pixel_size,
        input_size=particles.box_size,
        normalise=config.normalise,
        mask_radius=config.mask_radius,
        phase_flip=config.phase_flip,
    )
    augmentation = Augmentation(rotate=config.rotate, max_shift_px=config.max_shift_px, method=config.augment_method)
    seed = config.seed + 1000 * worker_index()
    if config.cache:
        cache = build_cache(particles, preprocessor, run / "cache.h5")
        train = cached_batches(
            cache, split["train"], config.batch_size, shuffle=True, seed=seed, repeat=True, drop_remainder=True
        )
        val = cached_batches(cache, split["val"], config.batch_size)
        model_preprocessor = None
    else:
        train = particle_batches(
            particles, split["train"], config.batch_size, shuffle=True, seed=seed, repeat=True, drop_remainder=True
        )
        val = particle_batches(particles, split["val"], config.batch_size)
        model_preprocessor = preprocessor
    policy = tf.data.experimental.AutoShardPolicy.DATA
    return TrainingData(
        train=_shard_policy(prepare_for_model(train, model_preprocessor, augmentation, seed=seed), policy),
        val=_shard_policy(prepare_for_model(val, model_preprocessor, None), policy),
        steps_per_epoch=len(split["train"]) // config.batch_size,
        preprocessor=preprocessor,
        description=(
            f"{len(split['train'])} training / {len(split['val'])} validation / {len(split['test'])} test "
            f"particles from {config.star}"
        ),
    )


def map_data(config: TrainingConfig, run: Path) -> TrainingData:
    """Fresh simulated particles for every batch, fixed simulated validation and test sets in RUN/val, RUN/test."""
    from cryo_forum.simulate import InvalidSetting, SimulationSettings, write_simulation
    from cryo_forum.synthetic import SyntheticParticles
    from cryo_forum.volumes import load_volume

    box = config.box_size or config.image_size
    volume, pixel_size = load_volume(config.volume, pixel_size=config.apix, size=box)
    options = {
        "snr": config.snr,
        "ctf": config.ctf,
        "defocus_range": tuple(config.defocus_range),
        "shift_px": config.shift_px,
        "outlier_fraction": config.outliers,
        "symmetry": config.symmetry,
    }
    try:
        settings = SimulationSettings(n=config.particles_per_epoch, seed=config.seed, **options)
        settings.validate()
    except InvalidSetting as error:
        raise CryoForumError(f"--{error.field.replace('_', '-')}: {error.message}") from None
    for name, n, seed in (("val", config.n_val, config.seed + 1), ("test", config.n_test, config.seed + 2)):
        if not (run / name / "particles.star").exists() and is_chief() and n > 0:
            print(f"simulating {n} fixed {name} particles into {run / name}", file=sys.stderr)
            write_simulation(run / name, volume, pixel_size, n, seed=seed, **options)
    split = {
        "mode": "map",
        "volume": str(config.volume),
        "train": "fresh particles every batch",
        "val": str(run / "val" / "particles.star"),
        "test": str(run / "test" / "particles.star"),
    }
    if is_chief():
        with atomic_output(run / SPLIT_NAME) as tmp:
            tmp.write_text(json.dumps(split, indent=2) + "\n")
    preprocessor = Preprocessor(
        image_size=config.image_size,
        pixel_size_in=pixel_size,
        input_size=box,
        normalise=config.normalise,
        mask_radius=config.mask_radius,
        phase_flip=config.phase_flip,
    )
    synthetic = SyntheticParticles(volume, pixel_size, settings)
    train = synthetic.dataset(config.batch_size, seed=config.seed + 1000 * worker_index())
    val_particles = ParticleSet.open(run / "val" / "particles.star")
    val = particle_batches(val_particles, np.arange(len(val_particles)), config.batch_size)
    return TrainingData(
        train=_shard_policy(prepare_for_model(train, preprocessor, None), tf.data.experimental.AutoShardPolicy.OFF),
        val=_shard_policy(prepare_for_model(val, preprocessor, None), tf.data.experimental.AutoShardPolicy.DATA),
        steps_per_epoch=max(1, config.particles_per_epoch // config.batch_size),
        preprocessor=preprocessor,
        description=(
            f"fresh particles simulated from {config.volume} ({box} px at {pixel_size:.2f} A/px, SNR {config.snr}, "
            f"CTF {'on' if config.ctf else 'off'}, {config.outliers:.0%} outliers), {config.n_val} fixed "
            f"validation particles"
        ),
    )


class BestModelSaver(keras.callbacks.Callback):
    """Saves the model to ``path`` (atomically) whenever the monitored validation metric improves."""

    def __init__(self, path: Path, monitor: str = MONITOR, best: float = np.inf):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value) or value >= self.best:
            return
        self.best = float(value)
        with atomic_output(self.path) as tmp:
            self.model.save(tmp)
        print(f"epoch {epoch + 1}: {self.monitor} improved to {value:.2f}; saved {self.path}", file=sys.stderr)


def _best_so_far(history_path: Path) -> float:
    """The best monitored value in an existing history.csv (resumed runs keep improving on it)."""
    if not history_path.exists():
        return np.inf
    import pandas as pd

    history = pd.read_csv(history_path)
    return float(history[MONITOR].min()) if MONITOR in history and len(history) else np.inf


def train(config: TrainingConfig, out: str | Path, resume: bool = False, verbose: int = 2) -> keras.callbacks.History:
    """Train a model as ``config`` says into the run folder ``out`` (see the module docstring)."""
    run = Path(out)
    config.validate()
    if (run / CONFIG_NAME).exists() and not resume:
        raise CryoForumError(
            f"--out {run}: already holds a run; pass --resume to continue it, or choose another folder"
        )
    if resume and not (run / CONFIG_NAME).exists():
        raise CryoForumError(f"--resume: {run} holds no run to resume ({CONFIG_NAME} is missing)")
    strategy = make_strategy(config.strategy)
    chief = is_chief()
    outputs = run if chief else Path(tempfile.mkdtemp(prefix="cryo-forum-worker-"))
    outputs.mkdir(parents=True, exist_ok=True)
    try:
        data = map_data(config, run) if config.volume else particle_data(config, run, resume)
        if chief:
            config.save(run / CONFIG_NAME)
            with atomic_output(run / "preprocess.json") as tmp:
                tmp.write_text(json.dumps(data.preprocessor.to_dict(), indent=2) + "\n")
        print(f"training on {data.description}", file=sys.stderr)
        with strategy.scope():
            model = build_model(config)
            model.compile(optimizer=make_optimizer(config, data.steps_per_epoch))
        print(
            f"model: {config.encoder} encoder ({model.count_params():,} parameters), {config.head} head, "
            f"{config.image_size} px, {strategy.num_replicas_in_sync} replica(s)",
            file=sys.stderr,
        )
        callbacks = [
            keras.callbacks.BackupAndRestore(str(outputs / "checkpoints"), save_freq="epoch", delete_checkpoint=False),
            LossWeightScheduler(loss_schedule(config)),
            keras.callbacks.CSVLogger(str(outputs / HISTORY_NAME), append=resume),
            keras.callbacks.TensorBoard(str(outputs / "logs"), write_graph=False, profile_batch=0),
            BestModelSaver(outputs / MODEL_NAME, best=_best_so_far(outputs / HISTORY_NAME) if resume else np.inf),
            keras.callbacks.TerminateOnNaN(),
        ]
        history = model.fit(
            data.train,
            epochs=config.epochs,
            steps_per_epoch=data.steps_per_epoch,
            validation_data=data.val,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the datasets shuffle themselves, reproducibly
        )
        if chief and (run / MODEL_NAME).exists() and config.head == "qcqp":
            calibrate_on_validation(run, config)
        return history
    finally:
        if not chief:
            shutil.rmtree(outputs, ignore_errors=True)


def validation_particles(run: Path, config: TrainingConfig) -> tuple[ParticleSet, np.ndarray | None]:
    """The run's validation particles: RUN/val for a map run, the split's val subset for a particle run."""
    if config.volume:
        return ParticleSet.open(run / "val" / "particles.star"), None
    particles = ParticleSet.open(config.star, datadir=config.datadir)
    return particles, load_split(run / SPLIT_NAME, particles)["val"]


def calibrate_on_validation(run: Path, config: TrainingConfig) -> None:
    """Predict the validation particles with the best model and store the uncertainty calibration.

    Thresholds for ``cryo-forum filter`` come from these predictions, never from the set being filtered.
    """
    from cryo_forum.calibrate import calibrate, pose_errors_deg, save_calibration
    from cryo_forum.io.star import OUTLIER
    from cryo_forum.prediction import predict_particles

    model, _, preprocessor = load_run(run)
    particles, indices = validation_particles(run, config)
    table = predict_particles(model, particles, preprocessor, indices, progress=False)
    truth = particles.table if indices is None else particles.table.iloc[indices]
    errors = pose_errors_deg(table, truth, config.symmetry)
    if OUTLIER in truth:
        table[OUTLIER] = truth[OUTLIER].to_numpy()
    save_calibration(run, calibrate(table, errors_deg=errors))
    print(f"uncertainty calibrated on {len(table)} validation particles: {run / 'calibration.json'}", file=sys.stderr)


def load_run(run: str | Path) -> tuple[OrientationEstimator, TrainingConfig, Preprocessor]:
    """The best model of a run folder with its config and preprocessing."""
    run = Path(run)
    model_path = run / MODEL_NAME
    if not model_path.exists():
        raise CryoForumError(
            f"--model {run}: no {MODEL_NAME} (is it a cryo-forum run folder, and did an epoch finish?)"
        )
    config = TrainingConfig.load(run / CONFIG_NAME)
    preprocessor = Preprocessor.from_dict(json.loads((run / "preprocess.json").read_text()))
    model = keras.models.load_model(model_path)
    return model, config, preprocessor
