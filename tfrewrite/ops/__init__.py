"""Builders for the operators tfrewrite emits; each sets its options and the operator version they need."""
from .builders import (  # noqa: F401
    conv2d, densify, depthwise_conv2d, dequantize, fully_connected, opcode_for,
)
