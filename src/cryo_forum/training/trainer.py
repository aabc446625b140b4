"""Training runs: the model, optimiser and callbacks of a TrainingConfig, trained into a run folder.

The run folder is a :class:`cryo_forum.training.run.Run`. Options and data are checked before anything is
written; every epoch commits a checkpoint atomically, so an interrupted run continues from its last completed
epoch with ``resume=True``; the training length is fixed (``optimisation.epochs``) or set by the validation
plateau rule of :class:`~cryo_forum.training.callbacks.TrainingState`. At the end the best model predicts the
validation particles and the uncertainty calibration is stored in the run.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output
from cryo_forum.model.estimator import OrientationEstimator
from cryo_forum.streams.readers import stream_errors
from cryo_forum.tensorflow_quiet import keras
from cryo_forum.training.callbacks import LossWeightScheduler, TrainingState
from cryo_forum.training.config import Optimisation, StarData, TrainingConfig
from cryo_forum.training.data import Inspected, inspect, training_data, validation_set
from cryo_forum.training.distribution import is_chief, make_strategy
from cryo_forum.training.pretraining import fine_tuning_config, noise_estimate, origin_sigma, pretraining_config
from cryo_forum.training.run import MODEL_NAME, REFERENCE_NAME, WEIGHTS_NAME, Run, load_run

log = logging.getLogger(__name__)


def build_model(config: TrainingConfig) -> OrientationEstimator:
    """The estimator the settings describe, built for images of ``config.images.image_size`` px."""
    settings, size = config.model, config.images.image_size
    encoder = {
        "name": settings.encoder,
        "image_size": size,
        "pooling": settings.pooling,
        "lowpass": settings.lowpass,
        "widths": settings.widths,
        "dropout": settings.dropout,
    }
    try:
        model = OrientationEstimator(
            encoder,
            head=settings.head,
            head_options={"psd": settings.psd} if settings.head == "qcqp" else {},
            symmetry=config.symmetry,
            direct_loss=settings.direct_loss,
            pair_weighting=settings.pair_weighting,
            uncertainty_weight=settings.uncertainty_weight,
            junk_prior=config.data.junk_prior if isinstance(config.data, StarData) else 0.0,
        )
    except ValueError as error:
        raise CryoForumError(str(error)) from None
    model.build((None, size, size, 1))
    return model


def make_optimizer(settings: Optimisation, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """AdamW; with a fixed length a linear warm-up and cosine decay over the run, else a learning rate that
    :class:`TrainingState` sets (warm-up, then halved at each plateau)."""
    if settings.automatic_length:
        return keras.optimizers.AdamW(
            learning_rate=settings.learning_rate, weight_decay=settings.weight_decay, clipnorm=5.0
        )
    total = max(1, settings.epochs * steps_per_epoch)
    warmup = min(int(settings.warmup_epochs * steps_per_epoch), total - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=settings.learning_rate / 10 if warmup else settings.learning_rate,
        decay_steps=total - warmup,
        alpha=0.01,
        warmup_target=settings.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=settings.weight_decay, clipnorm=5.0)


def check_run_folder(run: Run, resume: bool) -> None:
    """The chief's view of ``--out``: a run to resume, or a new (or empty) folder for a new one."""
    if not is_chief():
        return
    if resume and not run.exists:
        raise CryoForumError(f"{run.path}: holds no run to resume (config.yaml is missing); leave out --resume")
    if not resume and run.exists:
        raise CryoForumError(f"{run.path}: already holds a run; add --resume to continue it, or choose another folder")
    if not resume and run.path.is_dir() and any(run.path.iterdir()):
        raise CryoForumError(f"{run.path}: folder is not empty; choose a new folder for the run")


def train(config: TrainingConfig, out: str | Path, resume: bool = False, verbose: int = 0) -> keras.callbacks.History:
    """Train a model as ``config`` says into the run folder ``out`` (see the module docstring).

    Nothing is written before the options and the data have been checked; if the run fails before its first
    epoch is committed, the folder is removed again (unless resuming).
    """
    run = Run(out)
    config.validate()
    check_run_folder(run, resume)
    inspected = inspect(config.with_absolute_paths())
    strategy = make_strategy(config.optimisation.strategy)
    chief = is_chief()
    existed = run.path.exists()
    outputs = run if chief else Run(tempfile.mkdtemp(prefix="cryo-forum-worker-"))
    outputs.path.mkdir(parents=True, exist_ok=True)
    try:
        return _train(inspected, run, outputs, strategy, resume, verbose)
    except BaseException:
        if chief and not resume and run.latest_checkpoint() is None and not run.pretraining.checkpoints():
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


