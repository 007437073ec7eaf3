"""KServe's Python SDK against the service: one inference per model over REST (v2)
and over gRPC. Run with the interpreter of the KServe environment (``make
kserve-venv``), whose pins differ from the service's:

    .venv-kserve/bin/python tests/clients/kserve_calls.py http://127.0.0.1:3000 127.0.0.1:8001

Prints one JSON object: per protocol and model, the outputs as lists.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
from kserve.inference_client import RESTConfig
from PIL import Image


def digit_png() -> bytes:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6:22, 12:16] = 255  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def requests() -> dict[str, InferRequest]:
    image = InferInput("image_files", [1], "BYTES")
    image.set_data_from_numpy(np.array([digit_png()], dtype=object))
    texts = InferInput("texts", [2], "BYTES")
    texts.set_data_from_numpy(
        np.array([b"A gripping film.", b"Dull and far too long."], dtype=object)
    )
    digits = InferInput("digits", [2], "INT64")
    digits.set_data_from_numpy(np.array([4, 2], dtype=np.int64))
    return {
        "mnist-cnn": InferRequest("mnist-cnn", [image], request_id="k1"),
        "sst2-bilstm": InferRequest("sst2-bilstm", [texts], request_id="k2"),
        "digit-gan": InferRequest("digit-gan", [digits], request_id="k3",
                                  parameters={"seed": 11}),
    }  # fmt: skip


def outputs(response) -> dict[str, list]:
    found = {}
    for output in response.outputs:
        values = output.as_numpy()
        if values.dtype == object:
            values = np.array([v.decode() if isinstance(v, bytes) else v for v in values.ravel()])
        found[output.name] = values.tolist()
    return {"id": response.id, "model_name": response.model_name, "outputs": found}


async def main(rest_url: str, grpc_address: str) -> dict:
    answers: dict[str, dict] = {"rest": {}, "grpc": {}}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        for model, request in requests().items():
            response = await rest.infer(rest_url, request, model_name=model)
            answers["rest"][model] = outputs(response)
    finally:
        await rest.close()
    grpc_client = InferenceGRPCClient(grpc_address, timeout=60)
    try:
        for model, request in requests().items():
            answers["grpc"][model] = outputs(await grpc_client.infer(request))
    finally:
        await grpc_client.close()
    return answers


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
