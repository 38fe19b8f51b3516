import pytest

from recaption.config import ConfigError, PipelineConfig, load_config, redacted

CONTRACT_KEYS = {
    "input.path": "/in",
    "output.path": "/out",
    "captioner.backend": "analyzer",
    "captioner.model": "m",
    "captioner.base_url": "http://127.0.0.1:9/v1",
    "limits.rpm": 600,
    "limits.tpm": 90000,
    "limits.concurrency": 3,
    "ray.address": "auto",
    "ray.workers": 4,
}


def test_default_pipeline_file_is_the_defaults():
    assert load_config("pipelines/default.yaml") == PipelineConfig()


@pytest.mark.parametrize(("key", "value"), CONTRACT_KEYS.items())
def test_every_contract_key_is_reachable_with_set(key, value):
    cfg = load_config("pipelines/default.yaml", [f"{key}={value}"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value


def test_set_parses_null_and_numbers():
    cfg = load_config(None, ["limits.rpm=null", "ray.workers=3", "output.store_images=false"])
    assert cfg.limits.rpm is None and cfg.ray.workers == 3 and cfg.output.store_images is False


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        ("missing.yaml", [], "pipeline file not found"),
        (None, ["ray.wrokers=2"], "unknown config key 'ray.wrokers'"),
        (None, ["ray.workers=zero"], "config key 'ray.workers'"),
        (None, ["captioner.backend=gpt-9"], "config key 'captioner.backend'"),
        (None, ["ray.workers"], "--set expects key.path=value"),
        ("pipelines/azure.yaml", ["captioner.endpoints.3.rpm=5"], "not an index"),
        (None, ["limits.rpm=0"], "config key 'limits.rpm'"),
    ],
)
def test_bad_config_is_one_clear_line(path, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_redaction_removes_url_credentials():
    cfg = load_config(None, ["captioner.base_url=https://user:s3cret@host.example/v1"])
    text = str(redacted(cfg))
    assert "s3cret" not in text and "host.example" in text


def test_set_reaches_into_the_endpoint_list():
    cfg = load_config(
        "pipelines/azure.yaml",
        ["captioner.endpoints.0.rpm=5", "captioner.endpoints.0.base_url=https://x.example"],
    )
    (endpoint,) = cfg.captioner.endpoints
    assert endpoint.rpm == 5 and endpoint.base_url == "https://x.example"
    assert endpoint.api == "azure" and endpoint.tpm == 1_000_000
    # it names a variable, not a secret: the manifest keeps it
    assert redacted(cfg)["captioner"]["endpoints"][0]["api_key_env"] == "AZURE_OPENAI_API_KEY"


@pytest.mark.parametrize("name", ["default", "openai", "azure", "vllm"])
def test_every_bundled_pipeline_loads(name):
    load_config(f"pipelines/{name}.yaml")


def test_a_date_like_value_stays_a_string(tmp_path):
    # Azure API versions look like dates; YAML would make them datetime.date objects
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("captioner:\n  api_version: 2024-10-21\n")
    assert load_config(pipeline).captioner.api_version == "2024-10-21"
    cfg = load_config(None, ["captioner.api_version=2025-04-01-preview", "ray.workers=3"])
    assert cfg.captioner.api_version == "2025-04-01-preview" and cfg.ray.workers == 3
