"""What turns on the offline model cost: nothing, unless a price is configured.

The Claude CLI prices every turn from the model it asked for and the tokens reported, at
Claude's list prices, even when the offline model answered. Those invented costs would spend real
budgets, so by default the runtime reports them as zero (the tokens are still counted).
``CORRAL_OFFLINE_MODEL_PRICING=list`` keeps the CLI's list-price costs instead, for exercising
budgets and quotas without the real model (the test suite does).
"""

from __future__ import annotations

from corral.libs.config import Settings

ANNOUNCEMENT = (
    "Its turns cost nothing (CORRAL_OFFLINE_MODEL_PRICING=list charges Claude's list prices)"
)


def in_use(settings: Settings) -> bool:
    """Whether the runtime starts the offline model: no API key and no other endpoint."""
    return not settings.anthropic_api_key.get_secret_value() and not settings.anthropic_base_url


def charged(settings: Settings) -> bool:
    """Whether turns report what the CLI says they cost."""
    return not in_use(settings) or settings.offline_model_pricing == "list"
