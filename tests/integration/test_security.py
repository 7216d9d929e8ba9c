"""Only the right people in: the authorisation matrix through the real services. Who may call
(no credentials, wrong password, expired, forged or altered tokens, a disabled account), what
they may touch (their own jobs and projects; an admin everything), who manages users, and that
the internal services answer nobody but the other services."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from generator_service.llm.simulator import SimulatorConfig
from orchestrator_service import cli, interceptors
from orchestrator_service.auth import TokenSigner
from orchestrator_service.client import OrchestratorClient
from orchestrator_service.credentials import bearer_credentials
from orchestrator_service.stack import LocalStack, StackConfig
from tests.helpers import TIER, job_file
from tierwriter.generator.v1 import generator_service_pb2 as gen_pb
from tierwriter.generator.v1 import generator_service_pb2_grpc as gen_grpc
from tierwriter.orchestrator.v1 import orchestrator_service_pb2 as pb
from tierwriter.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tierwriter.persistence.v1 import persistence_service_pb2 as db_pb
from tierwriter.persistence.v1 import persistence_service_pb2_grpc as db_grpc
from tierwriter.runtime import MAX_MESSAGE_BYTES, ServiceCallError

SECRET = "a-signing-secret-for-these-tests-only-0123456789"
FAST = SimulatorConfig(latency=0.01)
SMALL_TIER = {"tier1": {**TIER, "count": 2}}


def denied(call: Callable[[], Any]) -> ServiceCallError:
    """The error a call that must fail raised."""
    with pytest.raises(ServiceCallError) as error:
        call()
    return error.value


@pytest.fixture
def team(start_stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A stack with a known signing secret, users ann and bob, and a finished job of ann's."""
    monkeypatch.setenv("TOKEN_SIGNING_SECRET", SECRET)
    handle = start_stack(simulator=FAST)
    address = handle.stack.orchestrator_address
    with OrchestratorClient(address, "admin", handle.password) as admin:
        admin.create_user("ann", "ann-password-1")
        admin.create_user("bob", "bob-password-1")
    with OrchestratorClient(address, "ann", "ann-password-1") as ann:
        events = list(ann.run_job(job_file(SMALL_TIER, deployment_targets=["ann.example.net"])))
        ann_job = events[0].job_started.job_id
        assert [s.hostname for s in ann.list_sites()] == ["ann.example.net"]
        assert events[-1].run_finished.summary.requested_articles == 2
        project = ann.get_job(ann_job).job.project
    return {"handle": handle, "address": address, "ann_job": ann_job, "ann_project": project}


def test_calls_without_valid_credentials_are_unauthenticated(team) -> None:
    address = team["address"]
    cases = {
        "no credentials": OrchestratorClient(address),
        "wrong password": OrchestratorClient(address, "ann", "not-her-password"),
        "unknown user": OrchestratorClient(address, "nobody", "ann-password-1"),
        "expired token": OrchestratorClient(
            address, token=TokenSigner(SECRET, 60, clock=lambda: time.time() - 3600).issue("ann")[0]
        ),
        "token signed with another key": OrchestratorClient(
            address, token=TokenSigner("another-key-" * 4, 3600).issue("admin")[0]
        ),
        "unsigned token (alg none)": OrchestratorClient(
            address,
            token=jwt.encode(
                {
                    "sub": "admin",
                    "ver": 1,
                    "iss": "tierwriter",
                    "iat": int(time.time()),
                    "exp": int(time.time()) + 600,
                },
                key="",
                algorithm="none",
            ),
        ),
        "altered token": OrchestratorClient(address, token=_promoted_to_admin(address)),
        "garbage token": OrchestratorClient(address, token="not.a.token"),
    }
    messages = {}
    for case, client in cases.items():
        with client:
            error = denied(client.list_jobs)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED, case
        messages[case] = error.details
    assert "credentials required" in messages["no credentials"]
    # Wrong password and unknown user read the same: the answer does not tell which it was.
    assert messages["wrong password"] == messages["unknown user"] == "invalid username or password"
    assert "expired: run `tierwriter login` again" in messages["expired token"]
    for forged in ("token signed with another key", "unsigned token (alg none)", "altered token"):
        assert "invalid session token" in messages[forged], forged


