"""One Settings object: defaults < facsynth.toml < FACSYNTH_* env vars < CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from platformdirs import user_cache_dir
from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tools.coverage import ActivityRule, GradedRule, JudgeSettings

if TYPE_CHECKING:  # tools.probe imports torch; settings must stay quick to import
    from tools.probe import ProbeSettings


class Settings(BaseSettings):
    """Every knob of a facsynth run in one validated object (saved with each run): the
    model and SAE, the probe, the coverage rule, judge and graded rule, and the LLM
    endpoint. Sources, lowest first: field defaults, `facsynth.toml`, `FACSYNTH_*` env vars
    (nested with `__`), then keyword arguments (the CLI's flags)."""

    model_config = SettingsConfigDict(
        env_prefix="FACSYNTH_", env_nested_delimiter="__", toml_file="facsynth.toml",
        extra="forbid", allow_inf_nan=False,
    )

    home: Path = Field(
        default_factory=lambda: Path(user_cache_dir("facsynth")),
        description="cache for converted models and activations (env FACSYNTH_HOME)",
    )
    model: str = Field("smollm2-135m", description="profile name, local folder or hub id")
    sae: str | None = Field(None, description="SAE spec; default: the model profile's SAE")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    delta: float = Field(1.0, ge=0, description="threshold=absolute: active when > delta")
    # Calibrated defaults (bench/fac_predicts.py, README "Why these defaults"): a feature is
    # active in a text when its max activation exceeds the anchor's 90th-percentile max.
    threshold: Literal["absolute", "anchor-quantile", "quantile"] = Field(
        "anchor-quantile",
        description="one delta; one delta at an anchor quantile; or a per-feature quantile",
    )
    quantile: float = Field(0.9, ge=0, lt=1, description="the quantile of the threshold")
    pooling: Literal["max", "count"] = Field("max", description="max over tokens, or count")
    min_tokens: int = Field(2, ge=1, description="pooling=count: tokens above threshold")
    max_tokens: int = Field(256, ge=2, description="longer texts are truncated")
    batch_tokens: int = Field(4096, ge=16, description="padded tokens per forward batch")
    chat_template: bool = Field(False, description="wrap texts as a user turn")
    top_spans: int = Field(3, ge=0, description="activating spans kept per missing feature")
    span_window: int = Field(12, ge=1, description="tokens per span, ending at the peak")
    judge: JudgeSettings = JudgeSettings()
    # [graded] in facsynth.toml, FACSYNTH_GRADED__MIN_ROWS / __RATE_FRAC in the env
    graded: GradedRule = GradedRule()
    llm_base_url: str | None = Field(None, description="OpenAI-compatible endpoint (vLLM, ...)")
    llm_model: str | None = Field(None, description="model name at that endpoint")
    llm_api_key: SecretStr | None = Field(None, description="env FACSYNTH_LLM_API_KEY")
    mcp_token: SecretStr | None = Field(
        None, description="bearer token HTTP MCP clients must send (env FACSYNTH_MCP_TOKEN)")
    llm_timeout: float = Field(120.0, gt=0, description="seconds per request")
    llm_retries: int = Field(3, ge=0, description="retries on timeouts, 429 and 5xx")
    llm_server: Literal["openai", "vllm"] = Field(
        "openai", description="the endpoint's kind: vllm enables JSON-schema-constrained replies"
    )
    generator: Literal["auto", "endpoint", "vllm", "local"] = Field(
        "auto",
        description="LLM for interpret/judge/generate: a configured endpoint; a managed vLLM "
        "server on the embedded model; or in-process transformers. auto: endpoint if "
        "llm_base_url is set, else vllm if installed, else local",
    )
    vllm_startup_timeout: float = Field(900.0, gt=0, description="seconds to wait for vLLM")
    max_new_tokens: int = Field(96, ge=8, description="generated tokens per reply")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def activity_rule(self) -> ActivityRule:
        return ActivityRule(
            threshold=self.threshold, delta=self.delta, quantile=self.quantile,
            pooling=self.pooling, min_tokens=self.min_tokens,
        )

    def probe_settings(self) -> ProbeSettings:
        from tools.probe import ProbeSettings

        return ProbeSettings(
            max_tokens=self.max_tokens, batch_tokens=self.batch_tokens,
            chat_template=self.chat_template,
        )
