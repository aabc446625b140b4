"""Export a trained model as a TensorFlow SavedModel for serving.

The SavedModel's serving_default signature takes a batch of preprocessed images, float32
[N, S, S, 1], and returns "quaternion" [N, 4] ([x, y, z, w], RELION's matrix A) and, for the qcqp head,
"eigenvalues" [N, 4] (ascending). DIR/config.yaml and DIR/preprocess.json say how the images were
preprocessed (image size, pixel size, normalisation, mask). Images of another size or rank are refused with
InvalidArgumentError. Load it without cryo-forum:
  tf.saved_model.load(DIR).signatures["serving_default"](images=batch)

Example:
  cryo-forum export --model run1 --out run1_savedmodel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

PREPROCESS_NAME = "preprocess.json"  # beside the SavedModel: how to prepare its input images


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="RUN", help="a cryo-forum run folder")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for the SavedModel (new or empty)"
    )


def export_saved_model(model, image_size: int, directory: Path) -> None:
    """Write ``model`` as a SavedModel with a serving_default signature into ``directory`` (must not exist).

    A loaded signature does not check its input's shape, and a convolution given images of the wrong rank
    aborts the whole process, so the signature asserts ``[N, S, S, 1]`` itself: a wrong input raises
    InvalidArgumentError in the caller instead.
    """
    from cryo_forum.tensorflow_quiet import tf

    module = tf.Module()
    module.model = model
    expected = [image_size, image_size, 1]

    @tf.function(input_signature=[tf.TensorSpec([None, *expected], tf.float32, name="images")])
    def serve(images):
        shape = tf.shape(images)
        padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)[:4]  # any rank compares without error
        fits = tf.logical_and(tf.equal(tf.size(shape), 4), tf.reduce_all(tf.equal(padded[1:], expected)))
        check = tf.debugging.Assert(fits, [f"images must be float32 [N, {image_size}, {image_size}, 1], got", shape])
        with tf.control_dependencies([check]):
            outputs = model(tf.identity(images), training=False)
        return {key: tf.identity(value, name=key) for key, value in outputs.items()}

    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.atomic import atomic_directory
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.training.run import CONFIG_NAME, load_run

    OutputGuard().protect(args.model, "a file of the run").check_folder(args.out)
    model, _, preprocessor = load_run(args.model)
    with atomic_directory(args.out) as staging:
        export_saved_model(model, preprocessor.image_size, staging / "saved_model")
        shutil.copy2(args.model / CONFIG_NAME, staging / CONFIG_NAME)
        (staging / PREPROCESS_NAME).write_text(json.dumps(dataclasses.asdict(preprocessor), indent=2) + "\n")
        for item in (staging / "saved_model").iterdir():
            item.rename(staging / item.name)
        (staging / "saved_model").rmdir()
    print(
        f"SavedModel written to {args.out} (serving_default: images [N, {preprocessor.image_size}, "
        f"{preprocessor.image_size}, 1] -> quaternion, eigenvalues)"
    )
    return 0
