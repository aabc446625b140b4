"""The orientation estimator: encoder + rotation head, trained by pairwise distance matching and a direct loss.

One encoder pass over a batch of B images gives B poses and so B(B-1)/2 pairs for the distance loss (the
original ran a two-branch Siamese network per pair). The loss is
``w_dist * mean |d_pred - d_true| + w_direct * direct pose loss + w_unc * Bingham NLL`` (the last only for the
qcqp head); w_dist and w_direct are non-trainable variables that :class:`LossWeightScheduler` sets at the start
of every epoch from a :class:`~cryo_forum.model.losses.LossSchedule`. Labelled outliers (target ``"outlier" == 1``)
take part in no pose loss, but in the Bingham likelihood, where their random poses teach a flat belief.
Validation reports the mean and median pose error in degrees (symmetric when a point group is set).
"""

from __future__ import annotations

import math

from cryo_forum.geometry import normalise_symmetry_name, symmetry_quaternions
from cryo_forum.model.encoders import build_encoder
from cryo_forum.model.heads import build_head
from cryo_forum.model.losses import bingham_nll, pairwise_distance_loss, pose_errors
from cryo_forum.tensorflow_quiet import keras, tf


@keras.saving.register_keras_serializable(package="cryo_forum")
class MedianAngle(keras.metrics.Metric):
    """Median of angles in degrees over everything seen, from a histogram (``resolution`` degrees per bin).

    A histogram sums across replicas and batches, so the median is exact to one bin under any
    tf.distribute strategy without keeping every error in memory.
    """

    def __init__(self, resolution: float = 0.1, name: str = "median_error_deg", **kwargs):
        super().__init__(name=name, **kwargs)
        self.resolution = float(resolution)
        self.bins = math.ceil(180.0 / self.resolution)
        self.counts = self.add_variable(shape=(self.bins,), initializer="zeros", name="counts", aggregation="sum")

    def update_state(self, angles_deg, sample_weight=None):
        angles_deg = tf.reshape(tf.cast(angles_deg, tf.float32), [-1])
        weights = (
            tf.ones_like(angles_deg) if sample_weight is None else tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        )
        index = tf.clip_by_value(tf.cast(angles_deg / self.resolution, tf.int32), 0, self.bins - 1)
        self.counts.assign_add(tf.math.unsorted_segment_sum(weights, index, self.bins))

    def result(self):
        cumulative = tf.cumsum(self.counts)
        half = 0.5 * cumulative[-1]
        first = tf.argmax(tf.cast(cumulative >= half, tf.int32))
        return tf.where(cumulative[-1] > 0, (tf.cast(first, tf.float32) + 0.5) * self.resolution, float("nan"))

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self):
        return {**super().get_config(), "resolution": self.resolution}


