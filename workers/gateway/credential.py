"""The real model credential, which only the gateway holds and only upstream requests carry."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr

OAUTH_BETA = "oauth-2025-04-20"
"""The Messages API accepts a Claude Code OAuth token only with this beta flag."""


class Credential(BaseModel):
    """An API key (sent as ``x-api-key``) or an OAuth token (``authorization: Bearer``).

    The secret is a ``SecretStr``: reprs, logs and validation errors show ``**********``.
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["api_key", "oauth_token"]
    secret: SecretStr

    @classmethod
    def api_key(cls, value: str | SecretStr) -> Credential:
        return cls(kind="api_key", secret=_secret(value))

    @classmethod
    def oauth_token(cls, value: str | SecretStr) -> Credential:
        return cls(kind="oauth_token", secret=_secret(value))

    def apply(self, headers: dict[str, str]) -> None:
        """Put the credential on an upstream request's lower-cased headers."""
        value = self.secret.get_secret_value()
        if self.kind == "api_key":
            headers["x-api-key"] = value
            return
        headers["authorization"] = f"Bearer {value}"
        betas = [b for b in headers.get("anthropic-beta", "").split(",") if b.strip()]
        if OAUTH_BETA not in betas:
            headers["anthropic-beta"] = ",".join([*betas, OAUTH_BETA])

    def redact(self, text: str) -> str:
        """``text`` with the secret blanked, for anything upstream sends back that gets recorded."""
        value = self.secret.get_secret_value()
        return text.replace(value, "[redacted]") if value else text


def _secret(value: str | SecretStr) -> SecretStr:
    return value if isinstance(value, SecretStr) else SecretStr(value)
