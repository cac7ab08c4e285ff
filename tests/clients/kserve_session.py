"""A user's session with KServe's own Python SDK, the Open Inference Protocol's client: its
`InferenceGRPCClient`, or its `InferenceRESTClient` (protocol v2, httpx), run in .venv-kserve
(its protobuf pin cannot share the server's environment). Prints one JSON object of what the
client saw.

    .venv-kserve/bin/python tests/clients/kserve_session.py grpc 127.0.0.1:9000 MODEL A.jpg
    .venv-kserve/bin/python tests/clients/kserve_session.py http 127.0.0.1:8000 MODEL A.jpg
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys

import cv2
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


def client_calls(protocol: str, url: str):
    """(client, infer, live, ready, model_ready) with the same signatures for both clients:
    the REST client takes the server's URL on each call."""
    if protocol == "grpc":
        client = InferenceGRPCClient(url, retries=0)
        return (client, client.infer, client.is_server_live, client.is_server_ready,
                client.is_model_ready)
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    base = f"http://{url}"

    async def infer(request: InferRequest):
        return await client.infer(base, request, model_name=request.model_name)
    return (client, infer, functools.partial(client.is_server_live, base),
            functools.partial(client.is_server_ready, base),
            functools.partial(client.is_model_ready, base))


async def session(protocol: str, url: str, model: str, paths: list[str]) -> dict:
    client, infer, live, ready, model_ready = client_calls(protocol, url)
    seen: dict = {"live": await live(), "ready": await ready(),
                  "model_ready": await model_ready(model)}

    pixels = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB), (224, 224),
                                  interpolation=cv2.INTER_LINEAR) for p in paths])
    image = InferInput(name="image", shape=list(pixels.shape), datatype="UINT8")
    image.set_data_from_numpy(pixels, binary_data=True)
    response = await infer(InferRequest(
        model_name=model, infer_inputs=[image], request_id="kserve-1",
        request_outputs=[RequestedOutput("logits"), RequestedOutput("saliency_map")]))
    logits = response.get_output_by_name("logits").as_numpy()
    seen["uint8"] = {"id": response.id, "top1": logits.reshape(len(paths), -1).argmax(1).tolist(),
                     "saliency_shape": list(response.get_output_by_name("saliency_map").shape)}

    encoded = InferInput(name="image", shape=[len(paths)], datatype="BYTES")
    encoded.set_data_from_numpy(np.array([open(p, "rb").read() for p in paths], dtype=np.object_),
                                binary_data=True)
    response = await infer(InferRequest(model_name=model, infer_inputs=[encoded]))
    seen["bytes"] = {"top1": response.outputs[0].as_numpy().reshape(len(paths), -1)
                     .argmax(1).tolist(), "outputs": [o.name for o in response.outputs]}
    try:
        await infer(InferRequest(model_name="nonexistent", infer_inputs=[image]))
        seen["unknown_model"] = None
    except Exception as exc:  # noqa: BLE001 - what the SDK raises is what a user sees
        seen["unknown_model"] = f"{type(exc).__name__}: {exc}"
    await client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(asyncio.run(session(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))))
