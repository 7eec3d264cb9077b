"""Host-side shims that hand flat torch tensors to the compiled kernels."""
