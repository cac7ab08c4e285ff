"""Whether this CPU's 8-bit dot products saturate, which decides NNCF's overflow fix.

CPUs without VNNI (Intel before Cascade Lake, AMD before Zen 4) multiply INT8 weights by u8
activations with VPMADDUBSW, whose pairwise sums saturate at 16 bits; OpenVINO documents the
accuracy loss this causes on MobileNet-like models ("Saturation (overflow) issue"). NNCF's fix
stores weights in 7 bits, which stops the saturation there but costs precision on CPUs with VNNI
(and on GPUs, NPUs), which sum exactly. Measured on the default model (300 validation crops,
top-1 agreement with f32):

| weights | on AVX2 (AMD EPYC, no VNNI) | without saturation (VNNI-like arithmetic) |
| --- | --- | --- |
| 8 bits but the first layer (NNCF's default) | 0.790 | 0.903 |
| 7 bits everywhere (`enable`) | 0.860 | 0.853 |

So neither is right everywhere: `auto` picks by the CPU the export runs on, which is also the CPU
that validates the INT8 IR against f32.
"""

from __future__ import annotations

from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
# the export's --overflow-fix choices -> nncf.OverflowFix values
OVERFLOW_FIXES = {"enable": "enable", "first-layer": "first_layer_only", "disable": "disable"}


def _cpuinfo_field(field: str, cpuinfo: Path) -> str | None:
    """The first processor's value of a /proc/cpuinfo field; None where there is none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags; None where the system does not say (not Linux)."""
    flags = _cpuinfo_field("flags", cpuinfo)
    return None if flags is None else frozenset(flags.split())


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    return _cpuinfo_field("model name", cpuinfo) or "unknown"


def int8_dot_product(flags: frozenset[str] | None) -> str:
    """"vnni" (exact 32-bit sums), "saturating" (16-bit pairwise sums), or "unknown"."""
    if flags is None:
        return "unknown"
    return "vnni" if flags & VNNI_FLAGS else "saturating"


def resolve_overflow_fix(requested: str, flags: frozenset[str] | None) -> str:
    """The --overflow-fix to apply: `auto` is `enable` unless the CPU is known to have VNNI."""
    if requested != "auto":
        return requested
    return "first-layer" if int8_dot_product(flags) == "vnni" else "enable"
