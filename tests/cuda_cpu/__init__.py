"""Test-only: the CUDA kernels of postprocess/cuda executed on the CPU (cuda_cpu.h, harness.py)."""
