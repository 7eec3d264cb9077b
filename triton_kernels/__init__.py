"""Triton kernels of fusion_engine (installed as ``fusion_engine.triton_kernels``).

One module per op, named like the op: private ``@triton.jit`` kernels plus a host launcher with
the op's kernel-level signature (see the ``*_reference`` function in ``fusion_engine/ops/<op>.py``).
"""


def __getattr__(name: str):
    """``fusion_engine.triton_kernels.<op>``: each op's kernel module, imported on first access (PEP 562),
    so that the dispatcher's loaders (``triton_kernels().ties_merge.ties_merge``) import only what runs."""
    if name.startswith("_"):
        raise AttributeError(name)
    import importlib

    return importlib.import_module(f"{__name__}.{name}")
