"""Store: idempotent saves and exact stats under many threads, on a real SQLite file."""

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import extract_parameters

from persistence_service import store as store_module
from persistence_service.store import (
    ArticleSave,
    AuthenticationError,
    ConflictError,
    InvalidRecordError,
    NewJobRecord,
    NotFoundError,
    QuotaExceededError,
    QuotaLimits,
    StaleLeaseError,
    StateError,
    Store,
)
from persistence_service.unit_of_work import make_engine, make_session_factory


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", pool_size=20)
    return Store(make_session_factory(engine))


def _job(store: Store, count: int) -> tuple[int, int]:
    project = store.ensure_project(
        {
            "name": "p",
            "main_keyword": "k",
            "entities": [],
            "related_searches": [],
            "money_site_url": "",
        }
    )
    job = store.create_job(
        project.id, {"tiers": [{"name": "tier1", "count": count}]}, 5, count, "admin"
    )
    return project.id, job.id


def _article(project_id: int, job_id: int, index: int, status: str) -> dict[str, object]:
    return dict(
        job_id=job_id,
        project_id=project_id,
        tier="tier1",
        article_index=index,
        keyword="k",
        title=f"t{index}",
        status=status,
        api_calls=2,
        word_count=100,
        prompt_tokens=3,
        completion_tokens=4,
    )


def test_stats_stay_exact_under_many_threads(store: Store) -> None:
    project_id, job_id = _job(store, 200)
    statuses = ["generated", "augmented", "failed", "generated"]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(
            pool.map(
                lambda i: store.save_article(_article(project_id, job_id, i, statuses[i % 4])),
                range(200),
            )
        )
    stats = store.job_stats([job_id])
    assert (stats.totals.generated, stats.totals.augmented, stats.totals.failed) == (100, 50, 50)
    assert stats.totals.requested == 200 and stats.totals.api_calls == 400
    assert stats.totals.words == 150 * 100  # failed records' words do not count


def test_concurrent_saves_of_one_key_store_exactly_one_record(store: Store) -> None:
    project_id, job_id = _job(store, 1)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(
                lambda _: store.save_article(_article(project_id, job_id, 0, "generated")),
                range(16),
            )
        )
    assert sum(created for _, created in results) == 1
    assert len({article.id for article, _ in results}) == 1
    assert len(store.list_articles(job_id)) == 1


def test_a_repeated_save_returns_the_stored_record_unchanged(store: Store) -> None:
    project_id, job_id = _job(store, 1)
    first, created = store.save_article(_article(project_id, job_id, 0, "generated"))
    again, created_again = store.save_article(_article(project_id, job_id, 0, "failed"))
    assert created and not created_again and again.id == first.id and again.status == "generated"


def test_a_bad_status_is_rejected_and_writes_nothing(store: Store) -> None:
    project_id, job_id = _job(store, 1)
    with pytest.raises(InvalidRecordError, match=r"article\.status"):
        store.save_article(_article(project_id, job_id, 0, "done"))
    assert store.list_articles(job_id) == []


def test_saving_many_judges_each_record_as_a_lone_save_would(store: Store) -> None:
    project_id, job_id = _job(store, 6)
    stored, _ = store.save_article(_article(project_id, job_id, 0, "generated"))
    skipped, _ = store.save_article(_article(project_id, job_id, 1, "skipped"))
    results = store.save_articles(
        [
            ArticleSave(_article(project_id, job_id, 0, "failed")),  # stored already: unchanged
            ArticleSave(_article(project_id, job_id, 1, "generated")),  # a skipped one is replaced
            ArticleSave(_article(project_id, job_id, 2, "generated")),
            ArticleSave(_article(project_id, job_id, 3, "done")),  # no such status
            ArticleSave(_article(project_id, job_id + 99, 4, "generated")),  # no such job
            ArticleSave(_article(project_id, job_id, 2, "failed")),  # key given twice: once stored
        ]
    )
    assert [(r.created, r.error) for r in results] == [
        (False, ""),
        (True, ""),
        (True, ""),
        (
            False,
            "article.status: must be one of generated, augmented, short, long, failed, skipped",
        ),
        (False, f"job {job_id + 99} does not exist"),
        (False, ""),
    ]
    assert results[0].article_id == stored.id and results[1].article_id == skipped.id
    assert results[5].article_id == results[2].article_id
    by_index = {a.article_index: a.status for a in store.list_articles(job_id)}
    assert by_index == {0: "generated", 1: "generated", 2: "generated"}


