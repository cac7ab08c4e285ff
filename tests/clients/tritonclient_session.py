"""A user's session with the standard client, run in .venv-triton (tritonclient and protobuf 6
cannot share the server's environment). Prints one JSON object of what the client saw.

    .venv-triton/bin/python tests/clients/tritonclient_session.py 127.0.0.1:9000 MODEL A.jpg B.jpg
"""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def top1(result, count: int) -> list[int]:
    return [int(c) for c in result.as_numpy("logits").reshape(count, -1).argmax(1)]


def main(url: str, model: str, paths: list[str]) -> dict:
    client = grpcclient.InferenceServerClient(url)
    seen: dict = {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata(model, as_json=True),
        "config": client.get_model_config(model, as_json=True)["config"],
    }
    encoded = [open(p, "rb").read() for p in paths]
    outputs = [grpcclient.InferRequestedOutput("logits"),
               grpcclient.InferRequestedOutput("saliency_map")]

    # encoded JPEGs as BYTES: the server decodes and resizes them
    jpegs = grpcclient.InferInput("image", [len(encoded)], "BYTES")
    jpegs.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    result = client.infer(model, [jpegs], outputs=outputs, request_id="bytes-1")
    seen["bytes"] = {"top1": top1(result, len(encoded)), "id": result.get_response().id,
                     "saliency_shape": list(result.as_numpy("saliency_map").shape)}

    # the same photos as a u8 tensor at the model's size
    height, width = (int(d) for d in seen["config"]["input"][0]["dims"][:2])
    pixels = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB),
                                  (width, height), interpolation=cv2.INTER_LINEAR)
                       for p in paths])
    tensor = grpcclient.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], outputs=outputs[:1])
    seen["uint8"] = {"top1": top1(result, len(paths)),
                     "outputs": [o.name for o in result.get_response().outputs]}

    # Triton's classification extension: the top 3 as "score:index:label" per image
    result = client.infer(model, [tensor],
                          outputs=[grpcclient.InferRequestedOutput("logits", class_count=3)])
    seen["classification"] = [[item.decode() for item in row]
                              for row in result.as_numpy("logits")]

    seen["statistics"] = client.get_inference_statistics(model, as_json=True)
    seen["index"] = client.get_model_repository_index(as_json=True)
    client.load_model(model)  # served already: the repository is scanned, answered at once
    try:
        client.unload_model(model)
        seen["unload"] = None
    except InferenceServerException as exc:
        seen["unload"] = {"status": exc.status(), "message": exc.message()}
    try:
        client.infer("nonexistent", [tensor])
        seen["unknown_model"] = None
    except InferenceServerException as exc:
        seen["unknown_model"] = {"status": exc.status(), "message": exc.message()}
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
