"""The backends that are not the compiled library: ``reference`` (pure PyTorch, the oracle) and
``triton`` (Triton kernels, the alternative to the CUDA kernels on CUDA tensors)."""
