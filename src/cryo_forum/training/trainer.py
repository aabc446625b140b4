"""Training runs: data, model, optimiser and callbacks from a TrainingConfig, written into a run folder.

The run folder is a :class:`cryo_forum.training.run.Run` (its files are described there). Options and data are
checked before anything is written; every epoch commits a checkpoint atomically, so an interrupted run
continues from its last completed epoch with ``resume=True``; the training length is fixed (``epochs``) or
set by the validation plateau rule of :class:`TrainingState`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io.atomic import atomic_output
from cryo_forum.io.particles import ParticleSet
from cryo_forum.model.estimator import LossWeightScheduler, OrientationEstimator
from cryo_forum.model.losses import LossSchedule
from cryo_forum.streams.pipeline import (
    Augmentation,
    build_cache,
    cached_batches,
    load_split,
    particle_batches,
    prepare_for_model,
    save_split,
    split_indices,
    stream_errors,
)
from cryo_forum.streams.preprocess import Preprocessor
from cryo_forum.tensorflow_quiet import keras, tf
from cryo_forum.training.config import DEFAULT_IMAGE_SIZE, TrainingConfig
from cryo_forum.training.run import CONFIG_NAME, LOGS, MODEL_NAME, SPLIT_NAME, WEIGHTS_NAME, Run

MONITOR = "val_median_error_deg"
log = logging.getLogger(__name__)


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
            raise InvalidSetting("strategy", "multiworker needs TF_CONFIG to describe the cluster and this worker")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise InvalidSetting("strategy", f"unknown strategy {name!r}")


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
    """AdamW; with a fixed length a linear warm-up and cosine decay over the run, else a learning rate that
    :class:`TrainingState` sets (warm-up, then halved at each plateau)."""
    if config.automatic_length:
        return keras.optimizers.AdamW(
            learning_rate=config.learning_rate, weight_decay=config.weight_decay, clipnorm=5.0
        )
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
    return LossSchedule(
        kind=config.loss_schedule,
        switch_epoch=config.switch_epoch,
        ramp_epochs=config.ramp_epochs,
        distance_weight=config.distance_weight,
        direct_weight=config.direct_weight,
    )


def _shard_policy(dataset: tf.data.Dataset, policy) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def resolve_sizes(config: TrainingConfig, box: int) -> TrainingConfig:
    """The config with its image size chosen for particles of ``box`` px (at most 64 px by default)."""
    image_size = config.image_size or min(DEFAULT_IMAGE_SIZE, box)
    if image_size > box:
        raise InvalidSetting("image_size", f"must be at most the particles' box of {box} px, got {image_size}")
    return dataclasses.replace(config, image_size=image_size)


def inspect_particles(config: TrainingConfig) -> tuple[TrainingConfig, ParticleSet, dict[str, np.ndarray]]:
    """Star mode, before anything is written: the particles, their split, and the config with sizes resolved.

    Reads the STAR file and the stacks' headers only; refuses particles without poses, too few for a batch,
    an image size beyond the box.
    """
    particles = ParticleSet.open(config.star, datadir=config.datadir)
    if not particles.has_poses:
        raise CryoForumError(f"{config.star}: no rlnAngleRot/Tilt/Psi columns; training needs consensus poses")
    particles.quaternions()  # non-numeric angles fail here, with the column named
    particles.validate()
    config = resolve_sizes(config, particles.box_size)
    split = split_indices(len(particles), config.val_fraction, config.test_fraction, config.seed)
    if len(split["train"]) < config.batch_size:
        raise InvalidSetting(
            "batch_size", f"{config.batch_size} is more than the {len(split['train'])} training particles"
        )
    if not len(split["val"]):
        raise InvalidSetting("val_fraction", "selects no validation particle")
    return config, particles, split


def inspect_volume(config: TrainingConfig) -> TrainingConfig:
    """Map mode, before anything is written: the config with box and image size resolved."""
    if not Path(config.volume).is_file():
        raise CryoForumError(f"{config.volume}: file not found")
    box = config.box_size or config.image_size or DEFAULT_IMAGE_SIZE
    return dataclasses.replace(resolve_sizes(config, box), box_size=box)


def particle_data(
    config: TrainingConfig, particles: ParticleSet, split: dict[str, np.ndarray], run: Run, resume: bool
) -> TrainingData:
    """Labelled particles split by particle (the split is saved as RUN/split.json, or read back on resume)."""
    split_path = run.file(SPLIT_NAME)
    if resume and split_path.exists():
        split = load_split(split_path, particles)
    elif is_chief():
        save_split(
            split_path,
            split,
            particles,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    preprocessor = Preprocessor(
        image_size=config.image_size,
        pixel_size_in=particles.pixel_size,
        input_size=particles.box_size,
        normalise=config.normalise,
        mask_radius=config.mask_radius,
        phase_flip=config.phase_flip,
    )
    augmentation = Augmentation(rotate=config.rotate, max_shift_px=config.max_shift, method=config.augment_method)
    seed = config.seed + 1000 * worker_index()
    if config.cache:
        cache = build_cache(particles, preprocessor, run.file("cache.h5"))
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


def map_data(config: TrainingConfig, run: Run, first_epoch: int) -> TrainingData:
    """Fresh simulated particles for every batch, fixed simulated validation and test sets in RUN/val, RUN/test."""
    from cryo_forum.io.maps import load_volume
    from cryo_forum.streams.simulation import SimulationSettings, write_simulation
    from cryo_forum.streams.synthetic import SyntheticParticles

    box = config.box_size
    volume, pixel_size = load_volume(config.volume, pixel_size=config.apix, size=box)
    options = {
        "snr": config.snr,
        "ctf": config.ctf,
        "defocus_range": tuple(config.defocus_range),
        "shift_px": config.max_shift,
        "outlier_fraction": config.outliers,
        "symmetry": config.symmetry,
    }
    settings = SimulationSettings(n=config.particles_per_epoch, seed=config.seed, **options)
    settings.validate()
    for name, n, seed in (("val", config.n_val, config.seed + 1), ("test", config.n_test, config.seed + 2)):
        if not run.file(f"{name}/particles.star").exists() and is_chief() and n > 0:
            log.info(f"simulating {n} fixed {name} particles into {run.file(name)}")
            write_simulation(run.file(name), volume, pixel_size, n, seed=seed, **options)
    split = {
        "mode": "map",
        "volume": str(config.volume),
        "train": "fresh particles every batch",
        "val": str(run.file("val/particles.star")),
        "test": str(run.file("test/particles.star")),
    }
    if is_chief():
        with atomic_output(run.file(SPLIT_NAME)) as tmp:
            tmp.write_text(json.dumps(split, indent=2) + "\n")
    preprocessor = Preprocessor(
        image_size=config.image_size,
        pixel_size_in=pixel_size,
        input_size=box,
        normalise=config.normalise,
        mask_radius=config.mask_radius,
        phase_flip=config.phase_flip,
    )
    steps_per_epoch = max(1, config.particles_per_epoch // config.batch_size)
    synthetic = SyntheticParticles(volume, pixel_size, settings)
    train = synthetic.dataset(
        config.batch_size, seed=config.seed + 1000 * worker_index(), start=first_epoch * steps_per_epoch
    )
    val_particles = ParticleSet.open(run.file("val/particles.star"))
    val = particle_batches(val_particles, np.arange(len(val_particles)), config.batch_size)
    return TrainingData(
        train=_shard_policy(prepare_for_model(train, preprocessor, None), tf.data.experimental.AutoShardPolicy.OFF),
        val=_shard_policy(prepare_for_model(val, preprocessor, None), tf.data.experimental.AutoShardPolicy.DATA),
        steps_per_epoch=steps_per_epoch,
        preprocessor=preprocessor,
        description=(
            f"fresh particles simulated from {config.volume} ({box} px at {pixel_size:.2f} A/px, SNR {config.snr}, "
            f"CTF {'on' if config.ctf else 'off'}, {config.outliers:.0%} outliers), {config.n_val} fixed "
            f"validation particles"
        ),
    )


class TrainingState(keras.callbacks.Callback):
    """After every epoch: log it, commit a checkpoint, keep the best model, apply the stopping rule.

    Order matters for interrupts: the checkpoint (weights, optimiser, history rows, best value, rule counters)
    is committed first, then model.keras is replaced if this epoch is the best; a resumed run whose newest
    checkpoint is also its best epoch rewrites model.keras from it, so the two always agree.

    Automatic length (``config.epochs`` None): the learning rate warms up over ``warmup_epochs``, then stays
    until the validation median has not improved by ``MIN_IMPROVEMENT`` for ``patience`` epochs (counted
    once the loss hand-over is over); each such plateau halves it and the ``MAX_PLATEAUS``-th ends the run.
    """

    MIN_IMPROVEMENT = 0.01
    MAX_PLATEAUS = 3

    def __init__(self, config: TrainingConfig, outputs: Run, steps_per_epoch: int, state: dict[str, Any]):
        super().__init__()
        self.config = config
        self.outputs = outputs
        self.steps_per_epoch = steps_per_epoch
        self.state = {
            "history": [],
            "best": None,
            "best_epoch": None,
            "reference": None,
            "wait": 0,
            "plateaus": 0,
            "lr_scale": 1.0,
            **state,
        }
        self.monitor_from = 0.0 if config.loss_schedule == "constant" else config.switch_epoch + config.ramp_epochs
        self._started = time.monotonic()

    # learning rate under the automatic length
    def on_train_batch_begin(self, batch, logs=None):
        if not self.config.automatic_length:
            return
        step = self._epoch * self.steps_per_epoch + batch
        warmup = self.config.warmup_epochs * self.steps_per_epoch
        if step <= warmup + 1:
            factor = 0.1 + 0.9 * min(step / warmup, 1.0) if warmup > 0 else 1.0
            self.model.optimizer.learning_rate.assign(self.config.learning_rate * factor * self.state["lr_scale"])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._started = time.monotonic()
        if self.config.automatic_length:
            self.model.optimizer.learning_rate.assign(self.config.learning_rate * self.state["lr_scale"])

    def on_epoch_end(self, epoch, logs=None):
        logs = {key: float(value) for key, value in (logs or {}).items()}
        if not np.isfinite(logs.get("loss", np.nan)):
            self.model.stop_training = True
            raise CryoForumError(
                f"training diverged at epoch {epoch + 1} (loss {logs.get('loss')}); "
                f"the run keeps its state after epoch {epoch}: lower --learning-rate and start a new run"
            )
        value = logs.get(MONITOR, np.nan)
        state = self.state
        state["history"].append({"epoch": epoch, **logs})
        improved = np.isfinite(value) and (state["best"] is None or value < state["best"])
        if improved:
            state["best"], state["best_epoch"] = value, epoch
        stop = self._stopping_rule(epoch, value)
        self.outputs.save_checkpoint(self.model, epoch + 1, state)
        if improved:
            with atomic_output(self.outputs.file(MODEL_NAME)) as tmp:
                self.model.save(tmp)
        self._log(epoch, logs, improved)
        if stop:
            log.info(
                f"stopping after epoch {epoch + 1}: {self.MAX_PLATEAUS} plateaus of the validation median "
                f"(best {state['best']:.2f} deg at epoch {state['best_epoch'] + 1})"
            )
            self.model.stop_training = True

    def _stopping_rule(self, epoch: int, value: float) -> bool:
        """Update the plateau counters; True when the run should end."""
        state = self.state
        if not self.config.automatic_length or not np.isfinite(value):
            return False
        if state["reference"] is None or value < state["reference"] * (1.0 - self.MIN_IMPROVEMENT):
            state["reference"], state["wait"] = value, 0
            return False
        if epoch + 1 < self.monitor_from:
            return False
        state["wait"] += 1
        if state["wait"] < self.config.patience:
            return False
        state["wait"] = 0
        state["plateaus"] += 1
        state["lr_scale"] *= 0.5
        if state["plateaus"] < self.MAX_PLATEAUS:
            rate = self.config.learning_rate * state["lr_scale"]
            log.info(f"plateau {state['plateaus']}: learning rate halved to {rate:.2g}")
        return state["plateaus"] >= self.MAX_PLATEAUS

    def _log(self, epoch: int, logs: dict[str, float], improved: bool) -> None:
        limit = self.config.epoch_limit
        parts = [f"epoch {epoch + 1}/{limit}", f"loss {logs.get('loss', np.nan):.4f}"]
        if MONITOR in logs:
            parts.append(f"val median {logs[MONITOR]:.2f} deg, mean {logs.get('val_mean_error_deg', np.nan):.2f} deg")
        parts.append(
            f"best {self.state['best']:.2f} at epoch {self.state['best_epoch'] + 1}"
            if self.state["best"] is not None
            else "no best yet"
        )
        parts.append(f"{time.monotonic() - self._started:.1f} s")
        log.info(", ".join(parts) + ("  (model.keras saved)" if improved else ""))


def _restore(model: OrientationEstimator, checkpoint: Path) -> None:
    """Model and optimiser weights of a checkpoint; the optimiser's slots are built first so they load too."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(checkpoint / WEIGHTS_NAME)