def test_one_bad_reference_in_many_saves_costs_only_its_own_record(store: Store) -> None:
    project_id, job_id = _job(store, 3)
    results = store.save_articles(
        [
            ArticleSave(_article(project_id, job_id, 0, "generated")),
            ArticleSave(_article(project_id + 99, job_id, 1, "generated")),  # the commit fails
            ArticleSave(_article(project_id, job_id, 2, "generated")),
        ]
    )
    assert [r.created for r in results] == [True, False, True]
    assert results[1].error.startswith("article: not stored")
    assert [a.article_index for a in store.list_articles(job_id)] == [0, 2]


def test_concurrent_batches_of_the_same_keys_store_each_once(store: Store) -> None:
    project_id, job_id = _job(store, 20)
    batch = [ArticleSave(_article(project_id, job_id, i, "generated")) for i in range(20)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = list(pool.map(lambda _: store.save_articles(batch), range(4)))
    for i in range(20):
        assert sum(run[i].created for run in runs) == 1
        assert len({run[i].article_id for run in runs}) == 1
    assert len(store.list_articles(job_id)) == 20


def test_admin_is_created_once_and_passwords_are_checked(store: Store) -> None:
    generated = store.ensure_admin(None)
    assert generated and store.ensure_admin("other") is None
    assert store.verify_credentials("admin", generated).role == "admin"
    with pytest.raises(AuthenticationError):
        store.verify_credentials("admin", "wrong")
    with pytest.raises(AuthenticationError):
        store.verify_credentials("nobody", generated)


def test_every_failed_login_spends_one_argon2_operation_of_the_same_cost(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timing is not measured here (machine speed): what makes it the same is measured instead.
    Whether the name exists, is disabled, or the password is wrong, a login does exactly one
    argon2 operation with the stored hashes' parameters, so it takes a real check's time."""
    store.create_user("ann", "ann-password-1")
    store.create_user("off", "off-password-1")
    store.set_user_active("off", False)
    real = store_module._hasher
    stored = extract_parameters(store.get_user("ann").password_hash)
    operations: list[tuple[str, object]] = []

    class Recording:
        def hash(self, password: str) -> str:
            made = real.hash(password)
            operations.append(("hash", extract_parameters(made)))
            return made

        def verify(self, password_hash: str, password: str) -> bool:
            operations.append(("verify", extract_parameters(password_hash)))
            return real.verify(password_hash, password)

    monkeypatch.setattr(store_module, "_hasher", Recording())
    for username, password in [
        ("ann", "wrong-password-1"),  # exists, wrong password
        ("nobody", "wrong-password-1"),  # no such user
        ("off", "off-password-1"),  # disabled
        ("ann", "short"),  # a password no account can have
    ]:
        operations.clear()
        with pytest.raises(AuthenticationError, match=r"^invalid username or password$"):
            store.verify_credentials(username, password)
        assert len(operations) == 1 and operations[0][1] == stored, (username, operations)


def test_a_record_with_an_unknown_project_is_rejected_naming_the_problem(store: Store) -> None:
    project_id, job_id = _job(store, 1)
    with pytest.raises(InvalidRecordError, match=r"article: not stored"):
        store.save_article(_article(project_id + 99, job_id, 0, "generated"))
    assert store.list_articles(job_id) == []


def test_a_project_name_is_created_once(store: Store) -> None:
    fields = {"name": "cnc", "main_keyword": "cnc machining", "entities": ["lathe"]}
    created = store.create_project(fields)
    with pytest.raises(ConflictError, match="'cnc' already exists"):
        store.create_project(fields)
    assert store.get_project(name="cnc").id == created.id == store.get_project(created.id).id
    assert [p.name for p in store.list_projects()] == ["cnc"]
    with pytest.raises(NotFoundError, match="project 'nope' does not exist"):
        store.get_project(name="nope")


def test_project_names_are_unique_per_owner(store: Store) -> None:
    mine = store.create_project({"owner": "ann", "name": "cnc", "main_keyword": "k"})
    theirs = store.create_project({"owner": "bob", "name": "cnc", "main_keyword": "k"})
    assert mine.id != theirs.id
    again = store.ensure_project({"owner": "bob", "name": "cnc", "main_keyword": "x"})
    assert again.id == theirs.id
    assert store.get_project(name="cnc", owner="ann").id == mine.id
    assert [p.owner for p in store.list_projects("bob")] == ["bob"]
    assert len(store.list_projects()) == 2


def test_users_are_created_disabled_and_given_new_passwords(store: Store) -> None:
    store.ensure_admin("admin-password")
    store.create_user("ann", "first-password")
    with pytest.raises(ConflictError, match="'ann' already exists"):
        store.create_user("ann", "other-password")
    with pytest.raises(InvalidRecordError, match=r"^username: "):
        store.create_user("../etc", "first-password")
    with pytest.raises(InvalidRecordError, match=r"^password: must be 8 to 1024") as short:
        store.create_user("bea", "short")
    assert "short" not in str(short.value).replace("8 to 1024 characters", "")
    with pytest.raises(InvalidRecordError, match=r"^role: "):
        store.create_user("bea", "long-enough", role="root")

    assert store.get_user("ann").token_version == 1
    store.set_password("ann", "second-password")
    assert store.get_user("ann").token_version == 2  # tokens issued before stop working
    with pytest.raises(AuthenticationError):
        store.verify_credentials("ann", "first-password")
    assert store.verify_credentials("ann", "second-password").username == "ann"

    store.set_user_active("ann", False)
    with pytest.raises(AuthenticationError):
        store.verify_credentials("ann", "second-password")
    assert [(u.username, u.active) for u in store.list_users()] == [
        ("admin", True),
        ("ann", False),
    ]
    with pytest.raises(StateError, match="last active admin"):
        store.set_user_active("admin", False)
    with pytest.raises(NotFoundError, match="'zed' does not exist"):
        store.set_password("zed", "whatever-password")


def test_a_stored_secret_is_generated_once_even_when_asked_concurrently(store: Store) -> None:
    with ThreadPoolExecutor(8) as pool:
        values = set(pool.map(lambda _: store.stored_secret("token-signing"), range(16)))
    assert len(values) == 1
    assert len(values.pop()) >= 48


def test_a_revoked_token_is_kept_until_it_expires_then_pruned(store: Store) -> None:
    store.create_user("ann", "ann-password-1")
    now = datetime.now(UTC)
    store.revoke_token("old-token", "ann", now - timedelta(seconds=1))  # expired already
    assert store.token_holder("ann", "old-token")[1]
    store.revoke_token("live-token", "ann", now + timedelta(hours=1))
    store.revoke_token("live-token", "ann", now + timedelta(hours=1))  # twice: no error
    user, revoked = store.token_holder("ann", "live-token")
    assert user.username == "ann" and revoked
    assert not store.token_holder("ann", "another-token")[1]
    assert not store.token_holder("ann", "old-token")[1]  # pruned: it cannot be used anyway
    with pytest.raises(InvalidRecordError, match="token_id: 1-64 characters"):
        store.revoke_token("x" * 65, "ann", now)
    with pytest.raises(NotFoundError):
        store.token_holder("nobody", "live-token")


def test_project_titles_come_from_the_other_jobs(store: Store) -> None:
    project_id, first = _job(store, 2)
    store.record_titles(first, "tier1", ["A", "B"], 1, 10, 20, shortfall=0)
    second = store.create_job(project_id, {"tiers": []}, 5, 2, "admin").id
    store.record_titles(second, "tier1", ["C"], 1, 10, 20, shortfall=1)
    assert store.project_titles(project_id, exclude_job_id=second) == ["A", "B"]
    assert store.project_titles(project_id) == ["A", "B", "C"]
    assert store.job_stats([first, second]).title_shortfall == 1


def test_sites_are_created_once_and_keep_a_template_until_given_another(store: Store) -> None:
    store.ensure_sites([("a.net", "magazine"), ("b.net", "")], "ann")
    sites = store.ensure_sites([("a.net", ""), ("c.net", "")], "ann")
    assert [(s.hostname, s.template) for s in sites] == [("a.net", "magazine"), ("c.net", "")]
    store.ensure_sites([("a.net", "plain")], "ann")
    assert [(s.hostname, s.template) for s in store.list_sites()] == [
        ("a.net", "plain"),
        ("b.net", ""),
        ("c.net", ""),
    ]


def test_a_site_belongs_to_its_first_user_and_another_changes_nothing(store: Store) -> None:
    store.create_user("ann", "ann-password-1")
    store.ensure_sites([("a.net", "magazine")], "ann")
    with pytest.raises(ConflictError, match=r"site a\.net belongs to another user"):
        store.ensure_sites([("new.net", ""), ("a.net", "evil")], "bob")
    assert [(s.hostname, s.template, s.owner) for s in store.list_sites()] == [
        ("a.net", "magazine", "ann")  # bob's new.net was not written either
    ]
    store.ensure_sites([("a.net", "plain")], "root", any_owner=True)  # an admin may use it
    assert [(s.template, s.owner) for s in store.list_sites("ann", ["a.net"])] == [("plain", "ann")]
    assert store.list_sites("bob") == []
    with pytest.raises(NotFoundError, match="user 'bob' does not exist"):
        store.set_site_owner("a.net", "bob")
    with pytest.raises(NotFoundError, match=r"site 'b\.net' does not exist"):
        store.set_site_owner("b.net", "ann")
    store.create_user("bob", "bob-password-1")
    assert store.set_site_owner("a.net", "bob").owner == "bob"
    store.ensure_sites([("a.net", "evil")], "bob")  # now his
    with pytest.raises(ConflictError):
        store.ensure_sites([("a.net", "")], "ann")


def test_a_url_belongs_to_one_article_and_a_conflict_changes_nothing(store: Store) -> None:
    project_id, job_id = _job(store, 3)
    ids = [store.save_article(_article(project_id, job_id, i, "generated"))[0].id for i in range(3)]
    store.set_urls(job_id, {ids[0]: "https://a.net/x.html"})
    with pytest.raises(ConflictError):
        store.set_urls(job_id, {ids[1]: "https://a.net/y.html", ids[2]: "https://a.net/x.html"})
    assert [a.url for a in store.list_articles(job_id)] == ["https://a.net/x.html", "", ""]
    other = store.create_job(project_id, {"tiers": []}, 5, 1, "admin").id
    assert store.taken_urls(["a.net"], exclude_job_id=other) == []  # site of _article is ""
    assert store.taken_urls([""], exclude_job_id=other) == ["https://a.net/x.html"]


def test_pages_are_recorded_together_or_not_at_all(store: Store) -> None:
    project_id, job_id = _job(store, 2)
    ids = [store.save_article(_article(project_id, job_id, i, "generated"))[0].id for i in range(2)]
    with pytest.raises(NotFoundError, match=f"article 424242 of job {job_id} does not exist"):
        store.set_publications(job_id, {ids[0]: ("a.html", "<p>a</p>"), 424242: ("x.html", "x")})
    assert [a.html for a in store.list_articles(job_id)] == ["", ""]
    assert store.set_publications(job_id, {i: (f"{i}.html", f"<p>{i}</p>") for i in ids}) == 2
    assert [a.output_path for a in store.list_articles(job_id)] == [f"{i}.html" for i in ids]


def _claim(store: Store, owner: str = "orch-a") -> int:
    """Claim the one queued (or expired) job for `owner`; its new lease epoch."""
    [(job, _previous)] = store.claim_jobs(owner, 30.0, 0, 10)
    return job.lease_epoch


def test_every_claim_raises_the_epoch_and_a_stale_epoch_writes_nothing(store: Store) -> None:
    project_id, job_id = _job(store, 3)
    first = _claim(store, "orch-a")
    store.renew_leases("orch-a", {job_id: first}, 0.0)  # its lease runs out at once
    second = _claim(store, "orch-b")  # taken over, as after a pause past the lease
    assert second == first + 1
    stale = [
        lambda: store.save_article(_article(project_id, job_id, 0, "generated"), False, first),
        lambda: store.record_titles(job_id, "tier1", ["A"], 1, 1, 1, lease_epoch=first),
        lambda: store.append_events(job_id, [(1, b"x")], first),
        lambda: store.set_job_files(job_id, {"index.html": b"x"}, first),
        lambda: store.finish_job(job_id, "completed", "", first),
    ]
    for write in stale:
        with pytest.raises(StaleLeaseError, match=f"epoch {first} is stale"):
            write()
    [result] = store.save_articles([ArticleSave(_article(project_id, job_id, 1, "generated"),
                                                lease_epoch=first)])  # fmt: skip
    assert result.lease_lost and not result.article_id
    assert store.list_articles(job_id) == [] and store.get_job(job_id).titles == {}
    assert store.renew_leases("orch-a", {job_id: first}, 30.0) == ([], {})
    assert store.check_lease(job_id, first) == (False, second)
    # The holder's writes go through.
    store.save_article(_article(project_id, job_id, 0, "generated"), False, second)
    assert store.renew_leases("orch-b", {job_id: second}, 30.0)[0] == [job_id]
    assert store.finish_job(job_id, "completed", "", second).status == "completed"


def test_a_publication_of_an_ended_job_takes_a_new_epoch(store: Store) -> None:
    _project_id, job_id = _job(store, 1)
    with pytest.raises(StateError, match="queued"):
        store.begin_publication(job_id)
    epoch = _claim(store)
    store.finish_job(job_id, "completed", "", epoch)
    publishing = store.begin_publication(job_id).lease_epoch
    assert publishing == epoch + 1
    assert store.set_job_files(job_id, {"index.html": b"<p>1</p>"}, publishing) == 1
    newer = store.begin_publication(job_id).lease_epoch  # a second publish, elsewhere
    with pytest.raises(StaleLeaseError):
        store.set_job_files(job_id, {"index.html": b"<p>old</p>"}, publishing)
    store.set_job_files(job_id, {"index.html": b"<p>2</p>", "s/index.html": b"s"}, newer)
    assert [(f.path, f.content) for f in store.list_job_files(job_id)] == [
        ("index.html", b"<p>2</p>"),
        ("s/index.html", b"s"),
    ]
    with pytest.raises(InvalidRecordError, match="not a path inside the job"):
        store.set_job_files(job_id, {"../x": b""}, newer)


def test_a_shared_rate_bucket_lets_out_its_size_then_its_refill(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]  # the database's clock, standing still unless the test moves it
    monkeypatch.setattr(store_module.repository, "database_seconds", lambda _session: now[0])
    # 60 a minute: a full bucket of 60, then one a second.
    waits = [store.reserve_rate("m rpm", 60.0, 1.0, "gen-a")[0] for _ in range(60)]
    assert waits == [0.0] * 60
    wait, holders = store.reserve_rate("m rpm", 60.0, 1.0, "gen-b")
    assert wait == pytest.approx(1.0) and holders == 2
    assert store.reserve_rate("m rpm", 60.0, 1.0)[0] == pytest.approx(2.0)  # reserved ahead
    now[0] += 30.0  # half a minute refills 30: the 2 owed, then 28 at once
    assert [store.reserve_rate("m rpm", 60.0, 1.0)[0] for _ in range(28)] == [0.0] * 28
    assert store.reserve_rate("m rpm", 60.0, 1.0)[0] == pytest.approx(1.0)
    assert store.reserve_rate("other rpm", 60.0, 1.0)[0] == 0.0  # buckets are apart
    with pytest.raises(InvalidRecordError, match="more than the bucket holds"):
        store.reserve_rate("m tpm", 100.0, 101.0)


def _new_job(requested: int, name: str = "p") -> NewJobRecord:
    project = {"name": name, "main_keyword": "k", "entities": [], "related_searches": [],
               "money_site_url": ""}  # fmt: skip
    return NewJobRecord(spec={"tiers": []}, max_workers=5, requested=requested, project=project)


def test_a_submission_past_a_quota_is_refused_whole_and_writes_nothing(store: Store) -> None:
    store.ensure_admin("admin-password")
    store.create_user("ann", "ann-password", "user")
    store.set_quota("", QuotaLimits(max_active_articles=100, max_queued_jobs=3))
    store.submit_jobs("ann", [("ann.net", "")], [_new_job(60)])
    with pytest.raises(QuotaExceededError, match=r"past your quota of 100 \(you have 60\)"):
        store.submit_jobs("ann", [("new.net", "")], [_new_job(30, "q"), _new_job(30, "r")])
    assert [s.hostname for s in store.list_sites()] == ["ann.net"]  # nothing of it written
    assert [p.name for p in store.list_projects("ann")] == ["p"]
    store.submit_jobs("ann", [], [_new_job(20), _new_job(20)])  # the quota exactly: fine
    with pytest.raises(QuotaExceededError, match="jobs would make 4 queued, past your quota of 3"):
        store.set_quota("ann", QuotaLimits(max_active_articles=0, max_queued_jobs=3))
        store.submit_jobs("ann", [], [_new_job(1)])
    limits, own, used = store.quota("ann")
    assert (limits, own, used) == (QuotaLimits(0, 3), True, (100, 3))
    assert store.set_quota("ann", None) == QuotaLimits(100, 3)  # back to the default
    # A retried submission (the answer was lost) returns the jobs it made, once.
    store.set_quota("", QuotaLimits(0, 0))
    first = store.submit_jobs("ann", [], [_new_job(1), _new_job(1)], request_id="r1")
    again = store.submit_jobs("ann", [], [_new_job(1), _new_job(1)], request_id="r1")
    assert [j.id for j in again] == [j.id for j in first]


def test_resuming_a_job_past_the_quota_is_refused_and_leaves_it_as_it_was(store: Store) -> None:
    store.ensure_admin("admin-password")
    store.create_user("ann", "ann-password", "user")
    store.set_quota("ann", QuotaLimits(max_active_articles=100, max_queued_jobs=0))
    [first] = store.submit_jobs("ann", [], [_new_job(60)])
    store.finish_job(first.id, "failed", "the key was rejected")
    store.submit_jobs("ann", [], [_new_job(50, "q")])
    with pytest.raises(QuotaExceededError, match=r"past your quota of 100 \(you have 50\)"):
        store.reopen_job(first.id)
    assert store.get_job(first.id).status == "failed"
    store.set_quota("ann", QuotaLimits(max_active_articles=110, max_queued_jobs=0))
    assert store.reopen_job(first.id).status == "queued"


def test_one_users_submissions_at_once_cannot_pass_the_quota_together(store: Store) -> None:
    store.ensure_admin("admin-password")
    store.create_user("ann", "ann-password", "user")
    store.set_quota("ann", QuotaLimits(max_active_articles=0, max_queued_jobs=5))

    def submit(n: int) -> bool:
        try:
            store.submit_jobs("ann", [], [_new_job(1, f"p{n}")])
            return True
        except QuotaExceededError:
            return False

    with ThreadPoolExecutor(max_workers=8) as pool:
        accepted = sum(pool.map(submit, range(12)))
    assert accepted == 5 and store.quota("ann")[2] == (5, 5)
