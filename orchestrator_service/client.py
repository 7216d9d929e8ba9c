"""OrchestratorClient: the CLI's (and anyone's) typed client of the public API."""

from __future__ import annotations

from collections.abc import Generator

import grpc

from orchestrator_service.auth import basic_credentials
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

DEADLINE = 30.0
RUN_DEADLINE = 7 * 24 * 3600.0  # a batch of thousands of articles may take days at low concurrency


class OrchestratorClient:
    """A channel to the orchestrator with the caller's credentials on every call."""

    def __init__(self, address: str, username: str, password: str) -> None:
        self.address = address
        self._metadata = basic_credentials(username, password)
        self._channel = runtime.open_channel(address)
        self._stub = pb_grpc.OrchestratorServiceStub(self._channel)

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> runtime.ServiceCallError:
        return runtime.ServiceCallError("orchestrator_service", self.address, error)

    def run_job(self, job_file: str) -> Generator[pb.JobEvent, None, None]:
        """Events of the run, ending with RunFinished. Closing the iterator cancels the run."""
        stream = self._stub.RunJob(
            pb.RunJobRequest(job_file=job_file), timeout=RUN_DEADLINE, metadata=self._metadata
        )
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            stream.cancel()

    def get_job(self, job_id: int) -> pb.GetJobResponse:
        try:
            return self._stub.GetJob(
                pb.GetJobRequest(job_id=job_id), timeout=DEADLINE, metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise self._error(e) from e

    def list_jobs(self, limit: int = 50) -> list[pb.JobInfo]:
        try:
            return list(
                self._stub.ListJobs(
                    pb.ListJobsRequest(limit=limit), timeout=DEADLINE, metadata=self._metadata
                ).jobs
            )
        except grpc.RpcError as e:
            raise self._error(e) from e
