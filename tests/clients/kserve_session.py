"""A user's session with KServe's own Python SDK (`kserve.InferenceGRPCClient`, the Open
Inference Protocol client), run in .venv-kserve (its protobuf pin cannot share the server's
environment). Prints one JSON object of what the client saw.

    .venv-kserve/bin/python tests/clients/kserve_session.py 127.0.0.1:9000 MODEL A.jpg B.jpg
"""

from __future__ import annotations

import asyncio
import json
import sys

import cv2
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput


async def session(url: str, model: str, paths: list[str]) -> dict:
    client = InferenceGRPCClient(url, retries=0)
    seen: dict = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
                  "model_ready": await client.is_model_ready(model)}

    pixels = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB), (224, 224),
                                  interpolation=cv2.INTER_LINEAR) for p in paths])
    image = InferInput(name="image", shape=list(pixels.shape), datatype="UINT8")
    image.set_data_from_numpy(pixels, binary_data=True)
    response = await client.infer(InferRequest(
        model_name=model, infer_inputs=[image], request_id="kserve-1",
        request_outputs=[RequestedOutput("logits"), RequestedOutput("saliency_map")]))
    logits = response.get_output_by_name("logits").as_numpy()
    seen["uint8"] = {"id": response.id, "top1": logits.reshape(len(paths), -1).argmax(1).tolist(),
                     "saliency_shape": list(response.get_output_by_name("saliency_map").shape)}

    encoded = InferInput(name="image", shape=[len(paths)], datatype="BYTES")
    encoded.set_data_from_numpy(np.array([open(p, "rb").read() for p in paths], dtype=np.object_),
                                binary_data=True)
    response = await client.infer(InferRequest(model_name=model, infer_inputs=[encoded]))
    seen["bytes"] = {"top1": response.outputs[0].as_numpy().reshape(len(paths), -1)
                     .argmax(1).tolist(), "outputs": [o.name for o in response.outputs]}
    try:
        await client.infer(InferRequest(model_name="nonexistent", infer_inputs=[image]))
        seen["unknown_model"] = None
    except Exception as exc:  # noqa: BLE001 - what the SDK raises is what a user sees
        seen["unknown_model"] = f"{type(exc).__name__}: {exc}"
    await client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(session(sys.argv[1], sys.argv[2], sys.argv[3:]))))
