"""OrchestratorClient: the CLI's (and anyone's) typed client of the public API."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

import grpc

from orchestrator_service.auth import basic_credentials
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

R = TypeVar("R")
DEADLINE = 30.0
PUBLISH_DEADLINE = 600.0  # re-rendering and writing thousands of pages
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

    def _call(self, rpc: Callable[..., R], request: Any, timeout: float = DEADLINE) -> R:
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def get_job(self, job_id: int) -> pb.GetJobResponse:
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def list_jobs(self, limit: int = 50) -> list[pb.JobInfo]:
        return list(self._call(self._stub.ListJobs, pb.ListJobsRequest(limit=limit)).jobs)

    def publish_job(self, job_id: int) -> list[pb.PostProcessingStep]:
        request = pb.PublishJobRequest(job_id=job_id)
        return list(self._call(self._stub.PublishJob, request, PUBLISH_DEADLINE).steps)

    def create_project(self, project_json: str) -> pb.Project:
        return self._call(
            self._stub.CreateProject, pb.CreateProjectRequest(project_json=project_json)
        )

    def get_project(self, project_id: int = 0, name: str = "") -> pb.Project:
        return self._call(
            self._stub.GetProject, pb.GetProjectRequest(project_id=project_id, name=name)
        )

    def list_projects(self) -> list[pb.Project]:
        return list(self._call(self._stub.ListProjects, pb.ListProjectsRequest()).projects)

    def list_sites(self) -> list[pb.Site]:
        return list(self._call(self._stub.ListSites, pb.ListSitesRequest()).sites)
