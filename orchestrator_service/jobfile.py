"""The job file: its schema, and validation errors that name the field and the problem."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_TIERS = 10
MAX_ARTICLES_PER_TIER = 10_000
MAX_JOB_FILE_BYTES = 1024 * 1024
_TIER_NAME = re.compile(r"^tier([1-9][0-9]?)$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$"
)

Text = Annotated[str, Field(min_length=1, max_length=500)]


class JobFileError(ValueError):
    """A job file that cannot run; the message names each field and its problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class ProjectSpec(_Strict):
    """A project described inline: created once, found again by name."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    main_keyword: Text
    entities: Annotated[list[Text], Field(max_length=100)] = []
    related_searches: Annotated[list[Text], Field(max_length=100)] = []
    money_site_url: Annotated[str, Field(max_length=2000)] = ""

    @field_validator("money_site_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^\s/$.?#][^\s]*$", value):
            raise ValueError("must be an http:// or https:// URL")
        return value


class TierSpec(_Strict):
    """How many articles a tier has and the shape each must take."""

    count: Annotated[int, Field(ge=1, le=MAX_ARTICLES_PER_TIER)]
    min_word_count: Annotated[int, Field(ge=50, le=20_000)]
    max_word_count: Annotated[int, Field(ge=50, le=20_000)]
    min_h2_tags: Annotated[int, Field(ge=1, le=50)] = 3
    max_h2_tags: Annotated[int, Field(ge=1, le=50)] = 5
    min_h3_tags: Annotated[int, Field(ge=0, le=200)] = 3
    max_h3_tags: Annotated[int, Field(ge=0, le=200)] = 8

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Self:
        for low, high in [
            ("min_word_count", "max_word_count"),
            ("min_h2_tags", "max_h2_tags"),
            ("min_h3_tags", "max_h3_tags"),
        ]:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"{low} ({getattr(self, low)}) is above {high} ({getattr(self, high)})"
                )
        return self


class ModelsSpec(_Strict):
    """The model per stage; a missing one uses the generator's DEFAULT_MODEL."""

    title: Annotated[str, Field(max_length=200)] = ""
    outline: Annotated[str, Field(max_length=200)] = ""
    content: Annotated[str, Field(max_length=200)] = ""


class JobSpec(_Strict):
    """One job: a project, its tiers, and how to run them."""

    project: ProjectSpec | None = None
    project_id: Annotated[int, Field(ge=1)] | None = None
    tiers: dict[str, TierSpec]
    models: ModelsSpec = ModelsSpec()
    deployment_targets: Annotated[list[str], Field(max_length=1000)] = []
    max_workers: Annotated[int, Field(ge=1, le=256)] | None = None
    continue_on_error: bool = True

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, tiers: dict[str, TierSpec]) -> dict[str, TierSpec]:
        if not tiers:
            raise ValueError("name at least one tier")
        if len(tiers) > MAX_TIERS:
            raise ValueError(f"at most {MAX_TIERS} tiers, got {len(tiers)}")
        for name in tiers:
            if not _TIER_NAME.match(name):
                raise ValueError(f"tier names are tier1, tier2, …; got {name!r}")
        return tiers

    @field_validator("deployment_targets")
    @classmethod
    def _hostnames(cls, targets: list[str]) -> list[str]:
        for i, host in enumerate(targets):
            if not _HOSTNAME.match(host.strip().lower()):
                raise ValueError(f"[{i}] {host[:80]!r} is not a valid hostname")
        return [host.strip().lower() for host in targets]

    @model_validator(mode="after")
    def _one_project(self) -> Self:
        if (self.project is None) == (self.project_id is None):
            raise ValueError("give either project (inline) or project_id, not both or neither")
        return self

    def ordered_tiers(self) -> list[tuple[str, TierSpec]]:
        """Tiers in link order: tier1 first."""
        return sorted(self.tiers.items(), key=lambda item: int(item[0][4:]))

    def requested_articles(self) -> int:
        """Articles over all tiers."""
        return sum(tier.count for tier in self.tiers.values())


class JobFile(_Strict):
    """A job file: one or more jobs, run in order."""

    jobs: Annotated[list[JobSpec], Field(min_length=1, max_length=100)]


def _location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "model-")):  # pydantic's validator names
            path += f".{part}" if path else str(part)
    return path or "(file)"


def parse_job_file(text: str) -> JobFile:
    """The validated job file; JobFileError lists every problem as `field: problem`."""
    if len(text.encode()) > MAX_JOB_FILE_BYTES:
        raise JobFileError(f"(file): larger than {MAX_JOB_FILE_BYTES // 1024} KiB")
    if not text.strip():
        raise JobFileError("(file): the job file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise JobFileError(
            f"(file): not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    try:
        return JobFile.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{_location(err['loc'])}: {message}")
        raise JobFileError("invalid job file:\n  " + "\n  ".join(problems)) from e
