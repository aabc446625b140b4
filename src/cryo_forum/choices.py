"""The names of every design choice a run can make, importable without TensorFlow.

Options are checked against these before anything heavy is imported or read; the modules that implement
the choices (encoders, heads, losses, pipeline, training) take their names from here.
"""

ENCODERS = ("small", "resnet", "vgg")
POOLINGS = ("flatten", "avg", "max", "gem")
HEAD_NAMES = ("qcqp", "quaternion", "6d", "9d")
DIRECT_LOSSES = ("geodesic", "chordal")
PAIR_WEIGHTINGS = ("none", "density", "histogram")
SCHEDULE_KINDS = ("original", "constant", "linear")
AUGMENT_METHODS = ("fourier", "bilinear")
STRATEGIES = ("default", "mirrored", "multiworker")
# uncertainty scores: those of the QCQP eigenvalues, then the directional junk score of a calibrated run
UNCERTAINTY_METRICS = (
    "dispersion_trace",
    "max_dispersion",
    "negative_eigengap",
    "expected_error_deg",
    "junk_score",
    "fit_junk_score",
)
