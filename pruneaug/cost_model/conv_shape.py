"""A 2-D Conv layer as its kernels see it: what the cost model times for a Conv, and its cache key.

    >>> conv = ConvShape(64, (1, 32, 8, 8), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1))
    >>> conv.key, conv.matmul
    ('64x1x32x8x8_k3x3_s2x2_p1x1x1x1_d1x1', (64, 288, 16))

A Conv's latency depends on more than its im2col matmul's (out, in, m): the input's spatial size
decides the kernel layout (`schedule.conv_schedule`), a stride the phase split
(`codegen.conv_lowering`), the padding a copy. So a Conv is timed as the kernels the artifact calls
for it, keyed by all of that; its im2col matmul (`matmul`) stands in only where nothing of the Conv
itself was measured.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvShape:
    """Cout, X's (N, C, H, W), kernel (kh, kw), strides, pads (top, left, bottom, right) and dilations."""

    out: int
    x_shape: tuple[int, int, int, int]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]

    @property
    def key(self) -> str:
        def dims(values) -> str:
            return "x".join(str(int(v)) for v in values)

        return (f"{self.out}x{dims(self.x_shape)}_k{dims(self.kernel)}_s{dims(self.strides)}_p{dims(self.pads)}"
                f"_d{dims(self.dilations)}")

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((size + self.pads[i] + self.pads[i + 2] - self.dilations[i] * (self.kernel[i] - 1) - 1)
                     // self.strides[i] + 1 for i, size in enumerate(self.x_shape[2:]))

    @property
    def matmul(self) -> tuple[int, int, int]:
        """(out, in, m) of its im2col matmul: Cout, C*kh*kw, N*Ho*Wo."""
        n, c = self.x_shape[:2]
        out_h, out_w = self.out_hw
        return self.out, c * self.kernel[0] * self.kernel[1], n * out_h * out_w
