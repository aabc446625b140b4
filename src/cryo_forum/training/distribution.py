"""Where training runs: one device, every local device, or the workers of a cluster described by TF_CONFIG."""

from __future__ import annotations

import json
import os

from cryo_forum.errors import InvalidSetting
from cryo_forum.tensorflow_quiet import tf


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
