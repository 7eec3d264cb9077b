"""Host-side shims that hand flat torch tensors to the compiled kernels (``cpp.py``: fusion_engine._C,
``cuda.py``: fusion_engine._C_cuda), by keyword. Only fusion_engine._dispatch loads them; they import
nothing from fusion_engine.ops or _dispatch (their shared plumbing is ``_marshal.py``)."""
