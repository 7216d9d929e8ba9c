"""TitleWriter: a tier's titles in batches of up to 25 per call, calls in parallel, deduplicated."""

from __future__ import annotations

import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from generator_service import prompts
from generator_service.domain import ProjectInfo
from generator_service.llm import Completion, LlmClient

TITLES_PER_CALL = 25
# Rounds after the first that ask only for what is still missing; then the shortfall is reported.
TOP_UP_ROUNDS = 3
TITLES_MAX_TOKENS = 2000
_NUMBERING = re.compile(r"^\s*(?:[-*•]|\d+[.)]|#)\s*")


def normalise_title(title: str) -> str:
    """The comparison key of a title: case, punctuation and spacing do not make it new."""
    text = unicodedata.normalize("NFKC", title).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def clean_title(line: str) -> str:
    """A reply line as a title: no list marker, quotes or surrounding space."""
    return _NUMBERING.sub("", line).strip().strip("\"'\u201c\u201d\u2018\u2019").strip()


@dataclass
class TitlesResult:
    """Titles in order, what is missing, and what they cost."""

    titles: list[str] = field(default_factory=list)
    shortfall: int = 0  # the model ran out of new titles
    error: str = ""  # a call failed after its retries: the missing titles could not be made
    api_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TitleWriter:
    """Asks the model for titles until `count` distinct ones exist or the top-ups run out."""

    def __init__(self, llm: LlmClient) -> None:
        self._llm = llm

    def write(
        self, project: ProjectInfo, count: int, model: str, max_parallel: int, existing: list[str]
    ) -> TitlesResult:
        """`count` titles distinct from each other and from `existing` (after normalisation)."""
        result = TitlesResult()
        seen = {normalise_title(t) for t in existing}
        with ThreadPoolExecutor(
            max_workers=max(1, max_parallel), thread_name_prefix="titles"
        ) as pool:
            for _round in range(1 + TOP_UP_ROUNDS):
                missing = count - len(result.titles)
                if missing <= 0 or result.error:
                    break
                batches = [
                    min(TITLES_PER_CALL, missing - i) for i in range(0, missing, TITLES_PER_CALL)
                ]
                avoid = [*existing, *result.titles]
                futures = [pool.submit(self._ask, project, n, model, avoid) for n in batches]
                for future in futures:  # in submission order, so the result is deterministic
                    try:
                        reply = future.result()
                    except Exception as e:  # retries are spent: the missing titles fail
                        result.error = result.error or f"{type(e).__name__}: {e}"
                        continue
                    result.api_calls += 1
                    result.prompt_tokens += reply.prompt_tokens
                    result.completion_tokens += reply.completion_tokens
                    lines = reply.text.splitlines()
                    if reply.finish_reason == "length":  # cut off: the last line may be half
                        lines = lines[:-1]
                    for line in lines:
                        title = clean_title(line)
                        key = normalise_title(title)
                        if key and key not in seen and len(result.titles) < count:
                            seen.add(key)
                            result.titles.append(title)
        missing = count - len(result.titles)
        # Titles the model could not be asked for (an error) are failures, not a shortfall.
        result.shortfall = 0 if result.error else missing
        return result

    def _ask(self, project: ProjectInfo, n: int, model: str, avoid: list[str]) -> Completion:
        prompt = prompts.titles_prompt(
            project.keyword, project.entities, project.related_searches, n, avoid
        )
        return self._llm.complete(
            model=model,
            system=prompt.system,
            prompt=prompt.user,
            max_tokens=TITLES_MAX_TOKENS,
            temperature=0.9,
        )
