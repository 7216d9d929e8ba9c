"""What model calls cost: USD per million prompt and completion tokens, per model.

Defaults cover common OpenAI models (list prices when this was written); LLM_PRICES_FILE, a JSON
object {"model": {"input": USD, "output": USD}} per million tokens, adds models or overrides
them. A model is found by its exact name, then without a provider prefix ("openai/gpt-4o" as
OpenRouter names it), then by its dated variant ("gpt-4o-2024-08-06" → "gpt-4o"). A model with
no price costs 0 and is said to be unpriced."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call's tokens."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
}


class PricesFileError(ValueError):
    """LLM_PRICES_FILE cannot be used; the message names the file and the problem."""


class _FilePrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class PriceTable:
    """Prices by model name; read-only after construction, so safe to share between threads."""

    def __init__(self, prices: dict[str, Price] | None = None) -> None:
        self._prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def with_file(cls, path: str | None) -> PriceTable:
        """The defaults, overridden and extended by the JSON file at `path` (if given)."""
        table = cls()
        if not path:
            return table
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PricesFileError(f"LLM_PRICES_FILE: cannot read {path}: {e}") from e
        if not isinstance(data, dict):
            raise PricesFileError(f'LLM_PRICES_FILE: {path}: expected {{"model": {{...}}}}')
        for model, entry in data.items():
            try:
                price = _FilePrice.model_validate(entry)
            except ValidationError as e:
                problem = e.errors()[0]
                where = ".".join(str(p) for p in problem["loc"]) or "price"
                raise PricesFileError(
                    f"LLM_PRICES_FILE: {path}: {model}.{where}: {problem['msg']} "
                    '(expected {"input": USD, "output": USD} per million tokens)'
                ) from None
            table._prices[model] = Price(price.input, price.output)
        return table

    def price(self, model: str) -> Price | None:
        """The model's price, or None when it has none."""
        for name in (model, model.rsplit("/", 1)[-1]):
            if name in self._prices:
                return self._prices[name]
        base = model.rsplit("/", 1)[-1]
        dated = [name for name in self._prices if base.startswith(name + "-")]
        return self._prices[max(dated, key=len)] if dated else None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one call; 0 for a model without a price."""
        price = self.price(model)
        return price.cost(prompt_tokens, completion_tokens) if price else 0.0