def prepare_run(config: TrainingConfig, run: Run, resume: bool):
    """Every check that needs no folder: the run's state (the chief's job), then the data (headers only)."""
    if is_chief():
        if resume and not run.exists:
            raise CryoForumError(f"{run.path}: holds no run to resume ({CONFIG_NAME} is missing); leave out --resume")
        if not resume and run.exists:
            raise CryoForumError(
                f"{run.path}: already holds a run; add --resume to continue it, or choose another folder"
            )
        if not resume and run.path.is_dir() and any(run.path.iterdir()):
            raise CryoForumError(f"{run.path}: folder is not empty; choose a new folder for the run")
    if config.star is not None:
        return inspect_particles(config)
    return inspect_volume(config), None, None


def train(config: TrainingConfig, out: str | Path, resume: bool = False, verbose: int = 0) -> keras.callbacks.History:
    """Train a model as ``config`` says into the run folder ``out`` (see the module docstring).

    Nothing is written before the options and the data have been checked; if the run fails before its first
    epoch is committed, the folder is removed again (unless resuming).
    """
    run = Run(out)
    config.validate()
    config, particles, split = prepare_run(config.with_absolute_paths(), run, resume)
    strategy = make_strategy(config.strategy)
    chief = is_chief()
    existed = run.path.exists()
    outputs = run if chief else Run(tempfile.mkdtemp(prefix="cryo-forum-worker-"))
    outputs.path.mkdir(parents=True, exist_ok=True)
    try:
        return _train(config, run, outputs, strategy, particles, split, resume, verbose)
    except BaseException:
        if chief and not resume and run.latest_checkpoint() is None:
            _remove_run(run, existed)
        raise
    finally:
        if not chief:
            shutil.rmtree(outputs.path, ignore_errors=True)


