"""Export a trained model as a TensorFlow SavedModel for serving.

The SavedModel's serving_default signature takes a batch of preprocessed images, float32
[N, S, S, 1], and returns "quaternion" [N, 4] ([x, y, z, w], RELION's matrix A) and, for the qcqp head,
"eigenvalues" [N, 4] (ascending). DIR/config.yaml and DIR/preprocess.json say how the images were
preprocessed (image size, pixel size, normalisation, mask). Load it without cryo-forum:
  tf.saved_model.load(DIR).signatures["serving_default"](images=batch)

Example:
  cryo-forum export --model run1 --out run1_savedmodel
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="RUN", help="a cryo-forum run folder")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the SavedModel")


def export_saved_model(model, image_size: int, directory: Path) -> None:
    """Write ``model`` as a SavedModel with a serving_default signature into ``directory`` (must not exist)."""
    from cryo_forum.tensorflow_quiet import tf

    module = tf.Module()
    module.model = model

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 1], tf.float32, name="images")])
    def serve(images):
        outputs = model(images, training=False)
        return {key: tf.identity(value, name=key) for key, value in outputs.items()}

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.atomic import atomic_directory
    from cryo_forum.training import CONFIG_NAME, load_run

    model, config, _ = load_run(args.model)
    with atomic_directory(args.out) as staging:
        export_saved_model(model, config.image_size, staging / "saved_model")
        for name in (CONFIG_NAME, "preprocess.json"):
            shutil.copy2(args.model / name, staging / name)
        for item in (staging / "saved_model").iterdir():
            item.rename(staging / item.name)
        (staging / "saved_model").rmdir()
    print(
        f"SavedModel written to {args.out} (serving_default: images [N, {config.image_size}, "
        f"{config.image_size}, 1] -> quaternion, eigenvalues)"
    )
    return 0
