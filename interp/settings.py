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


class SearchSettings(BaseSettings):
    """Label search (issue 10). Kept apart from Settings so its fields are only appended."""
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # where the usearch nearest-neighbour file of each catalog lives (derived data: rebuilt from Postgres)
    search_index_dir: str = "~/.cache/interp/search"


@lru_cache
def get_search_settings() -> SearchSettings:
    return SearchSettings()