def _remove_run(run: Run, keep_folder: bool) -> None:
    """Remove what a failed run wrote: the folder, or only its content when the folder was there (empty) before."""
    if not keep_folder:
        shutil.rmtree(run.path, ignore_errors=True)
        return
    for item in run.path.iterdir():
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def _train(config, run: Run, outputs: Run, strategy, particles, split, resume: bool, verbose: int):
    chief = outputs is run
    latest = run.latest_checkpoint() if resume else None
    first_epoch = latest[1]["epoch"] if latest else 0
    if chief:
        run.remove_partial_checkpoints()
        config.save(run.file(CONFIG_NAME))
    with stream_errors():
        data = (
            map_data(config, run, first_epoch)
            if config.volume
            else particle_data(config, particles, split, run, resume)
        )
    if chief:
        run.save_preprocessor(data.preprocessor)
    log.info(f"training on {data.description}")
    with strategy.scope():
        model = build_model(config)
        model.compile(optimizer=make_optimizer(config, data.steps_per_epoch))
        if latest:
            _restore(model, latest[0])
    log.info(
        f"model: {config.encoder} encoder ({model.count_params():,} parameters), {config.head} head, "
        f"{config.image_size} px, {strategy.num_replicas_in_sync} replica(s); "
        + (
            f"{config.epochs} epochs"
            if config.epochs
            else f"until a validation plateau (at most {config.max_epochs} epochs)"
        )
    )
    state = TrainingState(config, outputs, data.steps_per_epoch, latest[1] if latest else {})
    if latest and state.state.get("best_epoch") == first_epoch - 1 and chief:
        with atomic_output(run.file(MODEL_NAME)) as tmp:  # its save may have been cut short by the interrupt
            model.save(tmp)
    if first_epoch >= config.epoch_limit or (latest and state.state["plateaus"] >= TrainingState.MAX_PLATEAUS):
        log.info(f"{run.path}: training had already finished after {first_epoch} epochs")
        history = None
    else:
        callbacks = [
            LossWeightScheduler(loss_schedule(config)),
            keras.callbacks.TensorBoard(str(outputs.file(LOGS)), write_graph=False, profile_batch=0),
            state,
        ]
        with stream_errors():
            history = model.fit(
                data.train,
                initial_epoch=first_epoch,
                epochs=config.epoch_limit,
                steps_per_epoch=data.steps_per_epoch,
                validation_data=data.val,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the datasets shuffle themselves, reproducibly
            )
    if chief and run.file(MODEL_NAME).exists() and config.head == "qcqp":
        calibrate_on_validation(run.path, config)
    return history