def _train(inspected: Inspected, run: Run, outputs: Run, strategy, resume: bool, verbose: int):
    chief = outputs is run
    latest = run.latest_checkpoint() if resume else None
    first_epoch = latest[1]["epoch"] if latest else 0
    if chief:
        run.remove_partial_checkpoints()
        run.save_config(inspected.config)
        if inspected.particles is not None:
            run.save_origin_spread(origin_sigma(inspected.particles) * inspected.particles.pixel_size)
    pretrained = _pretrain(inspected, run, strategy, verbose) if _pretrains(inspected.config) else None
    with stream_errors():
        config, data = training_data(inspected, run, resume, first_epoch)
    if chief:
        run.save_config(config)  # with the preprocessing completed from the data
    log.info(f"{'fine-tuning' if pretrained else 'training'} on {data.description}")
    schedule = fine_tuning_config(config) if pretrained else config  # the loss and learning rate in force
    with strategy.scope():
        model = build_model(config)
        model.compile(optimizer=make_optimizer(schedule.optimisation, data.steps_per_epoch))
        if latest:
            model.optimizer.build(model.trainable_variables)  # its slots exist before they are loaded
            model.load_weights(latest[0] / WEIGHTS_NAME)
        elif pretrained:
            model.set_weights(Run(pretrained).load_model().get_weights())
    settings = config.optimisation
    length = (
        f"{settings.epochs} epochs"
        if settings.epochs
        else f"until a validation plateau (at most {settings.max_epochs})"
    )
    log.info(
        f"model: {config.model.encoder} encoder ({model.count_params():,} parameters), {config.model.head} head, "
        f"{config.images.image_size} px, {strategy.num_replicas_in_sync} replica(s); {length}"
    )
    state = TrainingState(schedule, outputs, data.steps_per_epoch, latest[1] if latest else {})
    if latest and state.state.get("best_epoch") == first_epoch - 1 and chief:
        with atomic_output(run.file(MODEL_NAME)) as tmp:  # its save may have been cut short by the interrupt
            model.save(tmp)
    history = None
    if first_epoch >= settings.epoch_limit or (latest and state.state["plateaus"] >= TrainingState.MAX_PLATEAUS):
        log.info(f"{run.path}: training had already finished after {first_epoch} epochs")
    else:
        callbacks = [
            LossWeightScheduler(schedule.loss),
            keras.callbacks.TensorBoard(str(outputs.logs), write_graph=False, profile_batch=0),
            state,
        ]
        with stream_errors():
            history = model.fit(
                data.train,
                initial_epoch=first_epoch,
                epochs=settings.epoch_limit,
                steps_per_epoch=data.steps_per_epoch,
                validation_data=data.val,
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the datasets shuffle themselves, reproducibly
            )
    if chief and run.file(MODEL_NAME).exists() and config.model.head == "qcqp":
        calibrate_on_validation(run)
    return history


def _pretrains(config: TrainingConfig) -> bool:
    """Whether a run pre-trains on particles simulated from its own reconstruction (labelled particles only)."""
    if not isinstance(config.data, StarData) or not config.data.pretrain:
        return False
    if config.optimisation.strategy == "multiworker":
        log.info("pre-training is skipped under the multiworker strategy (give --no-pretrain to silence this)")
        return False
    return True


def _pretrain(inspected: Inspected, run: Run, strategy, verbose: int) -> Path:
    """Reference map, noise and CTFs of the consensus set, then a map run on them; the pre-trained run's folder."""
    from cryo_forum.io.mrc import read_volume
    from cryo_forum.physics.reconstruction import reference_map

    config, particles = inspected.config, inspected.particles
    pretraining = run.pretraining
    if not run.file(REFERENCE_NAME).exists():
        log.info(f"pre-training, step 1 of 3: reconstructing the reference map of {len(particles)} particles")
        reference = reference_map(particles, inspected.split.indices["train"], config.symmetry, progress=verbose > 0)
        run.save_reference(reference)
        log.info(f"reference map: {run.file(REFERENCE_NAME)} (half maps agree to {reference.resolution}, FSC 0.143)")
    reference, _ = read_volume(run.file(REFERENCE_NAME))
    if not pretraining.exists or pretraining.latest_checkpoint() is None or not _finished(pretraining):
        noise = noise_estimate(particles, inspected.split.indices["train"], reference)
        simulated = pretraining_config(config, str(run.file(REFERENCE_NAME)), particles.pixel_size, noise)
        log.info(
            f"pre-training, step 2 of 3: {config.data.pretrain_epochs} epochs of {simulated.data.particles_per_epoch} "
            f"particles simulated from the reference with the set's CTFs and noise spectrum (SNR {noise.snr:.3f} "
            f"from {noise.particles} particles), centred to within {simulated.data.max_shift_px:g} px, into "
            f"{pretraining.path}"
        )
        train(simulated, pretraining.path, resume=pretraining.exists, verbose=verbose)
    log.info("pre-training, step 3 of 3: fine-tuning on the set's own images")
    return pretraining.path


