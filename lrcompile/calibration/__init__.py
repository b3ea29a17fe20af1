"""Running models on calibration data in ONNX Runtime: the ORIGINAL model's input statistics per
weight (``statistics``: Gram matrices, reference outputs) and the activation ranges of a factored
model that give FP8 scales (``ranges``). Passes never run a model; they get these as data."""
