"""Noise from an optional import in a library the worker loads, silenced where it is logged.

bitsandbytes (which peft imports for LoRA adapters, and transformers for 8/4-bit weights) tries, on a CPU
with AVX512-BF16, the optional ``kernels`` package for a faster 4-bit matrix product, and when that
package is not installed it logs a warning at every worker start ("Failed to load CPU gemm_4bit_forward
from kernels-community: No module named 'kernels'. Please make sure you already `pip install kernels`
..."). Nothing is wrong then: bitsandbytes uses its own kernel. Only that record is dropped; the same
warning for any other failure (the package installed but broken, its kernel not downloadable) still shows.
"""

from __future__ import annotations

import logging

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
OPTIONAL_PACKAGE = "kernels"


def quiet_optional_kernels() -> None:
    """Drop bitsandbytes' warning that the optional ``kernels`` package is not installed. Call it before
    bitsandbytes is imported: it logs the warning while its CPU backend is imported."""
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).addFilter(_not_the_missing_optional_package)


def _not_the_missing_optional_package(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return not any(isinstance(arg, ModuleNotFoundError) and arg.name == OPTIONAL_PACKAGE for arg in args)