def _promoted_to_admin(address: str) -> str:
    """ann's real token with its subject changed to admin, the signature kept."""
    with OrchestratorClient(address) as anonymous:
        token = anonymous.login("ann", "ann-password-1").token
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_a_login_token_works_until_its_account_is_disabled(team) -> None:
    address, password = team["address"], team["handle"].password
    with OrchestratorClient(address) as anonymous:
        login = anonymous.login("ann", "ann-password-1")
    assert login.user.username == "ann" and login.user.role == "user"
    assert 3500 < login.expire_time.ToSeconds() - time.time() <= 3600  # TOKEN_TTL_SECONDS' default
    with (
        OrchestratorClient(address, token=login.token) as ann,
        OrchestratorClient(address, "admin", password) as admin,
    ):
        assert [j.job_id for j in ann.list_jobs()] == [team["ann_job"]]
        admin.set_user_active("ann", False)
        for call in (ann.list_jobs, lambda: ann.get_job(team["ann_job"])):
            error = denied(call)
            assert error.code == grpc.StatusCode.UNAUTHENTICATED
            assert "disabled" in error.details
        with OrchestratorClient(address, "ann", "ann-password-1") as by_password:
            assert denied(by_password.list_jobs).code == grpc.StatusCode.UNAUTHENTICATED
        with OrchestratorClient(address) as anonymous:
            again = denied(lambda: anonymous.login("ann", "ann-password-1"))
            assert again.code == grpc.StatusCode.UNAUTHENTICATED
        admin.set_user_active("ann", True)
        assert [j.job_id for j in ann.list_jobs()] == [team["ann_job"]]


def test_a_new_password_ends_the_tokens_issued_before_it(team) -> None:
    address = team["address"]
    with OrchestratorClient(address) as anonymous:
        before = anonymous.login("ann", "ann-password-1").token
    with OrchestratorClient(address, token=before) as ann:
        ann.set_password("ann", "ann-password-2")
        error = denied(ann.list_jobs)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert "the password changed after this session token was issued" in error.details
    with OrchestratorClient(address) as anonymous:
        after = anonymous.login("ann", "ann-password-2").token
    with OrchestratorClient(address, token=after) as ann:
        assert [j.job_id for j in ann.list_jobs()] == [team["ann_job"]]


def test_a_user_sees_and_acts_on_their_own_jobs_and_projects_only(team) -> None:
    address, ann_job = team["address"], team["ann_job"]
    with OrchestratorClient(address, "bob", "bob-password-1") as bob:
        assert bob.list_jobs() == [] and bob.list_projects() == [] and bob.list_sites() == []
        missing = ann_job + 1000
        actions: dict[str, Callable[[int], Any]] = {
            "get": bob.get_job,
            "cancel": bob.cancel_job,
            "publish": bob.publish_job,
            "resume": lambda job: list(bob.resume_and_watch(job)),
        }
        for name, act in actions.items():
            theirs, nobodys = denied(partial(act, ann_job)), denied(partial(act, missing))
            assert theirs.code == nobodys.code == grpc.StatusCode.PERMISSION_DENIED, name
            # Someone else's job reads exactly like one that does not exist.
            assert theirs.details.replace(str(ann_job), "N") == nobodys.details.replace(
                str(missing), "N"
            )
            assert "your own jobs only" in theirs.details
        ann_project_id = _project_id(address, team["handle"].password, team["ann_project"])
        project = denied(lambda: bob.get_project(project_id=ann_project_id))
        assert project.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied(lambda: bob.get_project(name=team["ann_project"])).code == (
            grpc.StatusCode.NOT_FOUND
        )
        # Running a job on ann's project by id is refused before anything is written.
        spec = json.loads(job_file(SMALL_TIER))
        del spec["jobs"][0]["project"]
        spec["jobs"][0]["project_id"] = ann_project_id
        refused = denied(lambda: list(bob.run_job(json.dumps(spec))))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"jobs[0].project_id: you have no project {ann_project_id}" in refused.details
        # The same project name is bob's own project, not ann's.
        spec = json.loads(job_file(SMALL_TIER))
        spec["jobs"][0]["project"]["name"] = team["ann_project"]
        events = list(bob.run_job(json.dumps(spec)))
        bob_job = events[0].job_started.job_id
        assert [j.job_id for j in bob.list_jobs()] == [bob_job]
        assert [(p.name, p.owner) for p in bob.list_projects()] == [(team["ann_project"], "bob")]
        assert bob.list_sites() == []  # his job named no site; ann's site is not his
    with OrchestratorClient(address, "admin", team["handle"].password) as admin:
        assert {j.job_id: j.owner for j in admin.list_jobs()} == {ann_job: "ann", bob_job: "bob"}
        assert admin.get_job(ann_job).job.owner == "ann"
        assert denied(lambda: admin.get_job(missing)).code == grpc.StatusCode.NOT_FOUND
        assert {p.owner for p in admin.list_projects()} == {"ann", "bob"}
        assert [s.hostname for s in admin.list_sites()] == ["ann.example.net"]


