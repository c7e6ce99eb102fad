"""Pallas GPU kernels: packed-weight GEMV, decode attention, activation preps and the GPU weight
layout. Every kernel takes the KernelConfig (tuning.py) as a static argument; with
KernelConfig.interpret they run in Pallas interpret mode on a CPU, so tests cover the same code."""
from .layout import GpuQTensor, dequantize_gpu, gather_rows, repack_blocks, repack_for_gpu, supports_gpu_layout
from .tuning import KernelConfig

__all__ = ["GpuQTensor", "KernelConfig", "dequantize_gpu", "gather_rows", "repack_blocks", "repack_for_gpu",
           "supports_gpu_layout"]
