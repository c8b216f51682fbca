"""Accelerator facts used for MFU estimates (training log, benchmarks)."""

from __future__ import annotations

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring, first match wins
# (so the PCIe / NVL H100 variants come before the SXM entry).
GPU_PEAK_BF16_TFLOPS = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
    ("A6000", 155.0),
    ("4090", 165.0),
]


def gpu_peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its `torch.cuda.get_device_name`, or None if unknown."""
    for key, peak in GPU_PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None
