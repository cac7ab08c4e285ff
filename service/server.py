"""The gRPC server: KServe v2, the explanation service, health and reflection on one port."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import ServerSettings
from .explain_service import ExplanationServicer
from .kserve import KServeServicer
from .proto import grpc_predict_v2_pb2 as kserve_pb
from .proto import grpc_predict_v2_pb2_grpc as kserve_grpc
from .proto import xaiserve_pb2 as xai_pb
from .proto import xaiserve_pb2_grpc as xai_grpc
from .repository import ModelRepository

log = logging.getLogger("xaiserve.server")


class Server:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.repository = ModelRepository(settings)
        self.health = health.HealthServicer()
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.workers),
                                options=options)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.repository), self.grpc)
        xai_grpc.add_ExplanationServiceServicer_to_server(
            ExplanationServicer(self.repository, settings), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        services = (kserve_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                    xai_pb.DESCRIPTOR.services_by_name["ExplanationService"].full_name,
                    health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, self.grpc)
        self.port = self.grpc.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"--port {settings.port}: cannot bind {settings.host}:{settings.port}")

    def start(self) -> "Server":
        self.repository.check_devices()
        self.repository.start(wait=True)
        self.grpc.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d", ", ".join(self.repository.names()) or "nothing",
                 self.port)
        return self

    def stop(self, grace: float = 10.0) -> None:
        """Stop taking requests, let in-flight ones finish within `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.repository.stop()
        self.grpc.stop(grace).wait()

    def serve_forever(self, grace: float = 10.0) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        log.info("shutting down (grace %.0f s)", grace)
        self.stop(grace)