@keras.saving.register_keras_serializable(package="cryo_forum")
class OrientationEstimator(keras.Model):
    """Preprocessed particle images [B, S, S, 1] -> {"quaternion": [B, 4], "eigenvalues": [B, 4] (qcqp head)}.

    Args:
        encoder: keyword arguments of :func:`cryo_forum.model.encoders.build_encoder` (``name``, ``image_size``,
            ``pooling``, ``lowpass``, ``widths``, ``dropout`` and the encoder's own options).
        head: rotation head name (qcqp, quaternion, 6d, 9d); head_options: its keyword arguments.
        symmetry: point group of the particle; distances and errors are then symmetric.
        direct_loss: "geodesic" or "chordal"; pair_weighting: "none", "density" or "histogram".
        uncertainty_weight: weight of the Bingham negative log-likelihood (qcqp head), which calibrates the
            eigenvalues: 0 trains the pose alone.
        junk_prior: the share of unlabelled training particles whose poses may be meaningless (junk in a
            consensus refinement; qcqp head). Each such particle's likelihood is then a mixture of its Bingham
            belief and a uniform one, and its pose losses are weighted by how well the belief explains its label
            (the mixture's responsibility, held fixed): a particle whose label the image cannot explain stops
            pulling the network, and its belief goes flat. 0 trusts every label.
    """

    def __init__(
        self,
        encoder: dict,
        head: str = "qcqp",
        head_options: dict | None = None,
        symmetry: str = "C1",
        direct_loss: str = "geodesic",
        pair_weighting: str = "none",
        uncertainty_weight: float = 0.1,
        junk_prior: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder_options = dict(encoder)
        self.head_name = str(head).lower()
        self.head_options = dict(head_options or {})
        self.symmetry = normalise_symmetry_name(symmetry)
        self.direct_loss = direct_loss
        self.pair_weighting = pair_weighting
        self.uncertainty_weight = float(uncertainty_weight)
        self.junk_prior = float(junk_prior)
        if not 0.0 <= self.junk_prior < 1.0:
            raise ValueError(f"junk_prior must be in [0, 1), got {junk_prior}")
        self.encoder = build_encoder(**self.encoder_options)
        self.head = build_head(self.head_name, name="head", **self.head_options)
        group = symmetry_quaternions(self.symmetry)
        self.group = None if len(group) == 1 else group
        self.distance_weight = self.add_weight(shape=(), initializer="ones", trainable=False, name="distance_weight")
        self.direct_weight = self.add_weight(shape=(), initializer="ones", trainable=False, name="direct_weight")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.distance_tracker = keras.metrics.Mean(name="distance_loss")
        self.direct_tracker = keras.metrics.Mean(name="direct_loss")
        self.nll_tracker = keras.metrics.Mean(name="bingham_nll")
        self.mean_error = keras.metrics.Mean(name="mean_error_deg")
        self.median_error = MedianAngle(name="median_error_deg")

    @property
    def image_size(self) -> int:
        return int(self.encoder_options.get("image_size", 64))

    @property
    def has_uncertainty(self) -> bool:
        return self.head_name == "qcqp"

    def build(self, input_shape):
        self.encoder.build(input_shape)
        self.head.build((None, self.encoder.feature_dim))
        self.built = True

    def call(self, images, training=False):
        return self.head(self.encoder(images, training=training))

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.distance_tracker, self.direct_tracker, self.mean_error, self.median_error]
        return [*trackers, self.nll_tracker] if self.has_uncertainty else trackers

    def set_loss_weights(self, distance: float, direct: float) -> None:
        """Set (w_dist, w_direct); :class:`LossWeightScheduler` calls this every epoch."""
        self.distance_weight.assign(float(distance))
        self.direct_weight.assign(float(direct))

    def _pose_losses(self, outputs, targets) -> dict:
        """The weighted total and its parts: distance, direct, Bingham NLL (qcqp head) and the inlier mask.

        Every particle counts with its target weight (view balance); labelled outliers count in no pose loss
        but in the likelihood, whose flat target teaches them a flat belief; with ``junk_prior`` the other
        particles' pose losses are weighted by their (fixed) responsibility of being explained by their belief.
        """
        q_pred = outputs["quaternion"]
        q_true = tf.cast(targets.quaternion, q_pred.dtype)
        outlier = tf.cast(targets.outlier, q_pred.dtype)
        weight = tf.cast(targets.weight, q_pred.dtype)
        inlier = 1.0 - outlier
        parts = {"inlier": inlier}
        pose_weight = weight * inlier
        if self.has_uncertainty:
            nll, responsibility = self._likelihood(q_true, outputs, outlier)
            parts["nll"] = tf.math.divide_no_nan(tf.reduce_sum(weight * nll), tf.reduce_sum(weight))
            pose_weight = pose_weight * responsibility
        parts["distance"] = pairwise_distance_loss(
            q_pred, q_true, self.group, self.pair_weighting, sample_mask=pose_weight
        )
        parts["errors"] = pose_errors(q_pred, q_true, self.group, "geodesic")  # radians, also for the metrics
        per_particle = (
            parts["errors"]
            if self.direct_loss == "geodesic"
            else pose_errors(q_pred, q_true, self.group, self.direct_loss)
        )
        parts["direct"] = tf.math.divide_no_nan(tf.reduce_sum(per_particle * pose_weight), tf.reduce_sum(pose_weight))
        total = self.distance_weight * parts["distance"] + self.direct_weight * parts["direct"]
        if self.has_uncertainty:
            total = total + self.uncertainty_weight * parts["nll"]
        if self.losses:
            total = total + tf.add_n(self.losses)
        parts["total"] = total
        return parts

    def _likelihood(self, q_true, outputs, outlier):
        """Per-particle NLL [B] and responsibility [B] (1: the belief explains the label; no gradient).

        Labelled outliers keep the plain Bingham NLL (their target is a flat belief); with ``junk_prior`` e the
        others use ``-log((1 - e) p_B + e / (2 pi^2))``, 1 / (2 pi^2) being the uniform density on unit
        quaternions, the value of the Bingham density at zero concentration.
        """
        bingham = bingham_nll(q_true, outputs["matrix"], outputs["eigenvalues"], self.group)
        if self.junk_prior == 0.0:
            return bingham, tf.ones_like(bingham)
        explained = math.log(1.0 - self.junk_prior) - bingham
        unexplained = tf.fill(tf.shape(bingham), math.log(self.junk_prior) - math.log(2.0 * math.pi**2))
        unexplained = tf.cast(unexplained, bingham.dtype)
        mixture = -tf.reduce_logsumexp(tf.stack([explained, unexplained]), axis=0)
        responsibility = tf.stop_gradient(tf.sigmoid(explained - unexplained))
        return outlier * bingham + (1.0 - outlier) * mixture, responsibility

    def _update_metrics(self, parts):
        self.loss_tracker.update_state(parts["total"])
        self.distance_tracker.update_state(parts["distance"])
        self.direct_tracker.update_state(parts["direct"])
        if "nll" in parts:
            self.nll_tracker.update_state(parts["nll"])
        errors = parts["errors"] * (180.0 / math.pi)
        self.mean_error.update_state(errors, sample_weight=parts["inlier"])
        self.median_error.update_state(errors, sample_weight=parts["inlier"])
        logs = {metric.name: metric.result() for metric in self.metrics}
        if isinstance(self._distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3 reduces multi-worker step outputs with reduce("MEAN", axis=0), which needs a batch axis.
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def train_step(self, data):
        images, targets = data
        with tf.GradientTape() as tape:
            outputs = self(images, training=True)
            parts = self._pose_losses(outputs, targets)
            scaled = self.optimizer.scale_loss(parts["total"])
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._update_metrics(parts)

    def test_step(self, data):
        images, targets = data
        outputs = self(images, training=False)
        return self._update_metrics(self._pose_losses(outputs, targets))

    def predict_step(self, data):
        images = data[0] if isinstance(data, tuple) else data
        return self(images, training=False)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 builds a distributed model from its first batch reduced with strategy.reduce, which
        # MultiWorkerMirroredStrategy cannot apply to a nested (images, targets) batch. Build from this
        # worker's first replica's batch instead; the model is built already, only the trackers need it.
        strategy = self._distribute_strategy
        if iterator is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, batches in iterator:
            first = next(batches)
            break
        local = tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], first)
        return super()._maybe_symbolic_build(data_batch=local)

    def get_config(self):
        return {
            "name": self.name,
            "encoder": self.encoder_options,
            "head": self.head_name,
            "head_options": self.head_options,
            "symmetry": self.symmetry,
            "direct_loss": self.direct_loss,
            "pair_weighting": self.pair_weighting,
            "uncertainty_weight": self.uncertainty_weight,
            "junk_prior": self.junk_prior,
        }


def inference_function(model: OrientationEstimator):
    """``model(images, training=False)`` traced into a graph: TF fuses the layers, faster than eager calls."""
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)
