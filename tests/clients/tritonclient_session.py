"""A user's session with the standard client, tritonclient.grpc or tritonclient.http (the same
calls), run in .venv-triton (tritonclient and protobuf 6 cannot share the server's
environment). Prints one JSON object of what the client saw.

    .venv-triton/bin/python tests/clients/tritonclient_session.py grpc 127.0.0.1:9000 MODEL A.jpg
    .venv-triton/bin/python tests/clients/tritonclient_session.py http 127.0.0.1:8000 MODEL A.jpg
"""

from __future__ import annotations

import json
import os
import queue
import sys

import cv2
import numpy as np
import tritonclient.grpc
import tritonclient.http
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


def top1(result, count: int) -> list[int]:
    return [int(c) for c in result.as_numpy("logits").reshape(count, -1).argmax(1)]


def shared_memory_session(client, client_module, model: str, pixels: np.ndarray,
                          classes: int, regions) -> dict:
    """Regions registered, listed, used for an input and an output, then unregistered, as
    tritonclient's documentation shows."""
    key = f"/xaiserve-client-{os.getpid()}"
    scores_bytes = len(pixels) * classes * 4
    frames = shm.create_shared_memory_region("frames", key + "-in", pixels.nbytes)
    scores = shm.create_shared_memory_region("scores", key + "-out", scores_bytes)
    try:
        shm.set_shared_memory_region(frames, [pixels])
        client.register_system_shared_memory("frames", key + "-in", pixels.nbytes)
        client.register_system_shared_memory("scores", key + "-out", scores_bytes)
        status = regions()  # gRPC: {"regions": {name: ...}}, REST: a list
        listed = sorted(r["name"] for r in (status["regions"].values()
                                            if isinstance(status, dict) else status))
        tensor = client_module.InferInput("image", list(pixels.shape), "UINT8")
        tensor.set_shared_memory("frames", pixels.nbytes)
        output = client_module.InferRequestedOutput("logits")
        output.set_shared_memory("scores", scores_bytes)
        client.infer(model, [tensor], outputs=[output])
        top = shm.get_contents_as_numpy(scores, np.float32, [len(pixels), classes]).argmax(1)
        client.unregister_system_shared_memory()
        status = regions()
        left = len(status.get("regions", {}) if isinstance(status, dict) else status)
        return {"listed": listed, "top1": [int(c) for c in top], "left": left}
    finally:
        shm.destroy_shared_memory_region(frames)
        shm.destroy_shared_memory_region(scores)


def main(protocol: str, url: str, model: str, paths: list[str]) -> dict:
    grpc = protocol == "grpc"
    client_module = tritonclient.grpc if grpc else tritonclient.http
    client = client_module.InferenceServerClient(url)

    def as_json(method, *args):  # tritonclient.http answers dicts, .grpc messages unless asked
        return method(*args, as_json=True) if grpc else method(*args)

    def response_of(result) -> dict:
        return as_json(result.get_response)

    config = as_json(client.get_model_config, model)
    seen: dict = {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server": as_json(client.get_server_metadata),
        "metadata": as_json(client.get_model_metadata, model),
        "config": config["config"] if grpc else config,
    }
    encoded = [open(p, "rb").read() for p in paths]
    outputs = [client_module.InferRequestedOutput("logits"),
               client_module.InferRequestedOutput("saliency_map")]

    # encoded JPEGs as BYTES: the server decodes and resizes them
    jpegs = client_module.InferInput("image", [len(encoded)], "BYTES")
    jpegs.set_data_from_numpy(np.array(encoded, dtype=np.object_))
    result = client.infer(model, [jpegs], outputs=outputs, request_id="bytes-1")
    seen["bytes"] = {"top1": top1(result, len(encoded)), "id": response_of(result)["id"],
                     "saliency_shape": list(result.as_numpy("saliency_map").shape)}

    # the same photos as a u8 tensor at the model's size
    height, width = (int(d) for d in seen["config"]["input"][0]["dims"][:2])
    pixels = np.stack([cv2.resize(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB),
                                  (width, height), interpolation=cv2.INTER_LINEAR)
                       for p in paths])
    tensor = client_module.InferInput("image", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], outputs=outputs[:1])
    seen["uint8"] = {"top1": top1(result, len(paths)),
                     "outputs": [o["name"] for o in response_of(result)["outputs"]]}

    # Triton's classification extension: the top 3 as "score:index:label" per image
    result = client.infer(model, [tensor],
                          outputs=[client_module.InferRequestedOutput("logits", class_count=3)])
    seen["classification"] = [[item.decode() for item in row]
                              for row in result.as_numpy("logits")]

    if grpc:  # Triton's streaming extension: frames over one stream, answered by callback
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, image in enumerate(pixels):
            frame = client_module.InferInput("image", [1, *image.shape], "UINT8")
            frame.set_data_from_numpy(image[None])
            client.async_stream_infer(model, [frame], request_id=f"frame-{i}",
                                      outputs=outputs[:1])
        wrong = client_module.InferInput("image", [1, 2, 2, 3], "UINT8")
        wrong.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.uint8))
        client.async_stream_infer(model, [wrong], request_id="frame-wrong")
        frame = client_module.InferInput("image", [1, *pixels[0].shape], "UINT8")
        frame.set_data_from_numpy(pixels[:1])
        client.async_stream_infer(model, [frame], request_id="frame-after")
        got = [answers.get(timeout=120) for _ in range(len(pixels) + 2)]
        client.stop_stream()
        seen["stream"] = [
            {"error": error.message()} if error is not None else
            {"id": response_of(result)["id"], "top1": top1(result, 1)[0]}
            for result, error in got]

    # Triton's system shared memory extension: the frames in a POSIX shared memory object,
    # the scores written back to another, neither through the socket
    classes = int(seen["metadata"]["outputs"][0]["shape"][-1])
    seen["shared_memory"] = shared_memory_session(
        client, client_module, model, pixels, classes,
        lambda: as_json(client.get_system_shared_memory_status))

    if not grpc:  # the body gzipped both ways (Content-Encoding, Accept-Encoding)
        result = client.infer(model, [tensor], outputs=outputs,
                              request_compression_algorithm="gzip",
                              response_compression_algorithm="gzip")
        seen["compressed"] = {"top1": top1(result, len(paths)),
                              "saliency_shape": list(result.as_numpy("saliency_map").shape)}

    seen["statistics"] = as_json(client.get_inference_statistics, model)
    index = as_json(client.get_model_repository_index)
    seen["index"] = index if grpc else {"models": index}  # REST: the list itself
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
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])))
