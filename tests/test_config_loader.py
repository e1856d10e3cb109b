"""Config merging: YAML sections, `--Service.key` overrides, Common keys, ServiceArgs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_sdk import depends, endpoint, service
from dynamo_sdk.serve.config_loader import (
    ConfigError,
    apply_service_args,
    load_yaml,
    merge_config,
    parse_overrides,
)


@service(resources={"gpu": 1, "cpu": "4"}, workers=1)
class Worker:
    @endpoint()
    async def generate(self, req: str) -> AsyncIterator[str]:
        yield req


@service
class Frontend:
    worker = depends(Worker)

    @endpoint()
    async def generate(self, req: str) -> AsyncIterator[str]:
        yield req


GRAPH = [Frontend, Worker]


# --- parse_overrides ------------------------------------------------------------------------


def test_override_values_are_typed() -> None:
    parsed = parse_overrides(
        [
            "--Worker.n=3",
            "--Worker.temp=0.5",
            "--Worker.flag=TRUE",
            "--Worker.off=false",
            "--Worker.none=null",
            '--Worker.list=[1, "a"]',
            '--Worker.obj={"k": 2}',
            "--Worker.text=hello world",
            "--Worker.neg=-7",
            '--Worker.quoted="[INST]"',
        ]
    )
    assert parsed == {
        "Worker": {
            "n": 3,
            "temp": 0.5,
            "flag": True,
            "off": False,
            "none": None,
            "list": [1, "a"],
            "obj": {"k": 2},
            "text": "hello world",
            "neg": -7,
            "quoted": "[INST]",
        }
    }


def test_dotted_keys_nest() -> None:
    parsed = parse_overrides(
        ["--Worker.ServiceArgs.workers=2", "--Worker.ServiceArgs.resources.gpu=1"]
    )
    assert parsed == {"Worker": {"ServiceArgs": {"workers": 2, "resources": {"gpu": 1}}}}


def test_value_as_next_argument() -> None:
    parsed = parse_overrides(["--Backend.suffix", "-x", "--Common.model=/path/m"])
    assert parsed == {"Backend": {"suffix": "-x"}, "Common": {"model": "/path/m"}}


def test_later_override_wins() -> None:
    assert parse_overrides(["--A.x=1", "--A.x=2"]) == {"A": {"x": 2}}


@pytest.mark.parametrize(
    "args",
    [["Worker.n=1"], ["--Worker=1"], ["--.n=1"], ["--Worker..n=1"], ["--"], ["-W.n=1"]],
)
def test_malformed_overrides_are_refused(args: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"--Service\.key|service name|a service and a key"):
        parse_overrides(args)


def test_override_without_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--Worker.n"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--Worker.n", "--Worker.m=1"])


def test_bad_json_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_overrides(["--Worker.list=[1,"])


def test_conflicting_nested_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="already set"):
        parse_overrides(["--A.x=1", "--A.x.y=2"])


# --- load_yaml ------------------------------------------------------------------------------


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("Common:\n  model: m\nWorker:\n  n: 1\nFrontend:\n")
    assert load_yaml(path) == {"Common": {"model": "m"}, "Worker": {"n": 1}, "Frontend": {}}


def test_load_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("Worker: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(top)
    section = tmp_path / "section.yaml"
    section.write_text("Worker: 3\n")
    with pytest.raises(ConfigError, match="section 'Worker' must be a mapping"):
        load_yaml(section)


def test_empty_yaml_is_empty_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_yaml(path) == {}


# --- merge_config ---------------------------------------------------------------------------


def test_merge_gives_every_service_a_section() -> None:
    merged = merge_config(GRAPH, {}, {})
    assert merged == {"Frontend": {}, "Worker": {}, "Common": {}}


def test_overrides_deep_merge_into_yaml() -> None:
    yaml_cfg = {"Worker": {"n": 1, "ServiceArgs": {"workers": 1, "resources": {"gpu": 1}}}}
    overrides = parse_overrides(["--Worker.ServiceArgs.workers=2", "--Worker.m=x"])
    merged = merge_config(GRAPH, yaml_cfg, overrides)
    assert merged["Worker"] == {
        "n": 1,
        "m": "x",
        "ServiceArgs": {"workers": 2, "resources": {"gpu": 1}},
    }
    assert yaml_cfg["Worker"]["ServiceArgs"]["workers"] == 1  # input left untouched


def test_common_configs_copy_listed_keys_only() -> None:
    yaml_cfg: dict[str, Any] = {
        "Common": {"model": "/m", "block-size": 64, "other": True},
        "Worker": {"common-configs": ["model", "block-size"], "block-size": 32},
        "Frontend": {"common-configs": ["model"]},
    }
    merged = merge_config(GRAPH, yaml_cfg, parse_overrides(["--Common.model=/override"]))
    assert merged["Worker"]["model"] == "/override"
    assert merged["Worker"]["block-size"] == 32  # the service's own value wins
    assert "other" not in merged["Worker"]
    assert merged["Frontend"]["model"] == "/override"
    assert "block-size" not in merged["Frontend"]
    assert merged["Common"] == {"model": "/override", "block-size": 64, "other": True}


def test_common_keys_not_listed_are_not_copied() -> None:
    merged = merge_config(GRAPH, {"Common": {"model": "/m"}, "Worker": {"n": 1}}, {})
    assert merged["Worker"] == {"n": 1}


def test_common_configs_naming_a_missing_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="lists model, which Common does not set"):
        merge_config(GRAPH, {"Worker": {"common-configs": ["model"]}}, {})


def test_unknown_section_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        merge_config(GRAPH, {"Wroker": {"n": 1}}, parse_overrides(["--Backend.x=1"]))
    message = str(info.value)
    assert "Backend, Wroker" in message
    assert "Frontend, Worker" in message


def test_sections_of_services_not_started_are_allowed_when_known() -> None:
    """Serving part of a graph keeps one config file valid for every part."""
    cfg = {"Worker": {"n": 1}, "Router": {"mode": "kv"}}
    merged = merge_config(GRAPH, cfg, {}, known_elsewhere=["Router"])
    assert "Router" not in merged and merged["Worker"] == {"n": 1}
    with pytest.raises(ConfigError, match="Ruoter"):
        merge_config(GRAPH, {"Ruoter": {}}, {}, known_elsewhere=["Router"])


# --- apply_service_args ---------------------------------------------------------------------


def test_service_args_override_without_mutating_decorator() -> None:
    section = {"ServiceArgs": {"workers": 3, "resources": {"gpu": 2}}}
    options = apply_service_args(Worker, section)
    assert options.workers == 3
    assert options.resources == {"gpu": 2, "cpu": "4"}
    assert options.gpus == 2
    assert options.namespace == Worker.namespace
    assert Worker.options.workers == 1
    assert Worker.options.resources == {"gpu": 1, "cpu": "4"}
    assert options is not Worker.options


def test_no_service_args_keeps_decorator_values() -> None:
    options = apply_service_args(Worker, {"n": 1})
    assert (options.workers, options.resources) == (1, {"gpu": 1, "cpu": "4"})


def test_quoted_gpu_count_is_accepted() -> None:
    assert apply_service_args(Worker, {"ServiceArgs": {"resources": {"gpu": "2"}}}).gpus == 2


def test_envs_list_and_dict_forms() -> None:
    listed = {"ServiceArgs": {"envs": [{"name": "A", "value": 1}, {"name": "B", "value": True}]}}
    assert apply_service_args(Worker, listed).extra["envs"] == {"A": "1", "B": "true"}
    mapped = {"ServiceArgs": {"envs": {"HF_HOME": "/cache"}}}
    assert apply_service_args(Worker, mapped).extra["envs"] == {"HF_HOME": "/cache"}
    assert "envs" not in Worker.options.extra


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ({"workers": 0}, r"workers must be an integer >= 1"),
        ({"workers": "2"}, r"workers must be an integer >= 1"),
        ({"workers": True}, r"workers must be an integer >= 1"),
        ({"resources": [1]}, r"resources must be a mapping"),
        ({"resources": {"gpu": -1}}, r"resources.gpu must be an integer >= 0"),
        ({"resources": {"gpu": 1.5}}, r"resources.gpu must be an integer >= 0"),
        ({"replicas": 2}, r"unknown key\(s\) replicas"),
        ({"envs": "A=1"}, r"envs must be a list"),
        ({"envs": [{"name": "A"}]}, r"must have 'name' and 'value'"),
        ({"envs": {"A=B": "1"}}, r"not a valid environment variable name"),
        ({"envs": {"A": [1]}}, r"value must be a string or number"),
        ({"peer_gpus": "yes"}, r"peer_gpus must be true or false"),
    ],
)
def test_service_args_validation(args: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        apply_service_args(Worker, {"ServiceArgs": args})


def test_peer_gpus_from_service_args() -> None:
    assert not apply_service_args(Worker, {}).peer_gpus
    assert apply_service_args(Worker, {"ServiceArgs": {"peer_gpus": True}}).peer_gpus


def test_service_args_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"Worker\.ServiceArgs must be a mapping"):
        apply_service_args(Worker, {"ServiceArgs": [1]})
