"""Every CPU family we know, proven from any one machine, and the oneDNN ISA limit that `make
test` uses to run the numerics tests as an AVX2 machine would.

The table tests say, for each family's flags and each ``ONEDNN_MAX_CPU_ISA``, which policy
``--precision auto`` picks and which dtype policies a test may train with (``pipeline.cpu``).
If the limit stopped working (a TensorFlow that no longer reads ``ONEDNN_MAX_CPU_ISA``, or one
without oneDNN), the second, AVX2-limited pass of the numerics tests would silently repeat the
first one; the last test makes that visible.
"""

import os
import platform
import subprocess
import sys

import pytest

from pipeline.cpu import KNOWN_ISAS, CpuProfile, limit_flags, parse_flags, read_cpu
from pipeline.errors import PipelineError
from pipeline.train import resolve_precision

_BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi1 bmi2"
# /proc/cpuinfo flags of the three families CI and developers have run on (relevant part)
FAMILIES = {
    # AMD EPYC, AVX2 only
    "amd-avx2": _BASE,
    # AMD EPYC Zen 5: AVX-512 with BF16, no FP16, no AMX
    "amd-avx512-bf16": _BASE + " avx_vnni avx512f avx512dq avx512cd avx512bw avx512vl"
    " avx512ifma avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_bf16"
    " avx512_vp2intersect",
    # Intel Xeon (Sapphire Rapids class): AMX and AVX512-FP16 as well
    "intel-amx-fp16": _BASE + " avx_vnni avx512f avx512dq avx512cd avx512bw avx512vl avx512ifma"
    " avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg avx512_vpopcntdq avx512_bf16"
    " avx512_fp16 amx_bf16 amx_tile amx_int8",
}
F32, BF16, F16 = "float32", "mixed_bfloat16", "mixed_float16"
ALL = (F32, BF16, F16)
# family → limit → (what --precision auto picks, the policies a model can train with)
TABLE = {
    "amd-avx2": {
        None: (F32, ALL),  # bf16 and fp16 never reach oneDNN here: TensorFlow's own kernels
        "AVX": (F32, ALL),
        "AVX2": (F32, ALL),
        "AVX512_CORE": (F32, ALL),
        "AVX512_CORE_BF16": (F32, ALL),
        "AVX512_CORE_FP16": (F32, ALL),
        "AVX512_CORE_AMX": (F32, ALL),
    },
    "amd-avx512-bf16": {
        None: (BF16, ALL),
        "AVX": (F32, (F32, F16)),
        "AVX2": (F32, (F32, F16)),  # bf16 goes to oneDNN (AVX512F), which has no AVX2 kernel
        "AVX512_CORE": (F32, ALL),  # bf16 emulated: runs, but slower than float32
        "AVX512_CORE_VNNI": (F32, ALL),
        "AVX512_CORE_BF16": (BF16, ALL),
        "AVX512_CORE_FP16": (BF16, ALL),
        "AVX512_CORE_AMX": (BF16, ALL),
    },
    "intel-amx-fp16": {
        None: (BF16, ALL),
        "AVX": (F32, (F32,)),
        "AVX2": (F32, (F32,)),  # issue 22: fp16 goes to oneDNN (AVX512-FP16), no AVX2 kernel
        "AVX512_CORE": (F32, (F32, BF16)),
        "AVX512_CORE_VNNI": (F32, (F32, BF16)),
        "AVX512_CORE_BF16": (BF16, (F32, BF16)),  # fp16 needs AVX512_CORE_FP16
        "AVX512_CORE_FP16": (BF16, ALL),
        "AVX512_CORE_AMX": (BF16, ALL),
        "AVX512_CORE_AMX_FP16": (BF16, ALL),
    },
}


@pytest.mark.parametrize(("family", "limit"), [(f, lim) for f, row in TABLE.items() for lim in row])
def test_precision_table(family, limit):
    """What `auto` picks and which policies may train, per CPU family and oneDNN limit."""
    cpu = CpuProfile(parse_flags(f"flags\t\t: {FAMILIES[family]}\n"), limit)
    auto, runnable = TABLE[family][limit]
    assert resolve_precision("auto", gpus=0, cpu=cpu) == auto
    assert cpu.runnable_policies() == runnable
    # what auto picks always runs, and a GPU always takes float16 on the GPU
    assert auto in runnable
    assert resolve_precision("auto", gpus=1, cpu=cpu) == F16
    assert resolve_precision("float32", gpus=0, cpu=cpu) == F32
    for policy in (BF16, F16):  # named outright: refused with one line where it cannot run
        if policy in runnable:
            assert resolve_precision(policy, gpus=0, cpu=cpu) == policy
        else:
            with pytest.raises(PipelineError, match=r"no \w+ kernels on this CPU"):
                resolve_precision(policy, gpus=0, cpu=cpu)
    if auto == BF16:
        assert resolve_precision("mixed", gpus=0, cpu=cpu) == BF16
    else:
        with pytest.raises(PipelineError, match="no native bfloat16"):
            resolve_precision("mixed", gpus=0, cpu=cpu)


