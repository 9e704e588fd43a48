"""Which float types this CPU can run, as a pure table of its flags and ``ONEDNN_MAX_CPU_ISA``.

Two parties decide, and they read different things:

- **TensorFlow** routes an op of a given dtype to oneDNN by the *real* CPU's flags (CPUID; it
  never reads ``ONEDNN_MAX_CPU_ISA``): float32 always, bfloat16 where the CPU has AVX512F or
  AVX-NE-CONVERT, float16 where it has AVX512BW with AVX512-FP16 or AMX-FP16, or AVX-NE-CONVERT
  (``IsDataTypeSupportedByOneDNNOnThisCPU`` in TensorFlow's ``core/util/util.cc``). Any other
  dtype goes to TensorFlow's own (Eigen) kernels, which run everywhere.
- **oneDNN** then serves that dtype only if the ISA it may use, after the limit, has kernels for
  it: bfloat16 from AVX512_CORE (emulated below AVX512_CORE_BF16) or AVX2_VNNI_2, float16 from
  AVX512_CORE_FP16 or AVX2_VNNI_2 (``has_data_type_support`` in oneDNN's ``cpu/platform.cpp``).

A dtype that TensorFlow routes to oneDNN and the limited oneDNN cannot serve aborts with "could
not create a primitive descriptor": on an Intel CPU with AVX512-FP16 run under
``ONEDNN_MAX_CPU_ISA=AVX2``, float16 does exactly that. So every test and every automatic
choice asks :meth:`CpuProfile.can_run` first; the table test proves the answer for each CPU
family we know from any one machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# oneDNN's ISA names in the order each admits more; the AVX10 names are aliases at the rank of
# the AVX-512 level they contain. Unset, empty, ALL, DEFAULT or an unknown value: no limit
# (oneDNN ignores what it cannot parse).
_ISA_RANK = {
    "SSE41": 0,
    "AVX": 1,
    "AVX2": 2,
    "AVX2_VNNI": 3,
    "AVX2_VNNI_2": 4,
    "AVX512_CORE": 5,
    "AVX512_CORE_VNNI": 6,
    "AVX512_CORE_BF16": 7,
    "AVX512_CORE_FP16": 8,
    "AVX10_1_512": 8,
    "AVX10_2_512": 8,
    "AVX512_CORE_AMX": 9,
    "AVX10_1_512_AMX": 9,
    "AVX512_CORE_AMX_FP16": 10,
    "AVX10_1_512_AMX_FP16": 10,
    "AVX10_2_512_AMX_2": 10,
}
KNOWN_ISAS = tuple(_ISA_RANK)
_UNLIMITED = 99

# The lowest limit that still lets oneDNN use a flag (flags not named here are not gated).
_FLAG_RANK = {
    "avx": 1,
    "avx2": 2,
    "fma": 2,
    "avx_vnni": 3,
    "avx_vnni_int8": 4,
    "avx_ne_convert": 4,
    "avx512_vnni": 6,
    "avx512_bf16": 7,
    "avx512_fp16": 8,
    "amx_tile": 9,
    "amx_int8": 9,
    "amx_bf16": 9,
    "amx_fp16": 10,
    "amx_complex": 10,
}
# AVX512_CORE..AVX512_CORE_BF16 are AVX2 plus AVX-512: the AVX-VNNI family (ranks 3-4) is not
# part of them, only of the AVX2_VNNI levels and of AVX512_CORE_FP16 and above.
_AVX512_WITHOUT_VNNI2 = range(5, 8)

DTYPES = ("float32", "bfloat16", "float16")


def _flag_rank(flag: str) -> int:
    if flag in _FLAG_RANK:
        return _FLAG_RANK[flag]
    return 5 if flag.startswith("avx512") else 0


def isa_rank(max_isa: str | None) -> int:
    """The rank of an ``ONEDNN_MAX_CPU_ISA`` value (case-insensitive); no limit is the highest."""
    return _ISA_RANK.get((max_isa or "").strip().upper(), _UNLIMITED)


def parse_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU flags of ``/proc/cpuinfo`` text (union over processors; empty when none)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def limit_flags(flags: frozenset[str], max_isa: str | None) -> frozenset[str]:
    """The flags oneDNN may use under ``ONEDNN_MAX_CPU_ISA=max_isa``."""
    rank = isa_rank(max_isa)

    def kept(flag: str) -> bool:
        need = _flag_rank(flag)
        if need in (3, 4) and rank in _AVX512_WITHOUT_VNNI2:
            return False
        return need <= rank

    return frozenset(f for f in flags if kept(f))


@dataclass(frozen=True)
class CpuProfile:
    """A CPU's flags (as CPUID reports them) and the oneDNN ISA limit this process runs under."""

    flags: frozenset[str]
    max_isa: str | None = None

    @classmethod
    def from_cpuinfo(cls, cpuinfo: str, max_isa: str | None = None) -> CpuProfile:
        """From ``/proc/cpuinfo`` text and an ``ONEDNN_MAX_CPU_ISA`` value."""
        return cls(parse_flags(cpuinfo), max_isa)

    @property
    def onednn_flags(self) -> frozenset[str]:
        """The flags oneDNN may use after the limit."""
        return limit_flags(self.flags, self.max_isa)

    def routes_to_onednn(self, dtype: str) -> bool:
        """Whether TensorFlow sends ``dtype`` convolutions and matmuls to oneDNN (real flags)."""
        f = self.flags
        if dtype == "float32":
            return True
        if dtype == "bfloat16":
            return "avx512f" in f or "avx_ne_convert" in f
        if dtype == "float16":
            fp16 = "avx512_fp16" in f or "amx_fp16" in f
            return ("avx512bw" in f and fp16) or "avx_ne_convert" in f
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")

    def onednn_serves(self, dtype: str) -> bool:
        """Whether oneDNN, under the limit, has kernels for ``dtype``."""
        f = self.onednn_flags
        avx512_core = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= f
        avx2_vnni_2 = {"avx2", "avx_vnni", "avx_vnni_int8", "avx_ne_convert"} <= f
        if dtype == "float32":
            return True
        if dtype == "bfloat16":
            return avx512_core or avx2_vnni_2
        if dtype == "float16":
            fp16 = avx512_core and {"avx512_vnni", "avx512_bf16", "avx512_fp16"} <= f
            return fp16 or avx2_vnni_2
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")

    def can_run(self, dtype: str) -> bool:
        """Whether a ``dtype`` model runs here at all: on TensorFlow's own kernels, or on oneDNN
        kernels that the limit leaves."""
        return not self.routes_to_onednn(dtype) or self.onednn_serves(dtype)

    @property
    def native_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (AVX512-BF16 or AMX-BF16) that oneDNN may use: only
        then is mixed bf16 faster than float32 (emulated bf16 is slower)."""
        has = bool(self.onednn_flags & {"avx512_bf16", "amx_bf16"})
        return has and self.can_run("bfloat16")

    def runnable_policies(self) -> tuple[str, ...]:
        """The Keras dtype policies a model can train with on this CPU (tests ask this)."""
        compute = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
        return tuple(p for p, dtype in compute.items() if self.can_run(dtype))


def read_cpu(environ: dict[str, str] | None = None) -> CpuProfile:
    """This machine: ``/proc/cpuinfo`` (no flags where there is none) and the process's
    ``ONEDNN_MAX_CPU_ISA``. For the edges (CLI, benchmarks, tests); library code takes a
    :class:`CpuProfile`."""
    env = os.environ if environ is None else environ
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return CpuProfile.from_cpuinfo(text, env.get("ONEDNN_MAX_CPU_ISA"))
