"""OrchestratorClient: the CLI's (and anyone's) typed client of the public API."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from orchestrator_service.auth import basic_credentials, bearer_credentials
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

R = TypeVar("R")
DEADLINE = 30.0
PUBLISH_DEADLINE = 600.0  # re-rendering and writing thousands of pages
RUN_DEADLINE = 7 * 24 * 3600.0  # a batch of thousands of articles may take days at low concurrency


class EventStream:
    """The JobEvents of a RunJob or ResumeJob call. Iterating may be interrupted (Ctrl-C) and
    taken up again; close() cancels the call, which cancels the run."""

    def __init__(
        self, call: Any, to_error: Callable[[grpc.RpcError], runtime.ServiceCallError]
    ) -> None:
        self._call = call
        self._to_error = to_error

    def __iter__(self) -> Iterator[pb.JobEvent]:
        return self

    def __next__(self) -> pb.JobEvent:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            raise self._to_error(e) from e

    def close(self) -> None:
        self._call.cancel()  # a no-op once the call has ended

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class OrchestratorClient:
    """A channel to the orchestrator with the caller's credentials on every call: a session
    `token` from Login, else `username` and `password` (none at all is fine for login()).
    With `root_certificates` (PEM) the channel is TLS and trusts only them."""

    def __init__(
        self,
        address: str,
        username: str = "",
        password: str = "",
        *,
        token: str = "",
        root_certificates: bytes | None = None,
    ) -> None:
        self.address = address
        self._metadata: tuple[tuple[str, str], ...] = ()
        if token:
            self._metadata = bearer_credentials(token)
        elif username:
            self._metadata = basic_credentials(username, password)
        self._channel = runtime.open_channel(address, root_certificates)
        self._stub = pb_grpc.OrchestratorServiceStub(self._channel)

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> runtime.ServiceCallError:
        return runtime.ServiceCallError("orchestrator_service", self.address, error)

    def run_job(self, job_file: str) -> EventStream:
        """Events of the run, ending with RunFinished. Closing the stream cancels the run."""
        request = pb.RunJobRequest(job_file=job_file)
        call = self._stub.RunJob(request, timeout=RUN_DEADLINE, metadata=self._metadata)
        return EventStream(call, self._error)

    def resume_job(
        self, job_id: int, retry_failed: bool = False, max_cost_usd: float = 0.0
    ) -> EventStream:
        """Events of the resumed job, ending with RunFinished."""
        request = pb.ResumeJobRequest(
            job_id=job_id, retry_failed=retry_failed, max_cost_usd=max_cost_usd
        )
        call = self._stub.ResumeJob(request, timeout=RUN_DEADLINE, metadata=self._metadata)
        return EventStream(call, self._error)

    def cancel_job(self, job_id: int) -> str:
        return self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).message

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

    def login(self, username: str, password: str) -> pb.LoginResponse:
        request = pb.LoginRequest(username=username, password=password)
        return self._call(self._stub.Login, request)

    def create_user(self, username: str, password: str, role: str = "user") -> pb.User:
        request = pb.CreateUserRequest(username=username, password=password, role=role)
        return self._call(self._stub.CreateUser, request)

    def list_users(self) -> list[pb.User]:
        return list(self._call(self._stub.ListUsers, pb.ListUsersRequest()).users)

    def set_user_active(self, username: str, active: bool) -> pb.User:
        request = pb.SetUserActiveRequest(username=username, active=active)
        return self._call(self._stub.SetUserActive, request)

    def set_password(self, username: str, password: str) -> pb.User:
        request = pb.SetPasswordRequest(username=username, password=password)
        return self._call(self._stub.SetPassword, request)
