"""Triton kernels for N:M packed weights (one file per kernel); all run under TRITON_INTERPRET=1 on CPU.

nm_matmul: float values; nm_matmul_wq: int8 / int4 / fp8 codes dequantized in registers;
w8a8: int8 activations x int8 weights with int32 accumulation, plus the activation quantizer.
"""
