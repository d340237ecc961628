// CPU stand-in for the CUDA header of this name: everything the kernels use is in ../cuda_cpu.h (force-included).
#pragma once
