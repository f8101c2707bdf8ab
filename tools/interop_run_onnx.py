#!/usr/bin/env python3
"""Check an ONNX model with onnx's checker and run it with onnxruntime (CPU).

Usage: interop_run_onnx.py MODEL.onnx INPUT.f32 N,C,H,W OUTPUT.f32

INPUT.f32 holds little-endian float32 values in the given shape; the model's first output is
written to OUTPUT.f32 the same way. Prints one JSON line describing the model (input and output
shapes as declared, metadata_props, opset) for the caller to check.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def declared_shape(value_info):
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in dims]


def main():
    model_path, input_path, shape, output_path = sys.argv[1:5]
    # The path form also handles models over protobuf's 2 GiB in-memory limit.
    onnx.checker.check_model(model_path, full_check=True)
    model = onnx.load(model_path)
    shape = [int(s) for s in shape.split(",")]
    x = np.fromfile(input_path, dtype="<f4").reshape(shape)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (y,) = session.run(None, {name: x})
    y.astype("<f4").tofile(output_path)
    print(json.dumps({
        "input_name": name,
        "input_shape": declared_shape(model.graph.input[0]),
        "output_shape": declared_shape(model.graph.output[0]),
        "output_runtime_shape": list(y.shape),
        "metadata": {p.key: p.value for p in model.metadata_props},
        "opset": [o.version for o in model.opset_import],
        "ir_version": model.ir_version,
    }))


if __name__ == "__main__":
    main()
