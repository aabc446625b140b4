"""Test-wide settings: keep Keras, matplotlib and Jupyter out of the home folder, and TF quiet."""

import os
import tempfile

_scratch_home = tempfile.mkdtemp(prefix="cryo-forum-tests-")
os.environ["KERAS_HOME"] = os.path.join(_scratch_home, "keras")
os.environ["MPLCONFIGDIR"] = os.path.join(_scratch_home, "matplotlib")
os.environ["JUPYTER_CONFIG_DIR"] = os.path.join(_scratch_home, "jupyter")
os.environ["JUPYTER_DATA_DIR"] = os.path.join(_scratch_home, "jupyter-data")
os.environ["IPYTHONDIR"] = os.path.join(_scratch_home, "ipython")
os.environ["MPLBACKEND"] = "Agg"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
