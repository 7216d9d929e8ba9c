"""The job file: its schema, and validation errors that name the field and the problem."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tierwriter.job.v1 import job_pb2

MAX_TIERS = 10
MAX_ARTICLES_PER_TIER = 10_000
MAX_JOB_FILE_BYTES = 1024 * 1024
_TIER_NAME = re.compile(r"^tier([1-9][0-9]?)$")
# A template set is a folder under TEMPLATES_DIR: a plain name, never a path.
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$"
)

Text = Annotated[str, Field(min_length=1, max_length=500)]
Parsed = TypeVar("Parsed", bound=BaseModel)


class JobFileError(ValueError):
    """A job file that cannot run; the message names each field and its problem."""


# Control characters and unpaired surrogates: PostgreSQL refuses NUL, protobuf cannot encode a
# lone surrogate, and neither belongs in a title, a keyword or a hostname.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("*")
    @classmethod
    def _printable(cls, value: Any) -> Any:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and _UNPRINTABLE.search(text):
                raise ValueError("contains a control character or an unpaired surrogate")
        return value


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


class SiteSpec(_Strict):
    """A deployment target: a hostname, and optionally the template set its pages use."""

    hostname: Annotated[str, Field(max_length=253)]
    template: str = ""

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        value = value.lower()
        if not _HOSTNAME.match(value):
            raise ValueError(f"{value[:80]!r} is not a valid hostname")
        return value

    @field_validator("template")
    @classmethod
    def _template_name(cls, value: str) -> str:
        if value and not _TEMPLATE_NAME.match(value):
            raise ValueError(
                "a template set is a folder name under TEMPLATES_DIR: letters, digits, - and _"
            )
        return value


def _site_list(value: Any) -> Any:
    """A hostname alone stands for {"hostname": …}."""
    if isinstance(value, list):
        return [{"hostname": item} if isinstance(item, str) else item for item in value]
    return value


Sites = Annotated[list[SiteSpec], Field(max_length=1000)]


class TierSpec(_Strict):
    """How many articles a tier has and the shape each must take."""

    count: Annotated[int, Field(ge=1, le=MAX_ARTICLES_PER_TIER)]
    min_word_count: Annotated[int, Field(ge=50, le=20_000)]
    max_word_count: Annotated[int, Field(ge=50, le=20_000)]
    min_h2_tags: Annotated[int, Field(ge=1, le=50)] = 3
    max_h2_tags: Annotated[int, Field(ge=1, le=50)] = 5
    min_h3_tags: Annotated[int, Field(ge=0, le=200)] = 3
    max_h3_tags: Annotated[int, Field(ge=0, le=200)] = 8
    # This tier's own sites; None: the job's deployment_targets.
    deployment_targets: Sites | None = None

    @field_validator("deployment_targets", mode="before")
    @classmethod
    def _sites(cls, value: Any) -> Any:
        return _site_list(value)

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
    deployment_targets: Sites = []
    max_workers: Annotated[int, Field(ge=1, le=256)] | None = None
    continue_on_error: bool = True
    # USD the job may spend on model calls (titles included); articles that would pass it are
    # recorded as skipped, and a resume with a higher budget writes them.
    max_cost_usd: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    # Also link each article to the next one of its tier on the same site.
    see_also_links: bool = False
    # "absolute": links are https://{hostname}/{slug}.html, ready to deploy. "relative": links
    # between the exported pages are relative paths, to browse the output folder locally.
    link_style: Literal["absolute", "relative"] = "absolute"

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

    @field_validator("deployment_targets", mode="before")
    @classmethod
    def _sites(cls, value: Any) -> Any:
        return _site_list(value)

    @model_validator(mode="after")
    def _one_project(self) -> Self:
        if (self.project is None) == (self.project_id is None):
            raise ValueError("give either project (inline) or project_id, not both or neither")
        return self

    @model_validator(mode="after")
    def _one_template_per_site(self) -> Self:
        templates: dict[str, str] = {}
        for site in self.all_sites():
            if site.template and templates.setdefault(site.hostname, site.template) != (
                site.template
            ):
                raise ValueError(
                    f"deployment_targets: {site.hostname} is given two templates, "
                    f"{templates[site.hostname]!r} and {site.template!r}"
                )
        return self

    def all_sites(self) -> list[SiteSpec]:
        """Every site the job publishes on: the job's targets, then the tiers' own."""
        sites = list(self.deployment_targets)
        for _name, tier in self.ordered_tiers():
            sites.extend(tier.deployment_targets or [])
        return sites

    def sites_of(self, tier: TierSpec) -> list[str]:
        """The hostnames a tier's articles go to in turn: its own targets, else the job's."""
        targets = tier.deployment_targets if tier.deployment_targets else self.deployment_targets
        return [site.hostname for site in targets]

    def ordered_tiers(self) -> list[tuple[str, TierSpec]]:
        """Tiers in link order: tier1 first."""
        return sorted(self.tiers.items(), key=lambda item: int(item[0][4:]))

    def requested_articles(self) -> int:
        """Articles over all tiers."""
        return sum(tier.count for tier in self.tiers.values())

    def to_proto(self) -> job_pb2.JobSpec:
        """The validated job as the message the services pass around and persistence keeps."""

        def sites(targets: list[SiteSpec] | None) -> list[job_pb2.SiteSpec]:
            return [job_pb2.SiteSpec(**site.model_dump()) for site in targets or []]

        return job_pb2.JobSpec(
            project=job_pb2.ProjectSpec(**self.project.model_dump()) if self.project else None,
            project_id=self.project_id or 0,
            tiers=[
                job_pb2.TierSpec(
                    name=name,
                    **tier.model_dump(exclude={"deployment_targets"}),
                    deployment_targets=sites(tier.deployment_targets),
                )
                for name, tier in self.ordered_tiers()
            ],
            models=job_pb2.ModelsSpec(**self.models.model_dump()),
            deployment_targets=sites(self.deployment_targets),
            max_workers=self.max_workers or 0,
            continue_on_error=self.continue_on_error,
            max_cost_usd=self.max_cost_usd or 0.0,
            see_also_links=self.see_also_links,
            link_style=job_pb2.LinkStyle.Value(f"LINK_STYLE_{self.link_style.upper()}"),
        )

    @classmethod
    def from_proto(cls, spec: job_pb2.JobSpec) -> JobSpec:
        """A stored job again, validated as a job file's would be (0 and empty mean unset)."""

        def sites(targets: Any) -> list[dict[str, str]]:
            return [{"hostname": s.hostname, "template": s.template} for s in targets]

        project = spec.project
        return cls.model_validate(
            {
                "project": {
                    "name": project.name,
                    "main_keyword": project.main_keyword,
                    "entities": list(project.entities),
                    "related_searches": list(project.related_searches),
                    "money_site_url": project.money_site_url,
                }
                if spec.HasField("project")
                else None,
                "project_id": spec.project_id or None,
                "tiers": {
                    tier.name: {
                        **{field: getattr(tier, field) for field in _TIER_SHAPE},
                        "deployment_targets": sites(tier.deployment_targets) or None,
                    }
                    for tier in spec.tiers
                },
                "models": {
                    "title": spec.models.title,
                    "outline": spec.models.outline,
                    "content": spec.models.content,
                },
                "deployment_targets": sites(spec.deployment_targets),
                "max_workers": spec.max_workers or None,
                "continue_on_error": spec.continue_on_error,
                "max_cost_usd": spec.max_cost_usd or None,
                "see_also_links": spec.see_also_links,
                "link_style": "relative"
                if spec.link_style == job_pb2.LINK_STYLE_RELATIVE
                else "absolute",
            }
        )


