"""Seconds per epoch of the published Keras setup for MNIST dense, to time beside brainprop.

performance.md compares ``brainprop train`` with the published TensorFlow code run on the same
machine. This is that side, rebuilt from the published code's description (isapome/BrainProp:
``main.py``, ``get_architecture.py``, ``brainprop.py``): the dense network (1500, 1000, 500
ReLU units, no biases, N(0, 0.01) weights), an output layer that keeps only the chosen unit's
Q-value (the argmax, or with probability 0.02 a draw from softmax(Q)), the loss
0.5 (r - Q_s)^2 summed and divided by the nominal batch, SGD at lr 0.1 without momentum,
batch 128, float64 inputs /255 as ``main.py`` makes them, ``model.fit(..., shuffle=True)``
with the test set as validation data. It needs TensorFlow, which brainprop does not, so run it
in an environment of its own, e.g.::

    python3 -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0
    /tmp/tf/bin/python benchmarks/keras_reference.py --epochs 3

and alternate it with ``brainprop train --dataset mnist --arch dense --epochs 3 --device cpu``,
whose lines give its training seconds per epoch. Each epoch prints its training seconds (the
steps, as ``brainprop train``'s epoch lines count them) apart from its validation seconds.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import time
from pathlib import Path

import numpy as np

# Keras 2 (tf-keras), as the published code ran; set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

EPSILON = 0.02
HIDDEN = (1500, 1000, 500)
CLASSES = 10


def read_idx(path: Path) -> np.ndarray:
    """An MNIST IDX file (gzipped or not) as a uint8 array of its declared shape."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(folder: Path) -> tuple[np.ndarray, ...]:
    def one(stem: str) -> np.ndarray:
        found = [p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()]
        if not found:
            raise SystemExit(f"keras_reference: no {folder / stem}(.gz): pass --data-dir")
        return read_idx(found[0])

    return (
        one("train-images-idx3-ubyte") / 255.0,  # float64, as main.py's division makes it
        keras.utils.to_categorical(one("train-labels-idx1-ubyte"), CLASSES).astype("float32"),
        one("t10k-images-idx3-ubyte") / 255.0,
        keras.utils.to_categorical(one("t10k-labels-idx1-ubyte"), CLASSES).astype("float32"),
    )


class ChosenUnit(keras.layers.Layer):
    """Linear Q-values without bias; in training only the chosen unit's stays, the others are
    0 (its one-hot times Q); at test time the one-hot of the argmax."""

    def __init__(self, units: int, std: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.units, self.std = units, std

    def build(self, input_shape: tf.TensorShape) -> None:
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=keras.initializers.RandomNormal(0.0, self.std),
        )

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        q = tf.matmul(x, self.kernel)
        greedy = tf.argmax(q, axis=-1)
        if not training:
            return tf.one_hot(greedy, self.units)
        drawn = tf.reshape(tf.random.categorical(q, 1), [-1])
        explore = tf.random.uniform(tf.shape(greedy)) < EPSILON
        chosen = tf.where(explore, drawn, greedy)
        return tf.one_hot(chosen, self.units) * q


class ChosenUnitLoss(keras.losses.Loss):
    """0.5 (r - Q_s)^2 of the chosen unit, summed over the batch and divided by the nominal
    ``batch_size`` (a short last batch takes a proportionally smaller step)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(reduction=keras.losses.Reduction.SUM, name="chosen_unit")
        self.batch_size = batch_size

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        chosen = tf.cast(tf.not_equal(y_pred, 0.0), y_pred.dtype)
        return tf.reduce_sum(0.5 * tf.square(chosen * y_true - y_pred), axis=-1) / self.batch_size


class EpochTimes(keras.callbacks.Callback):
    """Each epoch's training seconds (its steps) apart from its validation seconds."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.start = time.perf_counter()

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.trained = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        done = time.perf_counter()
        print(
            f"epoch {epoch + 1}: training {self.trained - self.start:.2f} s, validation "
            f"{done - self.trained:.2f} s, val accuracy {logs['val_accuracy']:.4f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="holds mnist/")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="TensorFlow's intra- and inter-op threads")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    keras.utils.set_random_seed(args.seed)
    x, y, xt, yt = load_mnist(args.data_dir / "mnist")
    model = keras.Sequential([keras.layers.Flatten(input_shape=x.shape[1:])])
    for units in HIDDEN:
        # An initializer per layer: tf-keras warns that one unseeded instance called again
        # repeats its values.
        init = keras.initializers.RandomNormal(0.0, 0.01)
        model.add(keras.layers.Dense(units, use_bias=False, kernel_initializer=init))
        model.add(keras.layers.Activation("relu"))
    model.add(ChosenUnit(CLASSES, 0.01))
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.0),
        loss=ChosenUnitLoss(args.batch_size),
        metrics=["accuracy"],
    )
    cpu = platform.processor() or platform.machine()
    print(
        f"tensorflow {tf.__version__}, keras {keras.__version__}, {cpu}, "
        f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}"
    )
    model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, validation_data=(xt, yt),
        shuffle=True, verbose=0, callbacks=[EpochTimes()],
    )  # fmt: skip


if __name__ == "__main__":
    main()
