"""The client's side of shared memory (service.shared_memory): a camera process on the
server's host keeps its frames in a POSIX shared memory object registered as a region, and
sends `Image.shared_memory` instead of the pixels.

    with SharedFrames(client.channel, (1080, 1920, 3), slots=4) as frames:
        for frame in camera:
            client.explain(frames.put(frame), "efficientnet_lite0")

The object has `slots` frames, used in turn: a caller keeps at most that many requests in
flight (a slot is written again `slots` frames later).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import grpc
import numpy as np

from .proto import grpc_predict_v2_pb2 as kpb
from .proto import grpc_predict_v2_pb2_grpc as kgrpc
from .proto import xaiserve_pb2 as pb
from .shared_memory import SHM_ROOT, write_all


class SharedFrames:
    def __init__(self, channel: grpc.Channel, shape: tuple[int, int, int], slots: int = 4,
                 name: str | None = None, timeout: float = 30.0):
        if len(shape) != 3 or shape[2] != 3 or min(shape) < 1 or slots < 1:
            raise ValueError(f"shape {shape}, slots {slots}: frames are u8 [H, W, 3], slots >= 1")
        self.shape = tuple(int(d) for d in shape)
        self.frame_bytes = int(np.prod(self.shape))
        self.slots = slots
        self.name = name or f"xaiserve-frames-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stub = kgrpc.GRPCInferenceServiceStub(channel)
        self.timeout = timeout
        self.path = SHM_ROOT / self.name
        self._next = 0
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self._descriptor, self.frame_bytes * slots)
            self.register()
        except BaseException:
            self._remove()
            raise

    def register(self) -> None:
        """Register the object as the region `name`, again if it was: regions are
        server-wide, and another client may have unregistered every one (perf_analyzer does
        when it starts)."""
        self.stub.SystemSharedMemoryUnregister(
            kpb.SystemSharedMemoryUnregisterRequest(name=self.name), timeout=self.timeout)
        self.stub.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(
            name=self.name, key="/" + self.name, byte_size=self.frame_bytes * self.slots),
            timeout=self.timeout)

    def put(self, frame: np.ndarray) -> pb.Image:
        """Write the frame into the next slot; the Image that names it."""
        if frame.shape != self.shape or frame.dtype != np.uint8:
            raise ValueError(f"frame {frame.dtype} {list(frame.shape)}: these frames are uint8 "
                             f"{list(self.shape)}")
        offset = self._next * self.frame_bytes
        self._next = (self._next + 1) % self.slots
        write_all(self._descriptor, np.ascontiguousarray(frame), offset)
        return pb.Image(shared_memory=pb.SharedImage(
            region=self.name, offset=offset, byte_size=self.frame_bytes, shape=self.shape))

    def _remove(self) -> None:
        os.close(self._descriptor)
        Path(self.path).unlink(missing_ok=True)

    def close(self) -> None:
        """Unregister the region (a server gone already is no error) and remove the object."""
        try:
            self.stub.SystemSharedMemoryUnregister(
                kpb.SystemSharedMemoryUnregisterRequest(name=self.name), timeout=self.timeout)
        except grpc.RpcError:
            pass
        finally:
            self._remove()

    def __enter__(self) -> "SharedFrames":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
