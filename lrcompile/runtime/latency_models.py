"""The one-layer models the latency table times (``runtime.latency``), built as lrcompile writes
each form.

    dense       y = MatMul(x, W)
    factored    y = MatMul(MatMul(x, A), B)
    quantized   y = MatMul(x, DQ(Wq, s[, z]))                        (``passes.quantized``)
                  | Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x), Wq)), xs * s)   (W8A8)
                [+ MatMul(MatMul(x, Cast(A)), Cast(B))]              (a correction, float16)

Weights are constants: their values do not change a GEMM's time, and filling them is fast.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx
from onnx import helper


@dataclasses.dataclass(frozen=True)
class Form:
    """A quantized weight as timed: DequantizeLinear of ``bits``-bit integers in blocks of
    ``group`` rows (None: per output channel) feeding the MatMul, run at ``accuracy_level``
    (None: ONNX Runtime's default), plus a correction of each rank in ``corrections`` (0: none).
    """

    bits: int
    group: int | None
    symmetric: bool
    accuracy_level: int | None
    corrections: tuple[int, ...] = (0,)
    dynamic: bool = False  # W8A8: DynamicQuantizeLinear -> MatMulInteger (``Quantize.dynamic``)

    @property
    def key(self) -> str:
        group = f"g{self.group}" if self.group else "per-channel"
        level = "default" if self.accuracy_level is None else self.accuracy_level
        zero = "sym" if self.symmetric else "asym"
        kind = "dynamic" if self.dynamic else f"level={level}"
        return f"int{self.bits} {group} {zero} {kind} corrections={list(self.corrections)}"


def layer_model(
    k: int, n: int, dtype: str, rank: int | None, form: Form | None = None
) -> onnx.ModelProto:
    """``x[M, K] -> y[M, N]`` of one K x N weight: dense (``rank`` None), factored at ``rank``,
    or, with a ``form``, quantized with a correction of ``rank`` (0: none)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if rank is None:
        weights = {"W": np.full((k, n), 0.01, dtype)}
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    elif form is None:
        weights = {"A": np.full((k, rank), 0.01, dtype), "B": np.full((rank, n), 0.01, dtype)}
        nodes = [
            helper.make_node("MatMul", ["x", "A"], ["h"]),
            helper.make_node("MatMul", ["h", "B"], ["y"]),
        ]
    else:
        weights, nodes = _quantized(k, n, dtype, rank, form)
    graph = helper.make_graph(
        nodes,
        "latency",
        [helper.make_tensor_value_info("x", elem, ["M", k])],
        [helper.make_tensor_value_info("y", elem, ["M", n])],
        [onnx.numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    opset, ir_version = (17, 8) if form is None else (21, 10)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def _quantized(k: int, n: int, dtype: str, rank: int, form: Form):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    integer = np.int8 if form.bits == 8 else ml_dtypes.int4
    weights = {"Wq": np.ones((k, n), integer)}
    if form.group:
        weights["s"] = np.full((-(-k // form.group), n), 0.01, dtype)
        attributes = {"axis": 0, "block_size": form.group}
    else:
        weights["s"] = np.full((n,), 0.01, dtype)
        attributes = {"axis": 1}
    if not form.symmetric:
        weights["z"] = np.zeros(weights["s"].shape, integer)
    base = "base" if rank else "y"
    if form.dynamic:
        zero = ["z"] if "z" in weights else []
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
            helper.make_node("Mul", ["xs", "s"], ["scales"]),
            helper.make_node("MatMulInteger", ["xq", "Wq", "xz", *zero], ["integer"]),
            helper.make_node("Cast", ["integer"], ["float"], to=elem),
            helper.make_node("Mul", ["float", "scales"], [base]),
        ]
    else:
        nodes = [
            helper.make_node("DequantizeLinear", list(weights), ["W"], **attributes),
            helper.make_node("MatMul", ["x", "W"], [base]),
        ]
    if rank:
        weights |= {"A": np.full((k, rank), 0.01, np.float16),
                    "B": np.full((rank, n), 0.01, np.float16)}  # fmt: skip
        factors = ["A", "B"]
        if dtype != "float16":
            factors = ["A_cast", "B_cast"]
            nodes += [helper.make_node("Cast", [f], [f"{f}_cast"], to=elem) for f in ("A", "B")]
        nodes += [
            helper.make_node("MatMul", ["x", factors[0]], ["h"]),
            helper.make_node("MatMul", ["h", factors[1]], ["lr"]),
            helper.make_node("Add", ["base", "lr"], ["y"]),
        ]
    return weights, nodes
