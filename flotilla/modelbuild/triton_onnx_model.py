"""Triton Python-backend model that runs an ONNX file with ONNX Runtime.

Copied into ``<repository>/<model>/<version>/model.py`` by the control plane
next to the registry artifact's ``model.onnx``. It reads its input and output
names from the model's config, so one file serves any single-input,
single-output ONNX classifier (any input dtype and layout, any output name).
Parameters (model config): ``onnx_file``, ``intra_op_threads`` (0: from
$FLOTILLA_ORT_INTRA_OP_THREADS, else ONNX Runtime's default) and
``allow_spinning`` ("0" by default). Requests that Triton hands over together
(one execution) run as one ONNX Runtime call.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

THREADS_ENV = "FLOTILLA_ORT_INTRA_OP_THREADS"


class TritonPythonModel:
    """Single-input, single-output ONNX model."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name: str = config["input"][0]["name"]
        self.output_name: str = config["output"][0]["name"]
        onnx_path = os.path.join(
            args["model_repository"], args["model_version"], params.get("onnx_file", "model.onnx")
        )
        options = ort.SessionOptions()
        # 0 = the share of the host's cores the launcher gives each replica
        # (replicas on one host must not oversubscribe the cores).
        threads = int(params.get("intra_op_threads", "0")) or int(os.environ.get(THREADS_ENV, "0"))
        options.intra_op_num_threads = threads
        # Spinning threads burn the cores other replicas and the preprocessing need.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", params.get("allow_spinning", "0")
        )
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            device_id = int(args.get("model_instance_device_id", 0))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self.session = ort.InferenceSession(onnx_path, options, providers=providers)

    def execute(self, requests: list[Any]) -> list[Any]:
        try:
            arrays = [
                pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                for request in requests
            ]
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            outputs = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # one error answer per request, Triton stays up
            error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for array in arrays:
            stop = start + len(array)
            tensor = pb_utils.Tensor(self.output_name, np.ascontiguousarray(outputs[start:stop]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start = stop
        return responses
