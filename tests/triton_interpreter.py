"""For test modules of Triton kernels: run them in Triton's interpreter on CPU tensors, or skip."""

from __future__ import annotations

import os

import pytest
import torch


def interpreted_triton_or_skip() -> None:
    """Call at the top of a test module, before it imports a Triton kernel.

    Triton jits its own library functions (tl.zeros, ...) when it is first imported, so the
    interpreter must be on before that: tests/conftest.py sets TRITON_INTERPRET=1 for the suite
    on machines without CUDA (the line below: a run with --noconftest). With CUDA the gpu tests
    check the compiled kernels instead, and the module is skipped. Without triton: skipped."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton", reason="triton is not installed")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        if torch.cuda.is_available():
            pytest.skip("CUDA machine without TRITON_INTERPRET=1: the gpu tests check the compiled kernels",
                        allow_module_level=True)
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it "
                           "first): the interpreter tests cannot run")
