"""Services run on the event loop their settings name (uvloop unless told otherwise)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from flotilla.common.server import run_service
from flotilla.config import FlotillaSettings


def loop_module(event_loop: str) -> str:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_service(main(), event_loop)  # type: ignore[arg-type]
    return seen[0]


def test_services_run_on_uvloop_by_default_and_on_asyncio_when_told() -> None:
    assert loop_module(FlotillaSettings().event_loop).startswith("uvloop")
    assert loop_module("asyncio").startswith("asyncio")


def test_an_unknown_event_loop_is_rejected_naming_the_choices() -> None:
    with pytest.raises(ValidationError, match="event_loop") as caught:
        FlotillaSettings(event_loop="trio")
    assert "uvloop" in str(caught.value) and "asyncio" in str(caught.value)