def _project_id(address: str, admin_password: str, name: str) -> int:
    with OrchestratorClient(address, "admin", admin_password) as admin:
        return next(p.id for p in admin.list_projects() if p.name == name and p.owner == "ann")


def test_only_admins_manage_users_and_a_user_changes_only_their_own_password(team) -> None:
    address = team["address"]
    with OrchestratorClient(address, "bob", "bob-password-1") as bob:
        for call in (
            lambda: bob.create_user("mallory", "mallory-password"),
            bob.list_users,
            lambda: bob.set_user_active("ann", False),
            lambda: bob.set_password("ann", "taken-over-1"),
            lambda: bob.set_password("nobody", "taken-over-1"),
        ):
            assert denied(call).code == grpc.StatusCode.PERMISSION_DENIED
        assert bob.set_password("bob", "bob-password-2").username == "bob"
    with OrchestratorClient(address, "bob", "bob-password-2") as bob:
        assert bob.list_jobs() == []
    with OrchestratorClient(address, "admin", team["handle"].password) as admin:
        users = {u.username: (u.role, u.active) for u in admin.list_users()}
        assert users == {"admin": ("admin", True), "ann": ("user", True), "bob": ("user", True)}
        taken = denied(lambda: admin.create_user("ann", "whatever-password"))
        assert taken.code == grpc.StatusCode.ALREADY_EXISTS
        bad = denied(lambda: admin.create_user("ann; DROP TABLE users", "whatever-password"))
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "username:" in bad.details
        short = denied(lambda: admin.create_user("carol", "short"))
        assert short.code == grpc.StatusCode.INVALID_ARGUMENT and "password:" in short.details
        last = denied(lambda: admin.set_user_active("admin", False))
        assert last.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "last active admin" in last.details


def login_from(
    orchestrator: str, client: str, username: str, password: str
) -> tuple[grpc.StatusCode, str] | None:
    """A Login as if from `client`, through a proxy the orchestrator trusts (127.0.0.1, with
    `x-forwarded-for`): None when it succeeds, else its status code and details."""
    with grpc.insecure_channel(orchestrator) as channel:
        try:
            pb_grpc.OrchestratorServiceStub(channel).Login(
                pb.LoginRequest(username=username, password=password),
                timeout=30,
                metadata=(("x-forwarded-for", client),),
            )
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return None


