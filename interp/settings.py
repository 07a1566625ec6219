"""The one settings object: environment variables and `.env`, with defaults that run on this machine."""
from functools import lru_cache

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = "postgresql://127.0.0.1:5432/test"
    celery_broker_url: str = "redis://127.0.0.1:6379/0"

    # OpenAI-compatible endpoint. The key is a SecretStr so it never prints in reprs or logs.
    openai_base_url: str | None = None
    openai_api_key: SecretStr = Field(default=SecretStr(""))
    llm_concurrency: int = 8
    llm_timeout_s: float = 60.0
    llm_max_retries: int = 5

    local_llm_host: str = "127.0.0.1"
    local_llm_port: int = 8088

    device: str = "auto"


@lru_cache
def get_settings() -> Settings:
    return Settings()


class APISettings(BaseSettings):
    """`interp serve`: the HTTP API's tokens and pool. Secrets are SecretStr so a repr or a log never shows them;
    an empty token counts as unset (for writes: disabled, never open)."""
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = "postgresql://127.0.0.1:5432/test"
    interp_api_token: SecretStr | None = None          # bearer token for writes (POST /jobs, cancel)
    interp_api_read_token: SecretStr | None = None     # when set, reads need it too (or the write token)
    api_pool_min: int = 1
    api_pool_max: int = 8

    def write_token(self) -> str | None:
        return (self.interp_api_token.get_secret_value() if self.interp_api_token else "") or None

    def read_token(self) -> str | None:
        return (self.interp_api_read_token.get_secret_value() if self.interp_api_read_token else "") or None
