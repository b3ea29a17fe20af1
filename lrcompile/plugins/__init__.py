"""The fused LowRankGemm TensorRT plugin: shape rules and launch parameters (``launch``), the
Triton kernel (``kernel``, needs triton and torch) and its TensorRT registration
(``low_rank_gemm``, needs TensorRT). Importing this package imports none of them."""