# A tier's numbers, as the job file and the TierSpec message both name them.
_TIER_SHAPE = (
    "count", "min_word_count", "max_word_count", "min_h2_tags", "max_h2_tags", "min_h3_tags",
    "max_h3_tags",
)  # fmt: skip


class JobFile(_Strict):
    """A job file: one or more jobs, run in order."""

    jobs: Annotated[list[JobSpec], Field(min_length=1, max_length=100)]


# Deeper than any job file needs; Python's own parser would run out of stack near 1,000.
MAX_NESTING = 32
# Digits a number may have: every count and budget fits; a 100,000-digit one would take
# Python's int conversion seconds (it refuses past 4,300 digits, with its own words).
MAX_NUMBER_DIGITS = 30


class _TooLong(str):
    """A JSON number with more digits than MAX_NUMBER_DIGITS, kept as text: every field that
    wants a number refuses it, and the error names the field."""


def _number(text: str) -> int | float | str:
    if len(text) > MAX_NUMBER_DIGITS:
        return _TooLong(text)
    return float(text) if any(c in text for c in ".eE") else int(text)


def _nesting_problem(text: str) -> str:
    """Where `text` nests arrays and objects deeper than MAX_NESTING, or "" (one pass, outside
    strings, before any parser recurses into it)."""
    depth, in_string, escaped = 0, False, False
    line, column = 1, 0
    for char in text:
        column += 1
        if char == "\n":
            line, column = line + 1, 0
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                return f"nested deeper than {MAX_NESTING} levels at line {line} column {column}"
        elif char in "]}":
            depth -= 1
    return ""


def _problems(error: ValidationError) -> str:
    problems = []
    for err in error.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        if isinstance(err.get("input"), _TooLong):
            message = f"a number of {len(err['input']):,} digits; at most {MAX_NUMBER_DIGITS}"
        problems.append(f"{_location(err['loc'])}: {message}")
    return "\n  ".join(problems)


def _location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith(("function-", "model-")):  # pydantic's validator names
            path += f".{part}" if path else str(part)
    return path or "(file)"


def _parse(text: str, model: type[Parsed], what: str) -> Parsed:
    if len(text.encode()) > MAX_JOB_FILE_BYTES:
        raise JobFileError(f"(file): larger than {MAX_JOB_FILE_BYTES // 1024} KiB")
    if not text.strip():
        raise JobFileError(f"(file): the {what} is empty")
    if nesting := _nesting_problem(text):
        raise JobFileError(f"(file): {nesting}")
    try:
        # Numbers past MAX_NUMBER_DIGITS stay text, so the field that gets one names it.
        data = json.loads(text, parse_int=_number, parse_float=_number)
    except json.JSONDecodeError as e:
        raise JobFileError(
            f"(file): not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise JobFileError(f"invalid {what}:\n  " + _problems(e)) from e


def parse_job_file(text: str) -> JobFile:
    """The validated job file; JobFileError lists every problem as `field: problem`."""
    return _parse(text, JobFile, "job file")


def parse_project_file(text: str) -> ProjectSpec:
    """A project file (the job file's `project` object on its own), validated the same way."""
    return _parse(text, ProjectSpec, "project file")
