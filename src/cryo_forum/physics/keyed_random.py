"""Random numbers keyed by (seed, particle index), in TensorFlow: the same numbers whatever the batch.

TensorFlow's stateless generators take one seed per call, so a batch drawn with them depends on how it was cut.
Here every particle has its own 64-bit key, a hash of (seed, domain, index), and its k-th random 64-bit word is
``mix(key + (k + 1) * golden)``: the k-th output of SplitMix64 (Steele, Lea and Flood 2014) started at the key.
That is a counter-based generator, so any particle's numbers are computed directly, for a whole batch at once
(integer arithmetic on ``uint64``, vectorised and compiled by XLA like the rest of the batch).
"""

from __future__ import annotations

import math

from cryo_forum.tensorflow_quiet import tf

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, SplitMix64's increment
_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
_SHIFTS = (30, 27, 31)
_UNIT = 2.0**-24  # float32 uniforms take 24 bits


def _u64(value: int) -> tf.Tensor:
    return tf.constant(value % 2**64, tf.uint64)


def _mix(x: tf.Tensor) -> tf.Tensor:
    """SplitMix64's output function, a bijection of uint64 that scrambles every bit."""
    for shift, multiplier in zip(_SHIFTS[:2], _MULTIPLIERS, strict=True):
        x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u64(shift))) * _u64(multiplier)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u64(_SHIFTS[2])))


def particle_keys(seed, domain: int, index: tf.Tensor) -> tf.Tensor:
    """Keys uint64 [B] of particles ``index`` (int64 [B], any values) of the stream (seed, domain); ``seed`` is an
    integer or an int64 scalar tensor."""
    seed = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)
    stream = _mix(_mix(seed) + _u64(domain * _GOLDEN))
    return _mix(stream + tf.bitcast(tf.cast(index, tf.int64), tf.uint64) * _u64(_GOLDEN))


def _words(keys: tf.Tensor, count: int, first: int) -> tf.Tensor:
    """Random words ``first`` to ``first + count - 1`` of each key: uint64 [B, count]."""
    counters = tf.range(first + 1, first + count + 1, dtype=tf.int64)
    return _mix(keys[:, None] + tf.bitcast(counters, tf.uint64) * _u64(_GOLDEN))


def _halves(keys: tf.Tensor, count: int, first: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Two float32 uniforms in (0, 1) from each of ``count`` words: [B, count] each (high, low 24 bits)."""
    words = _words(keys, count, first)
    high = tf.bitwise.right_shift(words, _u64(40))
    low = tf.bitwise.bitwise_and(tf.bitwise.right_shift(words, _u64(8)), _u64(2**24 - 1))
    return tuple((tf.cast(bits, tf.float32) + 0.5) * _UNIT for bits in (high, low))


def words_for(count: int) -> int:
    """Random words that ``count`` uniforms or normals use (two per word)."""
    return math.ceil(count / 2)


def uniforms(keys: tf.Tensor, count: int, first: int = 0) -> tf.Tensor:
    """``count`` uniforms float32 in (0, 1) per key from its words ``first`` on: [B, count] (two per word)."""
    high, low = _halves(keys, words_for(count), first)
    return tf.reshape(tf.stack([high, low], axis=-1), [-1, 2 * words_for(count)])[:, :count]


def normals(keys: tf.Tensor, count: int, first: int = 0) -> tf.Tensor:
    """``count`` standard normals float32 per key from its words ``first`` on: [B, count] (Box-Muller, two per
    word)."""
    radius_draw, angle_draw = _halves(keys, words_for(count), first)
    radius = tf.sqrt(-2.0 * tf.math.log(radius_draw))
    angle = (2.0 * math.pi) * angle_draw
    pairs = tf.stack([radius * tf.cos(angle), radius * tf.sin(angle)], axis=-1)
    return tf.reshape(pairs, [-1, 2 * words_for(count)])[:, :count]
