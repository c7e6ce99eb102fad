"""Pallas GPU kernels: packed-weight GEMV, decode attention, and the GPU weight layout.

All kernels also run with interpret=True on CPU (selected automatically when there is no GPU,
or by REALIZAR_PALLAS_INTERPRET=1), so the same code paths are tested without a device.
"""
from .attention import decode_attention, decode_attention_ref
from .dispatch import kernel_matmul
from .gemv import gemv, interpret_mode
from .layout import (GpuQTensor, dequantize_gpu, gather_rows, repack_blocks, repack_for_gpu,
                     supports_gpu_layout)

__all__ = ["GpuQTensor", "decode_attention", "decode_attention_ref", "dequantize_gpu", "gemv",
           "gather_rows", "interpret_mode", "kernel_matmul", "repack_blocks", "repack_for_gpu",
           "supports_gpu_layout"]
