"""Rendering for the terminal: the per-layer table, verdicts, the auto summary, the demo and the
inspection, from the library's result objects. Only the CLI prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import click

from lrcompile.check.verify import VerifyResult
from lrcompile.cli.terminal import as_flags
from lrcompile.compiler import CompileResult
from lrcompile.report import LayerReport, totals
from lrcompile.search.latency import LatencyEstimate

_COLUMNS = (
    "layer", "shape", "rank", "energy", "W err", "out err", "params", "bytes", "FLOPs", "status"
)  # fmt: skip


def layer_table(layers: Sequence[LayerReport]) -> str:
    """The report as an aligned text table with a totals line."""
    total = totals(layers)
    total_row = (
        "total",
        *[""] * 5,
        f"{_human(total.params_before)}->{_human(total.params_after)}",
        f"{_human(total.bytes_before)}->{_human(total.bytes_after)}",
        f"{total.flop_ratio:.3f}",
        f"{total.factored} factored, {total.quantized} quantized, {total.dense} dense,"
        f" {total.skipped} skipped"
        if total.quantized
        else f"{total.factored} factored, {total.dense} dense, {total.skipped} skipped",
    )
    header, *body, last = aligned([_COLUMNS, *(_row(layer) for layer in layers), total_row])
    rule = "-" * len(header)
    return "\n".join([header, rule, *body, rule, last])


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """The rows as lines with every column padded to its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _row(layer: LayerReport) -> tuple[str, ...]:
    # Node names say where a layer is (exporters often name weights onnx::MatMul_922).
    name = layer.nodes[0] or layer.weight or "?"
    if len(layer.nodes) > 1:
        name += f" (x{len(layer.nodes)})"
    name += f" (fused {layer.fused})" if layer.fused else ""
    shape = "x".join(str(d) for d in layer.shape) if layer.shape else "-"
    status = layer.status if layer.status != "quantized" else f"quantized {layer.method}"
    status = status if layer.reason is None else f"{status}: {as_flags(layer.reason)}"
    if layer.status == "skipped":
        return (name, shape, "-", "-", "-", "-", "-", "-", "-", status)
    energy = f"{layer.kept_energy:.4f}" if layer.kept_energy is not None else "-"
    error = f"{layer.relative_error:.4f}" if layer.relative_error is not None else "-"
    ratio = f"{layer.flop_ratio:.3f}" if layer.flop_ratio is not None else "-"
    return (
        name,
        shape,
        str(layer.rank) if layer.rank is not None else "-",
        energy,
        error,
        _output_error(layer),
        f"{_human(layer.params_before)}->{_human(layer.params_after)}",
        f"{_human(layer.bytes_before)}->{_human(layer.bytes_after)}",
        ratio,
        status,
    )


def _output_error(layer: LayerReport) -> str:
    """``predicted/measured`` relative L2 of the layer's own output (auto with ``quantize``)."""
    if layer.predicted_output_error is None:
        return "-"
    measured = layer.output_error
    return f"{layer.predicted_output_error:.3f}/" + (
        f"{measured:.3f}" if measured is not None else "-"
    )


