"""OrchestratorClient: the CLI's (and anyone's) typed client of the public API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from orchestrator_service.credentials import basic_credentials, bearer_credentials
from tierwriter import runtime
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

R = TypeVar("R")
DEADLINE = 30.0
# An export streams every page of a job: bounded, but sized for thousands of them.
EXPORT_DEADLINE = 3600.0
PUBLISH_DEADLINE = 600.0  # re-rendering and writing thousands of pages
WATCH_DEADLINE = 7 * 24 * 3600.0  # a batch of thousands of articles may take days


_WATCH_RECONNECT_SECONDS = 120.0  # an orchestrator restarting behind a watcher


class EventStream:
    """The JobEvents of one or more jobs, watched in order. Iterating may be interrupted
    (Ctrl-C) and taken up again; a watch that loses its orchestrator (UNAVAILABLE) reconnects
    and goes on after the last event it saw. close() ends the watch; the jobs run on."""

    def __init__(
        self,
        watch: Callable[[int, int], Any],
        to_error: Callable[[grpc.RpcError], runtime.ServiceCallError],
        job_ids: Sequence[int],
        after_seq: int = 0,
    ) -> None:
        self._watch = watch
        self._to_error = to_error
        self.job_ids = list(job_ids)
        self._events = self._all(after_seq)
        self._call: Any = None
        self._closed = False

    def __iter__(self) -> Iterator[pb.JobEvent]:
        return self

    def __next__(self) -> pb.JobEvent:
        return next(self._events)

    def _all(self, after_seq: int) -> Iterator[pb.JobEvent]:
        for n, job_id in enumerate(self.job_ids):
            yield from self._one(job_id, after_seq if n == 0 else 0)

    def _one(self, job_id: int, after_seq: int) -> Iterator[pb.JobEvent]:
        seq, lost_since = after_seq, 0.0
        while not self._closed:
            self._call = self._watch(job_id, seq)
            try:
                for response in self._call:
                    seq, lost_since = response.event.seq, 0.0
                    yield response.event
                return
            except grpc.RpcError as e:
                error = self._to_error(e)
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise error from e
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > _WATCH_RECONNECT_SECONDS:
                    raise error from e
                time.sleep(1.0)

    def close(self) -> None:
        """End the watch (from any thread: the one iterating then stops with CANCELLED)."""
        self._closed = True
        if self._call is not None:
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

    def submit_job(self, job_file: str, request_id: str = "") -> list[int]:
        """Store the file's jobs (they run on the server from now on); their ids, in order. The
        same `request_id` again (a retry after a lost answer) returns the same jobs."""
        request = pb.SubmitJobRequest(job_file=job_file, request_id=request_id)
        return list(self._call(self._stub.SubmitJob, request).job_ids)

    def watch_job(self, job_id: int, after_seq: int = 0) -> EventStream:
        """The job's events after `after_seq` until it is no longer queued or running."""
        return EventStream(self._open_watch, self._error, [job_id], after_seq)

    def watch_jobs(self, job_ids: Sequence[int]) -> EventStream:
        """Each job's events from its start, one job after the other."""
        return EventStream(self._open_watch, self._error, job_ids)

    def _open_watch(self, job_id: int, after_seq: int) -> Any:
        request = pb.WatchJobRequest(job_id=job_id, after_seq=after_seq)
        return self._stub.WatchJob(request, timeout=WATCH_DEADLINE, metadata=self._metadata)

    def run_job(self, job_file: str) -> EventStream:
        """Submit a job file and watch its jobs in order: each ends with its RunFinished."""
        return self.watch_jobs(self.submit_job(job_file))

    def resume_job(
        self, job_id: int, retry_failed: bool = False, max_cost_usd: float = 0.0
    ) -> pb.ResumeJobResponse:
        """Queue the job again; watch it after the response's after_seq."""
        request = pb.ResumeJobRequest(
            job_id=job_id, retry_failed=retry_failed, max_cost_usd=max_cost_usd
        )
        return self._call(self._stub.ResumeJob, request)

    def resume_and_watch(
        self, job_id: int, retry_failed: bool = False, max_cost_usd: float = 0.0
    ) -> EventStream:
        """Queue the job again and watch the resumed run, to its RunFinished."""
        queued = self.resume_job(job_id, retry_failed, max_cost_usd)
        return self.watch_job(queued.job_id, queued.after_seq)

    def cancel_job(self, job_id: int) -> str:
        return self._call(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id)).message

    def _call(self, rpc: Callable[..., R], request: Any, timeout: float = DEADLINE) -> R:
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from e

    def get_job(self, job_id: int, errors: bool = False) -> pb.GetJobResponse:
        """The job with its counts; with `errors`, its failed articles and their tracebacks."""
        return self._call(self._stub.GetJob, pb.GetJobRequest(job_id=job_id, errors=errors))

    def export_job(self, job_id: int) -> Iterator[pb.ExportJobResponse]:
        """The job's files, as chunks (export.write_files writes them)."""
        stream = self._stub.ExportJob(
            pb.ExportJobRequest(job_id=job_id), timeout=EXPORT_DEADLINE, metadata=self._metadata
        )
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._error(e) from e
        finally:
            stream.cancel()  # a no-op once it ended

    def list_jobs(self, limit: int = 50) -> list[pb.JobInfo]:
        return list(self._call(self._stub.ListJobs, pb.ListJobsRequest(limit=limit)).jobs)

    def publish_job(self, job_id: int) -> list[pb.PostProcessingStep]:
        request = pb.PublishJobRequest(job_id=job_id)
        return list(self._call(self._stub.PublishJob, request, PUBLISH_DEADLINE).steps)

    def create_project(self, project_json: str) -> pb.Project:
        return self._call(
            self._stub.CreateProject, pb.CreateProjectRequest(project_json=project_json)
        ).project

    def get_project(self, project_id: int = 0, name: str = "") -> pb.Project:
        return self._call(
            self._stub.GetProject, pb.GetProjectRequest(project_id=project_id, name=name)
        ).project

    def list_projects(self) -> list[pb.Project]:
        return list(self._call(self._stub.ListProjects, pb.ListProjectsRequest()).projects)

    def list_sites(self) -> list[pb.Site]:
        return list(self._call(self._stub.ListSites, pb.ListSitesRequest()).sites)

    def transfer_site(self, hostname: str, new_owner: str) -> pb.Site:
        request = pb.TransferSiteRequest(hostname=hostname, new_owner=new_owner)
        return self._call(self._stub.TransferSite, request).site

    def login(self, username: str, password: str) -> pb.LoginResponse:
        request = pb.LoginRequest(username=username, password=password)
        return self._call(self._stub.Login, request)

    def logout(self) -> str:
        """Revoke the session token this client calls with; whose it was."""
        return self._call(self._stub.Logout, pb.LogoutRequest()).username

    def create_user(self, username: str, password: str, role: str = "user") -> pb.User:
        request = pb.CreateUserRequest(username=username, password=password, role=role)
        return self._call(self._stub.CreateUser, request).user

    def list_users(self) -> list[pb.User]:
        return list(self._call(self._stub.ListUsers, pb.ListUsersRequest()).users)

    def set_user_active(self, username: str, active: bool) -> pb.User:
        request = pb.SetUserActiveRequest(username=username, active=active)
        return self._call(self._stub.SetUserActive, request).user

    def set_password(self, username: str, password: str) -> pb.User:
        request = pb.SetPasswordRequest(username=username, password=password)
        return self._call(self._stub.SetPassword, request).user

    def get_quota(self, username: str = "", default_quota: bool = False) -> pb.GetQuotaResponse:
        request = pb.GetQuotaRequest(username=username, default_quota=default_quota)
        return self._call(self._stub.GetQuota, request)

    def set_quota(
        self,
        username: str,
        quota: pb.Quota | None,
        default_quota: bool = False,
    ) -> pb.Quota:
        """Set a user's quota (or the default's); None clears the user's own."""
        request = pb.SetQuotaRequest(
            username=username, default_quota=default_quota, quota=quota, clear=quota is None
        )
        return self._call(self._stub.SetQuota, request).quota
