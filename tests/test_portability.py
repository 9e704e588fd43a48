"""The oneDNN ISA limit that `make test` uses to run the numerics tests as an AVX2 machine would.

If the limit stopped working (a TensorFlow that no longer reads ``ONEDNN_MAX_CPU_ISA``, or one
without oneDNN), the second, AVX2-limited pass of the numerics tests would silently repeat the
first one; this test makes that visible.
"""

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import numpy as np, tensorflow as tf
x = tf.constant(np.ones((4, 32, 32, 8), np.float32))
w = tf.constant(np.ones((4, 4, 8, 16), np.float32))
tf.nn.conv2d(x, w, 2, "SAME").numpy()
"""


def _conv_kernels(isa: str | None) -> set[str]:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = set()
    for line in out.stdout.splitlines():
        parts = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in parts and "convolution" in parts:
            kernels.add(parts[parts.index("convolution") + 1])
    return kernels


@pytest.mark.numerics
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN ISAs are x86")
def test_onednn_isa_limit_selects_avx2_kernels():
    limited = _conv_kernels("AVX2")
    assert limited, "TensorFlow ran no oneDNN convolution: the AVX2 pass would test nothing"
    assert all("avx512" not in k and "amx" not in k for k in limited), limited
    from pipeline.train import read_cpuinfo

    if os.environ.get("ONEDNN_MAX_CPU_ISA") is None and "avx512f" in read_cpuinfo():
        # on an AVX-512 machine the unlimited run uses other kernels: the limit changes something
        assert any("avx512" in k for k in _conv_kernels(None)), limited
