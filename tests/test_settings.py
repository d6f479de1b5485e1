"""Settings: one class, documented in the README from the class itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from claudebox_pool.tasks.settings import Settings, settings_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_is_generated_from_the_class() -> None:
    text = README.read_text()
    found = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", text, re.S)

    assert found is not None, "README lacks the settings markers"
    assert found.group(1) == settings_markdown(), (
        "README settings table is stale: paste the output of `scripts/settings-table`"
    )


def test_every_setting_has_a_description() -> None:
    assert all(field.description for field in Settings.model_fields.values())


def test_settings_come_from_the_environment_with_the_prefix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLAUDEBOX_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("CLAUDEBOX_LOCK_TTL_S", "45")

    settings = Settings()

    assert settings.sessions_root == tmp_path / "state" / "sessions"
    assert settings.lock_ttl_s == 45


def test_secrets_never_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAUDEBOX_ANTHROPIC_API_KEY", "sk-ant-canary-123")

    settings = Settings()

    assert "sk-ant-canary-123" not in repr(settings)
    assert "sk-ant-canary-123" not in settings.model_dump_json()


def test_configure_points_a_used_app_at_the_new_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    from claudebox_pool.tasks.app import app, configure
    from claudebox_pool.tasks.settings import get_settings

    before = app.backend.url
    monkeypatch.setenv("CLAUDEBOX_RESULT_BACKEND", "redis://127.0.0.1:1/9")
    get_settings.cache_clear()
    try:
        configure()
        assert app.backend.url == "redis://127.0.0.1:1/9"
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        configure()
    assert app.backend.url == before
