"""One update under MirroredStrategy on 2 logical CPUs equals the default strategy's."""

import sys

import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from models.config import preset  # noqa: E402
from models.gan import ConditionalGAN  # noqa: E402

cfg = preset("tiny", size=32, batch=4, g_lr=0.05, d_lr=0.05, neighbours=0)
rng = np.random.default_rng(0)
cond = np.eye(9, dtype="float32")[rng.integers(0, 9, (4, 32, 32))]  # 8 classes and body
img = rng.random((4, 32, 32, 1)).astype("float32")


def one_step(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        gan = ConditionalGAN(cfg, optimizer="sgd")
    ds = tf.data.Dataset.from_tensor_slices((cond, img)).batch(4)
    dist = strategy.experimental_distribute_dataset(ds)
    c, i = next(iter(dist))
    out = strategy.run(tf.function(gan.train_step), args=(c, i))
    losses = {k: float(strategy.reduce("SUM", v, axis=None)) for k, v in out.items()}
    return [
        w.numpy() if hasattr(w, "numpy") else np.asarray(w)
        for w in gan.generator.weights + gan.discriminator.weights
    ], losses


w1, l1 = one_step(tf.distribute.get_strategy())
w2, l2 = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
worst = max(float(np.max(np.abs(a - b))) for a, b in zip(w1, w2, strict=True))
print("losses", l1, l2)
print("max weight difference", worst)
ok = worst < 1e-4 and all(abs(l1[k] - l2[k]) < 1e-4 for k in l1)
sys.exit(0 if ok else 1)
