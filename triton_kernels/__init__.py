"""Triton kernels of fusion_engine (installed as ``fusion_engine.triton_kernels``).

One module per op, named like the op: private ``@triton.jit`` kernels plus a host launcher with
the op's kernel-level signature (see the ``*_reference`` function in ``fusion_engine/ops/<op>.py``).
"""
