"""Verification: a reference and a candidate run side by side by Polygraphy's ``Comparator``
(ONNX Runtime, or a TensorRT engine) and gated on the relative L2 error of every output."""
