"""Import TensorFlow and Keras without their start-up chatter on stderr.

TensorFlow's C++ runtime prints CUDA and oneDNN notices through absl before any Python logging
setting applies (TF_CPP_MIN_LOG_LEVEL does not reach them), so the import runs with file
descriptor 2 pointed at /dev/null. Errors raised by the import still propagate as exceptions.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_quietly():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras
        import tensorflow

    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
    tensorflow.get_logger().setLevel("ERROR")
    return tensorflow, keras


tf, keras = _import_quietly()

__all__ = ["keras", "tf"]
