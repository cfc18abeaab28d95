"""Conv and Gemm with a fused epilogue: ``activation(op(...) + residual)``.

``FusedConv(X, W, B?, Z?)`` has Conv's attributes, ``FusedGemm(A, B, C?, Z?)`` Gemm's, both plus
the epilogue attributes of ``ops/epilogue.py``. Their shape rules and references are the base
op's (looked up in the registry, not copied), followed by the epilogue.
"""

from __future__ import annotations

from . import convolution, linalg, registry  # noqa: F401 -- Conv and Gemm must be registered
from .epilogue import EPILOGUE_ATTRS, apply_epilogue, check_epilogue
from .registry import OpCall, OpDef, register


def fused_op(name: str, base_name: str, bias_axis: int, doc: str) -> OpDef:
    base = registry.get(base_name)
    n_base = len(base.inputs)

    def infer(call: OpCall):
        out = base.infer(_base_call(call))[0]
        check_epilogue(call, out, n_base - 1)
        return [out]

    def reference(call: OpCall, *arrays):
        arrays = arrays + (None,) * (n_base + 1 - len(arrays))
        acc = base.reference(_base_call(call), *arrays[:n_base])
        return apply_epilogue(call, acc, None, arrays[n_base], bias_axis)

    def flops(call: OpCall, out_types) -> int:
        return base.flops(_base_call(call), out_types) + out_types[0].numel * (
            1 if call.has_input(n_base) else 0) if out_types[0].is_static else 0

    def _base_call(call: OpCall) -> OpCall:
        attrs = {k: v for k, v in call.attrs.items() if k not in EPILOGUE_ATTRS}
        return OpCall(base_name, call.node, attrs, call.in_types[:n_base], call.in_values[:n_base])

    return register(OpDef(
        name=name, inputs=base.inputs + ("Z?",), outputs=base.outputs,
        attrs={**base.attrs, **EPILOGUE_ATTRS}, infer=infer, reference=reference,
        kind="out-fusable", flops=flops, doc=doc, epilogue_bias_axis=bias_axis))


fused_op("FusedConv", "Conv", 1,
         "activation(Conv(X, W, B) + Z): a convolution with its epilogue fused")
fused_op("FusedGemm", "Gemm", -1,
         "activation(Gemm(A, B, C) + Z): a GEMM with its epilogue fused (C is Gemm's C)")
