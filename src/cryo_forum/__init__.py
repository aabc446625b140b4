"""cryo-forum: amortised orientation estimation with Bingham uncertainty for single-particle cryo-EM.

The package imports nothing heavy at the top level, so `cryo-forum info` stays fast; TensorFlow is
loaded by the modules that need it, through :mod:`cryo_forum.tensorflow_quiet`.
"""

__version__ = "0.1.0"