def test_the_login_brake_slows_the_guesser_down_but_never_locks_the_user_out(
    start_stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # A first delay of 2 minutes: what is held back below stays held back however slow the
    # machine, without any test waiting for it.
    settings = {"trusted_proxies": "127.0.0.1", "login_delay_seconds": 120}
    handle = start_stack(simulator=FAST, orchestrator_settings=settings)
    address, admin_password = handle.stack.orchestrator_address, handle.password
    with OrchestratorClient(address, "admin", admin_password) as admin:
        admin.create_user("ann", "ann-password-1")
    guesser, ann_at_home = "203.0.113.66", "198.51.100.7"

    def code(client: str, username: str, password: str) -> grpc.StatusCode | None:
        failure = login_from(address, client, username, password)
        return failure[0] if failure else None

    for n in range(3):
        assert code(guesser, "ann", f"guess-number-{n}") == grpc.StatusCode.UNAUTHENTICATED
    # Now even the right password waits when it comes from the address that failed.
    slowed = login_from(address, guesser, "ann", "ann-password-1")
    assert slowed and slowed[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"too many failed logins for 'ann': try again in 1[0-2]\d s", slowed[1])
    # The real ann, at a machine with no failures, gets in: the guesses cost her nothing.
    assert code(ann_at_home, "ann", "ann-password-1") is None
    # Ten failures from one address, at any names, slow that address down for every account.
    for n in range(7):
        assert code(guesser, f"nobody-{n}", "wrong-password") == grpc.StatusCode.UNAUTHENTICATED
    slowed = login_from(address, guesser, "admin", admin_password)
    assert slowed and "too many failed logins from your address" in slowed[1]
    assert code(ann_at_home, "admin", admin_password) is None
    # Correct credentials sent at once are never refused, however many (24 commands of a script
    # with -u/-p: each logs in with the password).
    with ThreadPoolExecutor(max_workers=24) as pool:

        def list_jobs(_: int) -> int:
            with OrchestratorClient(address, "admin", admin_password) as client:
                return len(client.list_jobs())

        assert list(pool.map(list_jobs, range(24))) == [0] * 24
    failures = [m for r in caplog.records if "203.0.113.66: failed" in (m := r.getMessage())]
    assert failures == [  # ten in the minute: the first is logged, the others counted
        "refused a call from 203.0.113.66: failed login: 'ann', 1 in a row at the account, "
        "1 from the address"
    ]
    assert "guess-number" not in caplog.text and "ann-password-1" not in caplog.text
    assert admin_password not in caplog.text


def test_a_site_belongs_to_its_first_user_until_an_admin_transfers_it(
    team, capsys: pytest.CaptureFixture[str]
) -> None:
    address, admin_password = team["address"], team["handle"].password
    evil = job_file(
        SMALL_TIER, deployment_targets=[{"hostname": "ann.example.net", "template": "evil"}]
    )
    with OrchestratorClient(address, "bob", "bob-password-1") as bob:
        refused = denied(lambda: bob.submit_job(evil))
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.details.startswith(
            "jobs[0].deployment_targets: ann.example.net: this site belongs to another user"
        )
        assert bob.list_jobs() == [] and bob.list_sites() == []
    with OrchestratorClient(address, "admin", admin_password) as admin:
        sites = [(s.hostname, s.template, s.owner) for s in admin.list_sites()]
        assert sites == [("ann.example.net", "", "ann")]  # her template and URLs untouched
        assert denied(lambda: admin.transfer_site("ann.example.net", "nobody")).code == (
            grpc.StatusCode.NOT_FOUND
        )
    with OrchestratorClient(address, "bob", "bob-password-1") as bob:
        assert denied(lambda: bob.transfer_site("ann.example.net", "bob")).code == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    argv = ["sites", "transfer", "ann.example.net", "bob", "--address", address, "-u", "admin"]
    assert cli.main([*argv, "-p", admin_password]) == 0
    assert "ann.example.net now belongs to bob." in capsys.readouterr().out
    mine = job_file(SMALL_TIER, deployment_targets=["ann.example.net"])
    with OrchestratorClient(address, "bob", "bob-password-1") as bob:
        assert list(bob.run_job(mine))[-1].run_finished.ok
        assert [(s.hostname, s.owner) for s in bob.list_sites()] == [("ann.example.net", "bob")]
    with OrchestratorClient(address, "ann", "ann-password-1") as ann:
        assert denied(lambda: ann.submit_job(mine)).code == grpc.StatusCode.INVALID_ARGUMENT
        assert [j.job_id for j in ann.list_jobs()] == [team["ann_job"]]
        # Her older job on the site may no longer publish or run there either.
        for again in (ann.publish_job, ann.resume_job):
            refused = denied(partial(again, team["ann_job"]))
            assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.details.startswith(
                f"site ann.example.net of job {team['ann_job']} belongs to another user now"
            )


def test_logout_revokes_the_token_on_every_orchestrator_copies_included(team, start_stack) -> None:
    other = start_stack(simulator=FAST).stack.orchestrator_address  # same database
    with OrchestratorClient(team["address"]) as anonymous:
        token = anonymous.login("ann", "ann-password-1").token
    for address in (team["address"], other):
        with OrchestratorClient(address, token=token) as copy:
            assert [j.job_id for j in copy.list_jobs()] == [team["ann_job"]]
    with OrchestratorClient(team["address"], token=token) as ann:
        assert ann.logout() == "ann"
    for address in (team["address"], other):
        with OrchestratorClient(address, token=token) as copy:
            refused = denied(copy.list_jobs)
            assert refused.code == grpc.StatusCode.UNAUTHENTICATED
            assert "this session token was logged out" in refused.details
            assert copy.logout() == "ann"  # again: still revoked, not an error
    with OrchestratorClient(team["address"], "ann", "ann-password-1") as by_password:
        assert denied(by_password.logout).code == grpc.StatusCode.FAILED_PRECONDITION
        fresh = by_password.login("ann", "ann-password-1").token
    with OrchestratorClient(other, token=fresh) as ann:  # her other sessions go on
        assert [j.job_id for j in ann.list_jobs()] == [team["ann_job"]]
    # A token of a disabled account can be logged out too, and stays dead once it is enabled.
    with OrchestratorClient(team["address"], "admin", team["handle"].password) as admin:
        admin.set_user_active("ann", False)
        with OrchestratorClient(other, token=fresh) as ann:
            assert ann.logout() == "ann"
        admin.set_user_active("ann", True)
    with OrchestratorClient(other, token=fresh) as ann:
        assert "this session token was logged out" in denied(ann.list_jobs).details


@pytest.mark.parametrize("job_goes_on", [False, True], ids=["quiet job", "busy job"])
def test_a_watch_stream_ends_once_its_token_is_logged_out(
    team, monkeypatch: pytest.MonkeyPatch, job_goes_on: bool
) -> None:
    monkeypatch.setattr(interceptors, "RECHECK_SECONDS", 0.0)  # every time, not every 30 s
    simulator = team["handle"].stack.simulator
    with OrchestratorClient(team["address"]) as anonymous:
        token = anonymous.login("ann", "ann-password-1").token
    simulator.hold("outline")  # the job waits, in flight: no event comes until release
    try:
        with OrchestratorClient(team["address"], token=token) as ann:
            [held] = ann.submit_job(job_file(SMALL_TIER))
            with ann.watch_job(held) as stream:
                assert next(stream).WhichOneof("event") == "job_started"
                ann.logout()
                if job_goes_on:  # events come: the check before each one ends the stream
                    simulator.release()
                # else the watch waits for events, and its own check while waiting ends it
                with pytest.raises(ServiceCallError) as ended:
                    for event in stream:  # what was sent before the logout still arrives
                        assert event.WhichOneof("event") != "run_finished"
        assert ended.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "this session token was logged out" in ended.value.details
    finally:
        simulator.release()


def test_a_user_calling_the_internal_services_directly_is_refused(team) -> None:
    stack = team["handle"].stack
    with OrchestratorClient(team["address"]) as anonymous:
        token = anonymous.login("bob", "bob-password-1").token
    for metadata in (bearer_credentials(token), (("x-tierwriter-service-token", "guess"),)):
        with grpc.insecure_channel(stack.persistence_address) as channel:
            with pytest.raises(grpc.RpcError) as error:
                db_grpc.PersistenceServiceStub(channel).ListUsers(
                    db_pb.ListUsersRequest(), timeout=10, metadata=metadata
                )
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(stack.generator_address) as channel:
            with pytest.raises(grpc.RpcError) as error:
                list(  # a stream: its status comes with the first read
                    gen_grpc.GeneratorServiceStub(channel).GenerateTitles(
                        gen_pb.GenerateTitlesRequest(), timeout=10, metadata=metadata
                    )
                )
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rpc_arguments_are_checked_in_the_servicer_naming_the_field(team) -> None:
    address = team["address"]
    with OrchestratorClient(address, "admin", team["handle"].password) as admin:
        for call, field in [
            (lambda: admin.get_job(0), "job_id: must be positive"),
            (lambda: admin.cancel_job(-5), "job_id: must be positive"),
            (lambda: admin.list_jobs(5000), "limit: must be 1 to 1000"),
            (lambda: admin.get_project(project_id=-1), "give a project id or a project name"),
            (lambda: admin.create_user("dan", "x" * 1025), "password: must be 8 to 1024"),
            (lambda: admin.create_user("dan", "long-enough", role="root"), "role: must be one of"),
            (lambda: admin.create_user("", "long-enough"), "username: 1-64 characters"),
            (lambda: admin.set_password("ann", "short"), "password: must be 8 to 1024"),
        ]:
            error = denied(call)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, field
            assert field in error.details
    with OrchestratorClient(address) as anonymous:
        empty = denied(lambda: anonymous.login("ann", ""))
        assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "username and password" in empty.details


def test_a_message_over_the_size_cap_is_refused_and_the_server_goes_on(team) -> None:
    """Raw channels without our client-side caps, so the servers' own caps are what refuse."""
    huge = "x" * (MAX_MESSAGE_BYTES + 1024)
    stack = team["handle"].stack
    with grpc.insecure_channel(stack.orchestrator_address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(
                pb_grpc.OrchestratorServiceStub(channel).SubmitJob(
                    pb.SubmitJobRequest(job_file=huge), timeout=30
                )
            )
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(stack.persistence_address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            db_grpc.PersistenceServiceStub(channel).CreateUser(
                db_pb.CreateUserRequest(username="big", password=huge),
                timeout=30,
                metadata=(("x-tierwriter-service-token", stack.service_token),),
            )
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with OrchestratorClient(team["address"], "admin", team["handle"].password) as admin:
        assert [j.job_id for j in admin.list_jobs()] == [team["ann_job"]]


def test_a_flood_of_refused_calls_logs_a_line_per_client_and_minute_not_a_traceback_a_call(
    start_stack, caplog: pytest.LogCaptureFixture
) -> None:
    handle = start_stack(simulator=SimulatorConfig())
    stack = handle.stack
    caplog.set_level(logging.INFO)
    garbage = b"\xff\xfe\x00 not a protobuf message"

    def raw(address: str, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[Any]:
        codes = []
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            for _ in range(100):
                with pytest.raises(grpc.RpcError) as error:
                    call(garbage, timeout=10, metadata=metadata)
                codes.append(error.value.code())
        return codes

    persistence_get_job = "/tierwriter.persistence.v1.PersistenceService/GetJob"
    public_get_job = "/tierwriter.orchestrator.v1.OrchestratorService/GetJob"
    # Strangers' calls are refused unread: to the internal services without the service token,
    # to the public API without credentials.
    persistence = raw(stack.persistence_address, persistence_get_job)
    generate_titles = "/tierwriter.generator.v1.GeneratorService/GenerateTitles"
    generator = raw(stack.generator_address, generate_titles)
    public = raw(stack.orchestrator_address, public_get_job)
    assert set(persistence) == set(generator) == set(public) == {grpc.StatusCode.UNAUTHENTICATED}
    # Garbage from callers who may call is read, and refused as a bad argument.
    with OrchestratorClient(stack.orchestrator_address) as client:
        token = client.login("admin", handle.password).token
    user = raw(stack.orchestrator_address, public_get_job, bearer_credentials(token))
    service = (("x-tierwriter-service-token", stack.service_token),)
    inside = raw(stack.persistence_address, persistence_get_job, service)
    streamed = raw(stack.generator_address, generate_titles, service)  # a stream of responses
    assert set(user) == set(inside) == set(streamed) == {grpc.StatusCode.INVALID_ARGUMENT}

    # 600 refused calls, one line per client and kind: the minute's first, naming the client.
    refused = [r.getMessage() for r in caplog.records if "refused a call" in r.getMessage()]
    # (protobuf's own reason follows "Error parsing message"; its wording varies by version)
    assert sorted(m.partition(" with type")[0] for m in refused) == sorted(
        [
            "refused a call from 127.0.0.1: a request to "
            f"{public_get_job} that cannot be parsed: Error parsing message",
            "refused a call from 127.0.0.1: a request to "
            f"{persistence_get_job} that cannot be parsed: Error parsing message",
            "refused a call from 127.0.0.1: a request to "
            f"{generate_titles} that cannot be parsed: Error parsing message",
            "refused a call from 127.0.0.1: no credentials",
            "refused a call from 127.0.0.1: no valid service token",
        ]
    )
    assert all(r.levelno == logging.WARNING for r in caplog.records if "refused" in r.getMessage())
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def _rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def test_logins_with_unknown_names_cannot_exhaust_persistences_memory(tmp_path: Path) -> None:
    # Each argon2 hash takes 64 MiB: 32 logins at once used to hold 32 of them (2 GiB).
    config = StackConfig.on_loopback(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        output_dir=tmp_path / "output",
        simulator=SimulatorConfig(),
        admin_password="admin-password-123",
        processes=True,
        # Each login from an address of its own (through a trusted proxy): a crowd of machines,
        # so the per-address brake does not stop them and only the hashing bound is tested.
        orchestrator_settings={"trusted_proxies": "127.0.0.1"},
    )
    with LocalStack(config) as stack:
        persistence = stack.service_pids()["persistence_service"]

        def attempt(n: int) -> grpc.StatusCode | None:
            client = f"10.0.{n // 250}.{n % 250 + 1}"
            name = f"nobody-{n}-{uuid.uuid4().hex[:8]}"
            failure = login_from(stack.orchestrator_address, client, name, "wrong-password-123")
            return failure[0] if failure else None

        with ThreadPoolExecutor(max_workers=32) as pool:
            codes = list(pool.map(attempt, range(200)))
        peak = _rss_mb(persistence, "VmHWM")
    # Refused as unknown, or (waited too long for a hash) as busy; never let in.
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) >= 100
    assert peak < 300, f"persistence peaked at {peak:.0f} MB"
