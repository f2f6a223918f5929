"""Store an exported model's quantized weights as integers: the file holds what the size metric counts.

The TorchScript exporter writes a fake-quantized layer as float weight (and BatchNorm-fold arithmetic) ->
QuantizeLinear -> DequantizeLinear. Every node whose inputs are all constants is evaluated here once (onnx's
reference evaluator), except DequantizeLinear, so a weight becomes the standard QDQ form `onnxruntime.quantization`
writes: an integer initializer -> DequantizeLinear(per-channel scale, axis 0) -> Conv/Gemm.

Widths below 8 bits: a weight whose integers all fit in 4 bits (any w_bits <= 4) is stored packed as ONNX INT4
(opset 21) followed by Cast to int8. onnxruntime folds that Cast when it loads the model, so the weight reaches its
QDQ fusion as int8 and still runs as QLinearConv/QGemm; feeding INT4 to DequantizeLinear directly is valid ONNX
but onnxruntime then runs the float convolution instead. Widths 5-7 have no ONNX type and stay in int8 containers:
the size metric counts every width at the container it is stored in (`spaces.knobs.storage_bits`), so the reported
size and the file agree. INT2 (opset 25) would halve 2-bit weights again, but few runtimes read opset 25 yet.
"""
from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["pack_constants", "PACKED_OPSET"]

PACKED_OPSET = 21  # the first opset with INT4 tensors and Cast to and from them
INT4_RANGE = (-8, 7)
_KEEP = frozenset({"DequantizeLinear"})  # a constant weight's dequantization stays: it is the QDQ form itself


def pack_constants(onnx_bytes: bytes) -> bytes:
    """The model with its constant subgraphs evaluated, equal constants stored once and 4-bit weights packed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    if not any(node.op_type == "QuantizeLinear" for node in graph.node):
        return onnx_bytes  # a float model: onnxruntime folds what little there is, and its weights are stored as is
    constants = {t.name for t in graph.initializer}
    folded, kept = [], []
    for node in graph.node:
        if _foldable(node, constants):
            folded.append(node)
            constants.update(node.output)
        else:
            kept.append(node)
    if not folded:
        return onnx_bytes
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    wanted = [name for node in folded for name in node.output if name in used]
    values = dict(zip(wanted, _evaluate(model, folded, wanted)))
    values.update({t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in used})

    renamed, arrays = _dedupe(values)
    weights = {node.input[0] for node in kept if node.op_type == "DequantizeLinear"}
    packed = {renamed[n] for n in weights if n in renamed and _fits_int4(arrays[renamed[n]])}
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in arrays.items())
    for output in graph.output:  # a graph output that was folded keeps its name through an Identity
        if output.name in renamed and renamed[output.name] != output.name:
            graph.node.append(onnx.helper.make_node("Identity", [renamed[output.name]], [output.name]))
    _drop_default_attributes(graph)
    if packed:
        _pack_int4(model, {name: arrays[name] for name in packed})
    _short_names(model.graph)
    return model.SerializeToString()


def _foldable(node, constants: set[str]) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type not in _KEEP and not node.op_type.startswith("Random")
            and not any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute)
            and all(not name or name in constants for name in node.input))


def _evaluate(model, nodes: list, outputs: list[str]) -> list[np.ndarray]:
    """Run the constant nodes once on the model's initializers."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    graph = onnx.helper.make_graph(nodes, "constants", [], [onnx.ValueInfoProto(name=n) for n in outputs],
                                   list(model.graph.initializer))
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return [np.asarray(v) for v in ReferenceEvaluator(sub).run(None, {})]


def _dedupe(values: dict[str, np.ndarray]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """One name per distinct constant (the exporter repeats shared scales and zero points behind Identity nodes)."""
    renamed, arrays, by_content = {}, {}, {}
    for name, array in values.items():
        key = (array.dtype.str, array.shape, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())
        first = by_content.setdefault(key, name)
        renamed[name] = first
        if first == name:
            arrays[name] = array
    return renamed, arrays


def _fits_int4(array: np.ndarray) -> bool:
    return array.dtype == np.int8 and array.size > 0 and INT4_RANGE[0] <= array.min() and array.max() <= INT4_RANGE[1]


def _pack_int4(model, weights: dict[str, np.ndarray]) -> None:
    """Store `weights` as INT4 initializers, each cast back to int8 under its old name, at opset 21."""
    import onnx
    from onnx import TensorProto, version_converter

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PACKED_OPSET)
    if opset < PACKED_OPSET:
        model.CopyFrom(version_converter.convert_version(model, PACKED_OPSET))
    graph = model.graph
    kept = [t for t in graph.initializer if t.name not in weights]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    casts = []
    for name, array in weights.items():
        graph.initializer.append(onnx.helper.make_tensor(f"{name}.int4", TensorProto.INT4, array.shape,
                                                         _nibbles(array), raw=True))
        casts.append(onnx.helper.make_node("Cast", [f"{name}.int4"], [name], to=TensorProto.INT8))
    for node in reversed(casts):
        graph.node.insert(0, node)
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(list(model.opset_import)))


_DEFAULTS = {"Conv": {"dilations": 1, "strides": 1, "group": 1}}


def _drop_default_attributes(graph) -> None:
    """Conv attributes equal to ONNX's defaults, and kernel_shape (read from the weight), are left out."""
    for node in graph.node:
        defaults = _DEFAULTS.get(node.op_type)
        if defaults is None:
            continue
        keep = [a for a in node.attribute if not (a.name == "kernel_shape" or (a.name in defaults and (
            a.i == defaults[a.name] if a.type == a.INT else all(v == defaults[a.name] for v in a.ints))))]
        del node.attribute[:]
        node.attribute.extend(keep)


def _short_names(graph) -> None:
    """Internal tensors renamed t0, t1, ... and node names dropped: the exporter's names (module paths, repeated
    per input) would otherwise weigh a tenth of a small quantized model. Graph inputs and outputs keep theirs."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, _base62(len(names)))

    for t in graph.initializer:
        t.name = short(t.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]


def _base62(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text = ""
    while True:
        n, r = divmod(n, 62)
        text = digits[r] + text
        if n == 0:
            return text


def _nibbles(array: np.ndarray) -> bytes:
    """Two's-complement 4-bit values, two per byte, the first in the low nibble (ONNX's INT4 layout)."""
    flat = (array.astype(np.int16).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