def _human(count: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def print_compile(result: CompileResult) -> None:
    click.echo(layer_table(result.layers))
    _echo_left_alone(result.left_alone)
    if result.output_path is None:
        if result.auto is not None:
            _print_auto(result)
        dense = any(layer.status == "dense" for layer in result.layers)
        verb = "quantize" if result.config.quantize else "factor"
        why = "every layer stays dense" if dense else f"nothing to {verb}"
        click.echo(f"{result.input_path}: {why}; no output written.")
        return
    total = result.totals
    click.echo(
        f"wrote {result.output_path}: weight parameters x{total.params_ratio:.3f},"
        f" weight bytes {_megabytes(total.bytes_before)} -> {_megabytes(total.bytes_after)},"
        f" predicted FLOPs x{total.flop_ratio:.3f}"
    )
    if result.runtime_files:
        click.echo(f"  beside it, for the runtime: {', '.join(result.runtime_files)}")
    if result.fp8 is not None:
        activations = [t for t in result.fp8.tensors if t.kind == "activation"]
        weights = [t for t in result.fp8.tensors if t.kind == "weight"]
        click.echo(
            f"fp8: {len(activations)} activations and {len(weights)} weights in E4M3"
            f" ({result.config.fp8_weights} weight scales, {result.config.fp8_calib} ranges);"
            f" {len(result.fp8.skipped)} nodes left as they are"
        )
        for node, reason in result.fp8.skipped:
            click.echo(f"  fp8 left alone: {node}: {reason}")
    if result.auto is not None:
        _print_auto(result)
    if result.verification is not None:
        print_verification(result.verification)
    click.echo(f"stages: {profile_line(result.seconds, result.peak_mib)}")


def profile_line(seconds: dict[str, float], peaks: dict[str, float]) -> str:
    """Each stage's seconds and peak resident memory: ``load 0.1 s 210 MiB, ...``."""
    return ", ".join(
        f"{stage} {value:.1f} s" + (f" {peaks[stage]:.0f} MiB" if stage in peaks else "")
        for stage, value in seconds.items()
    )


def print_verification(result: VerifyResult) -> None:
    classes = result.metric in ("kl", "top1") and any(o.kl is not None for o in result.outputs)
    labelled = any(o.perplexity is not None for o in result.outputs)
    header = ("output", "rel L2", "cosine", "max abs err", *(("KL", "top-1 changed") * classes))
    header += ("ppl ref", "ppl", "ppl ratio") * labelled
    status = {
        o.name: ("ok" if o.gated else "not gated") if o.passed else "FAIL" for o in result.outputs
    }
    rows = [
        (*_metric_cells(o, classes), *_perplexity_cells(o) * labelled, status[o.name])
        for o in result.outputs
    ]
    _echo_table((*header, "status"), rows)
    verdict = "PASS" if result.passed else "FAIL"
    error = f"{result.worst_error:.3e}" if math.isfinite(result.worst_error) else "non-finite"
    cache = result.worst_cache  # gated on rel-l2 under kl/top1/ppl
    error += f" ({cache})" if cache else ""
    measure = _METRIC_NAMES["rel-l2" if cache else result.metric]
    click.echo(
        f"verdict: {verdict} (worst {measure} {error}, tolerance {result.tolerance:g},"
        f" {result.batches} batches of {result.data_label})"
    )
    if result.integer_weights is not None:
        click.echo(f"  {result.integer_weights}")


_METRIC_NAMES = {
    "rel-l2": "relative L2",
    "cosine": "1 - cosine",
    "kl": "KL",
    "top1": "top-1 change",
    "ppl": "perplexity ratio - 1",
}


def _perplexity_cells(o) -> tuple[str, str, str]:
    if o.perplexity is None or not o.finite:
        return ("-", "-", "-")
    return (f"{o.reference_perplexity:.4g}", f"{o.perplexity:.4g}", f"{o.perplexity_ratio:.4f}")


def _metric_cells(o, classes: bool) -> tuple[str, ...]:
    if not o.finite:
        return (o.name, "non-finite", "-", "-", *(("-", "-") * classes))
    cells = (o.name, f"{o.relative_l2:.3e}", f"{o.cosine:.6f}", f"{o.max_abs_error:.3e}")
    if classes:
        kl = f"{o.kl:.3e}" if o.kl is not None else "-"
        cells += (kl, f"{o.top1:.4f}" if o.top1 is not None else "-")
    return cells


def _print_auto(result: CompileResult) -> None:
    auto, config = result.auto, result.config
    if config.budget is not None:
        goal = f"budget x{config.budget:g}: output error {auto.measured_error:.4f}"
    else:
        goal = (
            f"output error {auto.measured_error:.4f} within its target {auto.tolerance:.4g}"
            f" ({1 - config.headroom:g} x tolerance)"
        )
    if auto.held_back:
        data = f"{auto.held_back} of {auto.batches} batches of {result.calibration}, held back"
        data += " from fitting the factors"
    else:
        data = f"{result.calibration}, the data the factors were fitted to"
    click.echo(
        f"auto: {len(auto.steps)} candidate model{'s' * (len(auto.steps) != 1)} measured on"
        f" {data}; {goal};"
        f" {config.objective} x{auto.cost_ratio:.3f} of the searched layers;"
        f" {auto.dense_layers} left dense"
    )
    if auto.latency is not None:
        _print_latency(auto.latency)


def _print_latency(latency: LatencyEstimate) -> None:
    """One line: where the table came from and, once timed, the whole model before and after."""
    cached = latency.shapes - latency.measured
    line = (
        f"latency: {latency.shapes} layer shapes timed on {latency.target}"
        f" ({latency.measured} measured now, {cached} from {latency.cache or 'no cache'})"
    )
    if latency.measured_speedup is not None:
        line += (
            f"; whole model on a calibration batch {latency.model_dense * 1e3:.3g} ms ->"
            f" {latency.model * 1e3:.3g} ms: measured x{latency.measured_speedup:.3f}"
        )
        predicted = latency.predicted_speedup
        line += f", predicted x{predicted:.3f}" if predicted else ", no prediction"
    click.echo(line)


def print_demo(demo, workdir: Path) -> None:
    result = demo.compile
    total, auto, peer = result.totals, result.auto, demo.peer
    weights = total.factored + total.dense + total.quantized
    quantized = result.config.quantize
    dynamic = sum(getattr(weight.decision, "dynamic", False) for weight in result.plan or ())
    done = f"{total.factored} of {weights} layers"
    if quantized:
        also = f"; {dynamic} with int8 activations" if dynamic else ""
        done = f"{total.quantized} of {weights} weights {quantized} (+ correction where auto chose"
        done += f"{also}), {total.dense} dense"
    rows = [
        ("model", f"all-MiniLM-L6-v2 sentence embedder, {weights} weights (MatMul, Gather)"),
        (
            "data",
            f"256 calibration / {demo.sentences} held-out sentences, {demo.sequence_length} tokens",
        ),
        (
            "tolerance",
            f"{result.config.tolerance:g} relative L2 (auto target {auto.tolerance:.4g}"
            f" on {auto.held_back} held-back calibration batches)",
        ),
        ("quantized" if quantized else "factored", done),
        (
            "weight bytes",
            f"{_megabytes(total.bytes_before)} -> {_megabytes(total.bytes_after)}"
            f" (x{demo.bytes_ratio:.3f}{', FP8 E4M3' if result.fp8 else ''}); files"
            f" {demo.megabytes[0]:.1f} -> {demo.megabytes[1]:.1f} MB",
        ),
        ("held-back error", f"{auto.measured_error:.4f} (calibration batches not fitted to)"),
        (
            "held-out error",
            f"{demo.heldout_relative_l2:.4f} ({'PASS' if result.passed else 'FAIL'})",
        ),
        ("held-out cosine", f"mean {demo.cosine_mean:.4f}, min {demo.cosine_min:.4f}"),
        ("neighbour agreement", f"{demo.neighbour_agreement:.3f} (nearest other sentence)"),
    ]
    note = " (ORT CPU dequantizes FP8 each call: FP8 speed is TensorRT's)" if result.fp8 else ""
    for name, (before, after) in demo.latency_ms.items():
        rows.append(
            (f"ORT CPU {name}", f"{before:.2f} -> {after:.2f} ms (x{before / after:.2f}){note}")
        )
    rows += _peer_rows(demo)
    searched = ", ".join(f"{k} {v:.1f}s" for k, v in auto.seconds.items())
    spent = [f"{k} {v:.1f}s" + (f" ({searched})" if k == "search" else "")
             for k, v in result.seconds.items()]  # fmt: skip
    rows.append(("compile time", ", ".join(spent)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")
    click.echo(
        f"wrote {workdir}/minilm.onnx, {result.output_path.name}, {peer.path.name}, calib.npz,"
        " heldout.npz, demo.json"
    )


def _peer_rows(demo) -> list[tuple[str, str]]:
    """The demo's ``quantize_dynamic`` model, measured beside lrcompile's."""
    peer = demo.peer
    rows = [
        (f"beside: {peer.name}", "same data, machine and process"),
        ("  held-out cosine", f"mean {peer.cosine_mean:.4f}, min {peer.cosine_min:.4f}"),
        ("  file", f"{peer.megabytes:.1f} MB"),
    ]
    for name, (before, _) in demo.latency_ms.items():
        ms = peer.latency_ms[name]
        rows.append((f"  ORT CPU {name}", f"{before:.2f} -> {ms:.2f} ms (x{before / ms:.2f})"))
    return rows


def _echo_left_alone(left_alone) -> None:
    """``left alone: 121 MatMulNBits (already quantized), ...``: ops no candidate comes from."""
    if left_alone:
        click.echo("left alone: " + ", ".join(f"{n} {op} ({why})" for op, why, n in left_alone))


def print_inspection(result) -> None:
    header = ("layer", "op", "shape", "readers", "break-even", "r99", "r99 whitened", "sensitivity")
    rows = [
        (
            (layer.node or layer.weight) + (f" (fused {layer.fused})" if layer.fused else ""),
            layer.op,
            f"{layer.shape[0]}x{layer.shape[1]}",
            str(layer.nodes),
            f"{layer.break_even:.0f}",
            _or_dash(layer.energy_rank(0.99)),
            _or_dash(layer.energy_rank(0.99, whitened=True)),
            "-" if layer.sensitivity is None else f"{layer.sensitivity:#.3g}",
        )
        for layer in result.layers
    ]
    _echo_table(header, rows)
    for node, reason in result.skipped:
        click.echo(f"left alone: {node}: {reason}")
    _echo_left_alone(result.left_alone)
    if result.curve:
        click.echo(
            f"auto trade-off on the held-back batches of {result.calibration}"
            " (cost of the factorable layers):"
        )
        _echo_table(
            ("cost", "predicted error", "measured error"),
            [
                (f"x{p.cost_ratio:.3f}", f"{p.predicted_error:.4f}", f"{p.measured_error:.4f}")
                for p in result.curve
            ],
        )


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _echo_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    for line in aligned([header, *rows]):
        click.echo(line)


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.2f} MB"
