"""Pure array code, no ONNX: decompositions (``decompose``), activation whitening (``whiten``),
rank specs and rank math (``ranks``), the global rank allocation (``allocate``) and activation
ranges from histograms (``ranges``)."""
