"""The callbacks of a training run: loss weights per epoch, and the state committed after every epoch."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output
from cryo_forum.tensorflow_quiet import keras
from cryo_forum.training.config import LossSchedule, TrainingConfig
from cryo_forum.training.run import MODEL_NAME, Run

MONITOR = "val_median_error_deg"
log = logging.getLogger(__name__)


class LossWeightScheduler(keras.callbacks.Callback):
    """Sets the model's (w_dist, w_direct) from a LossSchedule at the start of every epoch (also after resume)."""

    def __init__(self, schedule: LossSchedule):
        super().__init__()
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        self.model.set_loss_weights(*self.schedule(epoch))


class TrainingState(keras.callbacks.Callback):
    """After every epoch: log it, commit a checkpoint, keep the best model, apply the stopping rule.

    Order matters for interrupts: the checkpoint (weights, optimiser, history rows, best value, rule counters)
    is committed first, then model.keras is replaced if this epoch is the best; a resumed run whose newest
    checkpoint is also its best epoch rewrites model.keras from it, so the two always agree.

    Automatic length (``optimisation.epochs`` None): the learning rate warms up over ``warmup_epochs``, then stays
    until the validation median has not improved by ``MIN_IMPROVEMENT`` for ``patience`` epochs (counted
    once the loss hand-over is over); each such plateau halves it and the ``MAX_PLATEAUS``-th ends the run.
    """

    MIN_IMPROVEMENT = 0.01
    MAX_PLATEAUS = 3

    def __init__(self, config: TrainingConfig, outputs: Run, steps_per_epoch: int, state: dict[str, Any]):
        super().__init__()
        self.settings = config.optimisation
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
        self.monitor_from = config.loss.handed_over
        self._started = time.monotonic()

    # learning rate under the automatic length
    def on_train_batch_begin(self, batch, logs=None):
        if not self.settings.automatic_length:
            return
        step = self._epoch * self.steps_per_epoch + batch
        warmup = self.settings.warmup_epochs * self.steps_per_epoch
        if step <= warmup + 1:
            factor = 0.1 + 0.9 * min(step / warmup, 1.0) if warmup > 0 else 1.0
            self.model.optimizer.learning_rate.assign(self.settings.learning_rate * factor * self.state["lr_scale"])

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._started = time.monotonic()
        if self.settings.automatic_length:
            self.model.optimizer.learning_rate.assign(self.settings.learning_rate * self.state["lr_scale"])

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
        state["history"].append({"epoch": epoch, **logs, "seconds": time.monotonic() - self._started})
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
        if not self.settings.automatic_length or not np.isfinite(value):
            return False
        if state["reference"] is None or value < state["reference"] * (1.0 - self.MIN_IMPROVEMENT):
            state["reference"], state["wait"] = value, 0
            return False
        if epoch + 1 < self.monitor_from:
            return False
        state["wait"] += 1
        if state["wait"] < self.settings.patience:
            return False
        state["wait"] = 0
        state["plateaus"] += 1
        state["lr_scale"] *= 0.5
        if state["plateaus"] < self.MAX_PLATEAUS:
            rate = self.settings.learning_rate * state["lr_scale"]
            log.info(f"plateau {state['plateaus']}: learning rate halved to {rate:.2g}")
        return state["plateaus"] >= self.MAX_PLATEAUS

    def _log(self, epoch: int, logs: dict[str, float], improved: bool) -> None:
        limit = self.settings.epoch_limit
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
