"""The receiving end of SchedulerService.ReportLoad on loopback: keeps every report a replica sends, so tests can
watch what the scheduler would see (the scheduler itself is another issue's work)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, NoReturn

import grpc

from aimass.v1 import scheduler_pb2, scheduler_pb2_grpc


class LoadReportSink(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, report_interval_ms: int = 100) -> None:
        self.report_interval_ms = report_interval_ms
        self.reports: list[scheduler_pb2.ReportLoadRequest] = []
        self._changed = threading.Condition()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)

    def ReportLoad(
        self, request: scheduler_pb2.ReportLoadRequest, context: grpc.ServicerContext
    ) -> scheduler_pb2.ReportLoadResponse:
        with self._changed:
            self.reports.append(request)
            self._changed.notify_all()
        return scheduler_pb2.ReportLoadResponse(report_interval_ms=self.report_interval_ms)

    # The rest of the scheduler's contract is not this sink's business.
    def _unimplemented(self, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this test sink only receives load reports")
        raise AssertionError("unreachable")

    def ReportNode(self, request: Any, context: grpc.ServicerContext) -> scheduler_pb2.ReportNodeResponse:
        self._unimplemented(context)

    def WatchView(self, request: Any, context: grpc.ServicerContext) -> Iterator[scheduler_pb2.WatchViewResponse]:
        self._unimplemented(context)

    def PlaceModel(self, request: Any, context: grpc.ServicerContext) -> scheduler_pb2.PlaceModelResponse:
        self._unimplemented(context)

    def EvictModel(self, request: Any, context: grpc.ServicerContext) -> scheduler_pb2.EvictModelResponse:
        self._unimplemented(context)

    def GetPlacement(self, request: Any, context: grpc.ServicerContext) -> scheduler_pb2.GetPlacementResponse:
        self._unimplemented(context)

    def wait_for(
        self, predicate: Callable[[scheduler_pb2.ReportLoadRequest], bool], timeout_s: float, *, after: int = 0
    ) -> scheduler_pb2.ReportLoadRequest:
        """The first report (from index ``after`` on) that satisfies ``predicate``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout_s
        seen = after
        with self._changed:
            while True:
                for report in self.reports[seen:]:
                    if predicate(report):
                        return report
                seen = len(self.reports)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = self.reports[-1] if self.reports else None
                    raise AssertionError(f"no matching load report within {timeout_s}s; last: {last}")
                self._changed.wait(remaining)