def test_isa_limit_drops_the_flags_above_it():
    intel = parse_flags(f"flags\t\t: {FAMILIES['intel-amx-fp16']}\n")
    avx2 = limit_flags(intel, "AVX2")
    assert "avx2" in avx2 and not any(f.startswith(("avx512", "amx", "avx_vnni")) for f in avx2)
    core = limit_flags(intel, "avx512_core")  # oneDNN reads the value case-insensitively
    assert "avx512bw" in core and not core & {"avx512_vnni", "avx512_bf16", "avx_vnni"}
    bf16 = limit_flags(intel, "AVX512_CORE_BF16")
    assert "avx512_bf16" in bf16 and not bf16 & {"avx512_fp16", "amx_bf16", "amx_tile"}
    fp16 = limit_flags(intel, "AVX512_CORE_FP16")
    assert "avx512_fp16" in fp16 and not any(f.startswith("amx") for f in fp16)
    assert {"amx_bf16", "amx_tile"} <= limit_flags(intel, "AVX512_CORE_AMX")
    for unlimited in (None, "", "ALL", "DEFAULT", "no-such-isa"):
        assert limit_flags(intel, unlimited) == intel
    # no limit invents a flag the CPU lacks
    for isa in KNOWN_ISAS:
        assert limit_flags(intel, isa) <= intel
    assert parse_flags("") == frozenset() and limit_flags(frozenset(), "AVX2") == frozenset()


PROBE = """
import sys
import numpy as np, tensorflow as tf
for dtype in sys.argv[1:]:
    x = tf.constant(np.ones((4, 32, 32, 8)), dtype)
    w = tf.Variable(np.ones((4, 4, 8, 16)), dtype=dtype)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(tf.nn.conv2d(x, w, 2, "SAME"))
    tape.gradient(y, w).numpy()
    print("ran", dtype, flush=True)
"""


def _onednn_run(isa: str | None, dtypes: tuple[str, ...] = ("float32",)) -> dict:
    """A conv forward and backward per dtype in a fresh process under ``ONEDNN_MAX_CPU_ISA=isa``:
    the ISA oneDNN says it uses, the primitives it executed (with their kernels), the dtypes
    that ran."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *dtypes],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    isa_line, kernels, ran = "", set(), []
    for line in out.stdout.splitlines():
        parts = line.split(",")
        if line.startswith("onednn_verbose") and "info" in parts and parts[-1].startswith("isa:"):
            isa_line = parts[-1]
        elif line.startswith("onednn_verbose") and "exec" in parts:
            # e.g. ...,exec,cpu,convolution,brg_conv_fwd:avx2,... or ...,exec,cpu,gemm_api,,...
            where = parts.index("exec")
            kernels.add(f"{parts[where + 2]}:{parts[where + 3]}")
        elif line.startswith("ran "):
            ran.append(line.split()[1])
    return {"isa": isa_line, "kernels": kernels, "ran": ran}


@pytest.mark.numerics
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN ISAs are x86")
def test_onednn_isa_limit_selects_avx2_kernels():
    limited = _onednn_run("AVX2")
    assert limited["kernels"], "TensorFlow ran nothing on oneDNN: the AVX2 pass would test nothing"
    assert "AVX2" in limited["isa"] and "512" not in limited["isa"], limited
    assert all("avx512" not in k and "amx" not in k for k in limited["kernels"]), limited

    cpu = read_cpu()
    if cpu.max_isa is None and "avx512f" in cpu.flags:
        # on an AVX-512 machine the unlimited run uses other kernels: the limit changes something
        assert "512" in _onednn_run(None)["isa"], limited


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN ISAs are x86")
def test_every_policy_the_table_allows_runs_under_each_limit_this_cpu_has():
    """The table's "may run" on the real machine: under each limit that changes what oneDNN may
    use on this CPU, a conv forward and backward in every dtype the table allows runs (the
    float16 abort of issue 22 was one such dtype, allowed where it could not run)."""
    real = read_cpu().flags
    seen, limits = set(), []
    for isa in (
        None,
        "AVX2",
        "AVX512_CORE",
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
    ):
        key = limit_flags(real, isa)
        if key not in seen:
            seen.add(key)
            limits.append(isa)
    for isa in limits:
        cpu = CpuProfile(real, isa)
        dtypes = tuple(d for d in ("float32", "bfloat16", "float16") if cpu.can_run(d))
        assert _onednn_run(isa, dtypes)["ran"] == list(dtypes), isa
