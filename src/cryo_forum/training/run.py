"""A run folder: what ``cryo-forum train`` writes and ``predict``, ``export``, ``filter`` read.

:class:`Run` is the only code that knows the folder's files and reads or writes them: ``config.yaml`` (every
setting, the preprocessing included, see :mod:`cryo_forum.training.config`), ``split.json``
(:class:`~cryo_forum.streams.splits.Split`), ``model.keras`` (the best epoch), ``history.csv`` (one row per
completed epoch), ``calibration.json`` (:mod:`cryo_forum.prediction.calibration`), ``logs/`` (TensorBoard),
``origins.json`` (the spread of a labelled set's origins), ``checkpoints/`` and, for map runs, the fixed
simulated sets ``val/`` and ``test/``.

Every file is replaced atomically, so an interrupt at any moment (Ctrl-C, SIGTERM, SIGKILL) leaves a run that
``--resume`` continues: a checkpoint is a folder ``checkpoints/epoch-NNNNN`` holding the model and optimiser
weights and the training state (history rows, best value, stopping-rule counters), built under a temporary
name and renamed into place in one step; ``history.csv`` is rewritten from the newest checkpoint's rows, so
the two never disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output

CONFIG_NAME = "config.yaml"
SPLIT_NAME = "split.json"
MODEL_NAME = "model.keras"
HISTORY_NAME = "history.csv"
CALIBRATION_NAME = "calibration.json"
CACHE_NAME = "cache.h5"
REFERENCE_NAME = "reference.mrc"
ORIGINS_NAME = "origins.json"
PRETRAINING = "pretrain"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
WEIGHTS_NAME = "weights.weights.h5"
STATE_NAME = "state.json"
_CHECKPOINT_PREFIX = "epoch-"
_KEPT_CHECKPOINTS = 2


class Run:
    """The run folder at ``path`` (which may not exist yet)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def exists(self) -> bool:
        """Whether the folder holds a run (its config.yaml)."""
        return self.file(CONFIG_NAME).is_file()

    @property
    def has_split(self) -> bool:
        return self.file(SPLIT_NAME).is_file()

    @property
    def pretraining(self) -> Run:
        """The run folder of the pre-training stage (particles simulated from the set's own map)."""
        return Run(self.path / PRETRAINING)

    def save_reference(self, reference) -> None:
        """The reference map a run reconstructed from its consensus set
        (:class:`~cryo_forum.physics.reconstruction.ReferenceMap`), multiplied by its mask when it has one: the
        particles simulated from it then carry no solvent noise, and searches against it are not misled by it."""
        from cryo_forum.io.mrc import write_volume

        masked = reference.map * reference.mask if reference.mask.any() else reference.map
        write_volume(self.file(REFERENCE_NAME), masked, reference.pixel_size)

    def save_origin_spread(self, sigma_angstrom: float) -> None:
        """The spread (std per axis, A) of the training particles' origins: how far off-centre particles picked
        like them may be, which is where ``predict`` looks for the origins of particles without them."""
        with atomic_output(self.file(ORIGINS_NAME)) as tmp:
            tmp.write_text(json.dumps({"sigma_angstrom": float(sigma_angstrom)}) + "\n", encoding="utf-8")

    def load_origin_spread(self) -> float | None:
        """The spread saved by :meth:`save_origin_spread` in A (None for a run without it)."""
        path = self.file(ORIGINS_NAME)
        if not path.exists():
            return None
        try:
            return float(json.loads(path.read_text(encoding="utf-8"))["sigma_angstrom"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CryoForumError(f"{path}: not a readable origins file ({error})") from None

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    def fixed_set(self, name: str) -> Path:
        """The STAR file of a map run's fixed simulated set ``name`` ("val" or "test")."""
        return self.path / name / "particles.star"

    # ------------------------------------------------------------ settings, split, calibration

    def load_config(self):
        """The run's TrainingConfig; CryoForumError when the folder holds no run."""
        from cryo_forum.training.config import TrainingConfig

        if not self.exists:
            raise CryoForumError(f"{self.path}: not a cryo-forum run folder ({CONFIG_NAME} is missing)")
        return TrainingConfig.load(self.file(CONFIG_NAME))

    def save_config(self, config) -> None:
        config.save(self.file(CONFIG_NAME))

    def load_preprocessor(self):
        """How the run prepares images: the ``images`` section of its config, completed from its data."""
        preprocessor = self.load_config().images
        if not preprocessor.is_resolved:
            raise CryoForumError(f"{self.file(CONFIG_NAME)}: the run never saw its data (images section incomplete)")
        return preprocessor

    def load_split(self):
        """The run's :class:`~cryo_forum.streams.splits.Split`."""
        from cryo_forum.streams.splits import Split

        path = self.file(SPLIT_NAME)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CryoForumError(f"{path}: split file not found") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CryoForumError(f"{path}: not a readable split file ({error})") from None
        return Split.from_document(document, str(path))

    def save_split(self, split) -> None:
        with atomic_output(self.file(SPLIT_NAME)) as tmp:
            tmp.write_text(json.dumps(split.to_document(), indent=1) + "\n", encoding="utf-8")

    def load_calibration(self) -> dict:
        """calibration.json; CryoForumError naming the file when it is missing or damaged."""
        from cryo_forum.prediction.calibration import check_calibration

        path = self.file(CALIBRATION_NAME)
        if not path.is_file():
            raise CryoForumError(
                f"{path}: not found; the run has no uncertainty calibration (train with a qcqp head, or give "
                "--threshold)"
            )
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CryoForumError(f"{path}: cannot read the calibration ({error})") from None
        return check_calibration(document, str(path))

    def save_calibration(self, calibration: dict) -> Path:
        path = self.file(CALIBRATION_NAME)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(calibration, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (an interrupted one has a temporary name and is skipped)."""
        folder = self.path / CHECKPOINTS
        if not folder.is_dir():
            return []
        found = [item for item in folder.iterdir() if item.is_dir() and item.name.startswith(_CHECKPOINT_PREFIX)]
        return sorted(found, key=lambda item: item.name)

    def latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint folder and its state, or None before the first epoch ended."""
        checkpoints = self.checkpoints()
        if not checkpoints:
            return None
        latest = checkpoints[-1]
        try:
            state = json.loads((latest / STATE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CryoForumError(
                f"{latest}: damaged checkpoint ({error}); delete it to resume from the one before"
            ) from None
        return latest, state

    def save_checkpoint(self, model, epoch: int, state: dict[str, Any]) -> Path:
        """Commit the model's weights (optimiser included) and ``state`` after ``epoch`` epochs, atomically.

        Older checkpoints beyond the last two are removed afterwards; history.csv follows from ``state``.
        """
        folder = self.path / CHECKPOINTS
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".epoch.", suffix=".partial", dir=folder))
        try:
            model.save_weights(staging / WEIGHTS_NAME)
            (staging / STATE_NAME).write_text(json.dumps({**state, "epoch": epoch}, indent=1) + "\n")
            _fsync_folder(staging)
            target = folder / f"{_CHECKPOINT_PREFIX}{epoch:05d}"
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in self.checkpoints()[:-_KEPT_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        self.write_history(state.get("history", []))
        return target

    def remove_partial_checkpoints(self) -> None:
        """Delete checkpoint folders an interrupt left half-written."""
        folder = self.path / CHECKPOINTS
        if folder.is_dir():
            for item in folder.glob(".epoch.*.partial"):
                shutil.rmtree(item, ignore_errors=True)

    def write_history(self, rows: list[dict[str, float]]) -> None:
        """history.csv: one row per completed epoch, columns ``epoch`` then the logged values (``seconds``: the
        epoch's wall time, its validation pass included)."""
        columns = ["epoch", *sorted({key for row in rows for key in row} - {"epoch"})]
        lines = [",".join(columns)]
        lines += [",".join(_csv_value(row.get(column)) for column in columns) for row in rows]
        with atomic_output(self.file(HISTORY_NAME)) as tmp:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")

    # ------------------------------------------------------------ the trained model

    def load_model(self):
        """The best model (model.keras), with errors that name the file instead of a Keras traceback."""
        from cryo_forum.tensorflow_quiet import keras

        path = self.file(MODEL_NAME)
        if not path.is_file():
            raise CryoForumError(
                f"{self.path}: no {MODEL_NAME} (is it a cryo-forum run folder, and did an epoch finish?)"
            )
        if not zipfile.is_zipfile(path):
            raise CryoForumError(f"{path}: not a Keras model file (damaged or truncated)")
        try:
            with _quiet_keras_loading():
                model = keras.models.load_model(path)
        except ValueError as error:
            if "Lambda" in str(error) and "safe" in str(error):
                raise CryoForumError(
                    f"{path}: holds a Lambda layer, arbitrary code that cryo-forum refuses to load (safe mode)"
                ) from None
            raise CryoForumError(f"{path}: cannot load the model ({_first_line(error)})") from None
        except Exception as error:
            raise CryoForumError(
                f"{path}: cannot load the model ({type(error).__name__}: {_first_line(error)})"
            ) from None
        from cryo_forum.model.estimator import OrientationEstimator

        if not isinstance(model, OrientationEstimator):
            raise CryoForumError(f"{path}: a Keras model, but not a cryo-forum orientation estimator")
        return model


def _csv_value(value) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet_keras_loading():
    """Keras warns on stderr about every file it cannot quite read; the error message says enough."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _fsync_folder(folder: Path) -> None:
    """Flush the files of ``folder`` to disk before it is renamed into place (a crash keeps them whole)."""
    for item in folder.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())


def load_run(path: str | os.PathLike):
    """(model, config, preprocessor) of a run folder, with one-line errors for a damaged or foreign one."""
    run = Run(path)
    config = run.load_config()
    return run.load_model(), config, run.load_preprocessor()
