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

    # labelling jobs (issue 14)
    redis_url: str = "redis://127.0.0.1:6379/0"   # the shared rate limits and the fleet's 429 cool-down
    llm_rpm: int = 0                    # requests per minute per endpoint, over every worker; 0: no limit
    llm_tpm: int = 0                    # tokens per minute per endpoint (prompt estimate + max_tokens); 0: no limit
    llm_cooldown_s: float = 5.0         # how long a 429 without Retry-After pauses the whole fleet's calls
    job_queue: str = "label"
    # features per task, their LLM calls concurrent on one loop: a task's start and its last calls' drain leave the
    # endpoint part idle, a fixed cost that 256-feature chunks paid every 1.5 s at 64 calls of 100 ms
    job_chunk_size: int = 1024
    job_batch: int = 8                  # features loaded, labelled and stored together inside a chunk
    job_window: int = 16                # chunks of one job in the broker or a worker at once
    job_lease_s: float = 60.0           # a chunk's items come back to the queue this long after its worker stops
    job_sweep_s: float = 15.0           # how often every worker looks for expired leases
    job_db_retry_s: float = 120.0       # how long a worker keeps retrying a database that is down
    # must exceed the longest retry countdown, or Redis delivers a waiting task twice; leases cover a lost one
    job_visibility_timeout_s: int = 7200

    # label search: where the usearch nearest-neighbour file of each catalog lives (derived data, rebuilt from
    # Postgres at any time)
    search_index_dir: str = "~/.cache/interp/search"

    # harvest shards as Celery tasks: `interp worker --queues harvest` consumes the queue; shard tasks leave their
    # partial states (a folder per job) under a root every harvest worker reaches, e.g. a shared mount
    harvest_queue: str = "harvest"
    harvest_state_root: str = "runs/harvest-states"

    # `interp serve`: bearer tokens (an empty one counts as unset: writes disabled, never open) and the pool
    interp_api_token: SecretStr | None = None          # writes (POST /jobs, cancel)
    interp_api_read_token: SecretStr | None = None     # when set, reads need it too (or the write token)
    api_pool_min: int = 1
    api_pool_max: int = 8

    def write_token(self) -> str | None:
        return (self.interp_api_token.get_secret_value() if self.interp_api_token else "") or None

    def read_token(self) -> str | None:
        return (self.interp_api_read_token.get_secret_value() if self.interp_api_read_token else "") or None


@lru_cache
def get_settings() -> Settings:
    return Settings()