def validation_particles(run: Path, config: TrainingConfig) -> tuple[ParticleSet, np.ndarray | None]:
    """The run's validation particles: RUN/val for a map run, the split's val subset for a particle run."""
    run = Run(run)
    if config.volume:
        return ParticleSet.open(run.file("val/particles.star")), None
    particles = ParticleSet.open(config.star, datadir=config.datadir)
    return particles, load_split(run.file(SPLIT_NAME), particles)["val"]


def calibrate_on_validation(run: Path, config: TrainingConfig) -> None:
    """Predict the validation particles with the best model and store the uncertainty calibration.

    Thresholds for ``cryo-forum filter`` come from these predictions, never from the set being filtered.
    """
    from cryo_forum.io.star import OUTLIER
    from cryo_forum.prediction.calibration import calibrate, pose_errors_deg, save_calibration
    from cryo_forum.prediction.predict import predict_particles

    model, _, preprocessor = load_run(run)
    particles, indices = validation_particles(run, config)
    table = predict_particles(model, particles, preprocessor, indices, progress=False)
    truth = particles.table if indices is None else particles.table.iloc[indices]
    errors = pose_errors_deg(table, truth, config.symmetry)
    if OUTLIER in truth:
        table[OUTLIER] = truth[OUTLIER].to_numpy()
    path = save_calibration(run, calibrate(table, errors_deg=errors))
    log.info(f"uncertainty calibrated on {len(table)} validation particles: {path}")


def load_run(run: str | Path) -> tuple[OrientationEstimator, TrainingConfig, Preprocessor]:
    """The best model of a run folder with its config and preprocessing (one-line errors for damaged runs)."""
    folder = Run(run)
    if not folder.exists:
        raise CryoForumError(f"{folder.path}: not a cryo-forum run folder ({CONFIG_NAME} is missing)")
    config = TrainingConfig.load(folder.file(CONFIG_NAME))
    preprocessor = folder.load_preprocessor()
    return folder.load_model(), config, preprocessor
