"""Triton kernels. On CPU tensors they run only under Triton's interpreter (TRITON_INTERPRET=1,
set before mixedprec is imported); on CUDA tensors they compile for the GPU."""
