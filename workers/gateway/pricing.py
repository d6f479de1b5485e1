"""What model tokens cost, per model family, in USD per million tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from claudebox_pool.tasks.settings import DEFAULT_MODEL_PRICES, ModelPrice
from claudebox_pool.workers.gateway.usage import Tokens

_PER_TOKEN = 1e-6


@dataclass(frozen=True)
class Price:
    """USD per million tokens; ``cache_write`` is the 5-minute cache's write price."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    def cost_usd(self, tokens: Tokens) -> float:
        return _PER_TOKEN * (
            tokens.input_tokens * self.input
            + tokens.output_tokens * self.output
            + tokens.cache_creation_input_tokens * self.cache_write
            + tokens.cache_read_input_tokens * self.cache_read
        )


def prices_from(table: Mapping[str, ModelPrice]) -> dict[str, Price]:
    """The gateway's prices from the settings' table."""
    return {family: Price(**price.model_dump()) for family, price in table.items()}


DEFAULT_PRICES: Mapping[str, Price] = prices_from(DEFAULT_MODEL_PRICES)

FALLBACK_FAMILY = "sonnet"
"""An unknown model is charged as this family: the mid price, so a typo neither stops a session
nor hides its spend."""


def price_for(model: str | None, prices: Mapping[str, Price]) -> Price:
    """The price of the first family named in ``model`` (``claude-opus-4-5`` → ``opus``)."""
    name = (model or "").lower()
    for family, price in prices.items():
        if family in name:
            return price
    return prices.get(FALLBACK_FAMILY) or DEFAULT_PRICES[FALLBACK_FAMILY]
