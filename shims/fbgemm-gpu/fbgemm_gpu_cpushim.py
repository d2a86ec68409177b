"""Marker module of the fbgemm-gpu CPU shim; the real kernels live in `fbgemm_gpu` (fbgemm-gpu-cpu)."""