def _finished(run: Run) -> bool:
    latest = run.latest_checkpoint()
    return latest is not None and latest[1]["epoch"] >= run.load_config().optimisation.epoch_limit


def calibrate_on_validation(run: Run) -> None:
    """Predict the validation particles with the best model and store the uncertainty calibration.

    Thresholds for ``cryo-forum filter`` come from these predictions, never from the set being filtered.
    """
    from cryo_forum.io.star import EXPECTED_ERROR, OUTLIER
    from cryo_forum.prediction.calibration import FIT_JUNK_SCORE as FIT_JUNK_METRIC
    from cryo_forum.prediction.calibration import calibrate, pose_errors_deg
    from cryo_forum.prediction.predict import predict_particles

    model, config, preprocessor = load_run(run.path)
    particles, indices = validation_set(run, config)
    table = predict_particles(model, particles, preprocessor, indices, progress=False)
    truth = particles.table if indices is None else particles.table.iloc[indices]
    errors = pose_errors_deg(table, truth, config.symmetry)
    if OUTLIER in truth:
        table[OUTLIER] = truth[OUTLIER].to_numpy()
    calibration = calibrate(table, errors_deg=errors, symmetry=config.symmetry)
    if run.file(REFERENCE_NAME).exists() and EXPECTED_ERROR in table:
        bounds, fit_entry = _refined_calibration(run, particles, indices, table, truth, errors, config, calibration)
        calibration["bound_90"] = bounds
        calibration["metrics"][FIT_JUNK_METRIC] = fit_entry
    path = run.save_calibration(calibration)
    log.info(f"uncertainty calibrated on {len(table)} validation particles: {path}")


def _refined_calibration(run: Run, particles, indices, table, truth, errors, config, calibration) -> tuple[dict, dict]:
    """From the validation particles refined against the run's reference: the 90 % bound factor of the network's
    expected error (on the particles the fit junk score keeps, because the unflagged junk of a consensus set has
    random poses that no error estimate should cover) and the fit junk score's calibration. The refined error needs
    no factor: the fit's own curvature gives it (its 90 % bound covered 88 % of the realistic job's true particles,
    where a factor taken against the consensus poses, which carry errors of their own, made it 30 times too wide).

    The particles are searched as ``predict`` searches them: out to the network's 90 % bound of ``calibration``."""
    import numpy as np

    from cryo_forum.geometry import euler_to_quaternion
    from cryo_forum.io.star import ANGLES, ERROR_BOUND, EXPECTED_ERROR, FIT_JUNK_SCORE
    from cryo_forum.prediction.calibration import bound_factor, error_bounds, metric_entry, pose_errors_deg
    from cryo_forum.prediction.refine_settings import RefineSettings
    from cryo_forum.prediction.refinement import FIT_JUNK_THRESHOLD, refine_particles, search_widths
    from cryo_forum.prediction.search_map import search_map

    chosen = particles if indices is None else particles.subset(indices)
    volume = search_map(run.file(REFERENCE_NAME), chosen)
    poses = euler_to_quaternion(table[list(ANGLES)].to_numpy(np.float64))
    searched = table.copy()
    network_bounds = error_bounds(calibration, "network", table[EXPECTED_ERROR])
    if network_bounds is not None:
        searched[ERROR_BOUND] = network_bounds
    widths, settings = search_widths(searched, RefineSettings(symmetry=config.symmetry), "the validation predictions")
    refined = refine_particles(chosen, volume, poses, widths, settings=settings, progress=False)
    fit = refined[FIT_JUNK_SCORE].to_numpy()
    kept = fit <= FIT_JUNK_THRESHOLD
    refined_errors = pose_errors_deg(refined, truth, config.symmetry)
    bounds = {
        "network": bound_factor(errors[kept], table[EXPECTED_ERROR].to_numpy(np.float64)[kept]),
        "particles": int(kept.sum()),
        "rule": f"validation particles with {FIT_JUNK_SCORE} <= {FIT_JUNK_THRESHOLD:g} after refinement",
    }
    return bounds, metric_entry(fit, refined_errors)
