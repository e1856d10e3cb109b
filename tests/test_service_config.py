"""Typed service sections and config-dependent graph shapes, at plan time (no processes).

Every section is decoded into its service's config type before anything starts: a wrong type,
an unknown key or an unknown service is one clear message. The LLM graphs serve both forms of
the request path from one module: the Frontend doing the Processor's work (the default), or
Frontend -> Processor (-> Router) -> Worker with `Frontend.processor: true`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from dynamo_sdk import async_on_start, depends, service
from dynamo_sdk.sdk.errors import ConfigurationError
from dynamo_sdk.sdk.service import DynamoService
from dynamo_sdk.serve.graph import resolve_graph
from dynamo_sdk.serve.plan import build_plan, render
from tests.serving import REPO_ROOT


@pytest.fixture(autouse=True)
def own_links() -> Iterator[None]:
    """Each test sees the links its graph module makes: the LLM graphs link the same service
    objects (importing disagg links Worker -> PrefillWorker for every graph in the process,
    as importing one graph per process, what `dynamo serve` does, never shows)."""
    from dynamo_sdk.llm.services import frontend, prefill_worker, processor, router, worker

    services = [
        m for mod in (frontend, prefill_worker, processor, router, worker)
        for m in vars(mod).values() if isinstance(m, DynamoService)
    ]  # fmt: skip
    saved = {id(svc): list(svc.links) for svc in services}
    yield
    for svc in services:
        svc.links[:] = saved[id(svc)]
    import sys

    for name in [n for n in sys.modules if n.startswith(("graphs.", "dynamo_sdk.llm.graphs."))]:
        del sys.modules[name]  # imported again (and linked again) by the next plan


def plan(graph: str, config: str | None, *overrides: str) -> list[str]:
    built = build_plan(
        graph, config_file=config, override_args=list(overrides), cwd=str(REPO_ROOT), environ={}
    )
    return [svc.name for svc in built.services]


def test_the_folded_form_is_the_default_and_the_scale_out_form_one_key_away() -> None:
    assert plan("graphs.agg:Frontend", "configs/agg.yaml") == ["Frontend", "Worker"]
    assert plan("graphs.agg:Frontend", "configs/agg.yaml", "--Frontend.processor=true") == [
        "Frontend", "Processor", "Worker",
    ]  # fmt: skip
    assert plan("graphs.agg_router:Frontend", "configs/agg_router.yaml") == ["Frontend", "Worker"]
    # the scale-out router path: the Processor asks the Router service (router_mode: service)
    scaled = plan(
        "graphs.agg_router:Frontend", "configs/agg_router.yaml", "--Frontend.processor=true"
    )
    assert scaled == ["Frontend", "Processor", "Worker", "Router"]
    assert plan("graphs.disagg:Frontend", "configs/disagg.yaml", "--Frontend.processor=true") == [
        "Frontend",
        "Processor",
        "Worker",
        "PrefillWorker",
    ]
    assert plan("graphs.disagg_router:Frontend", "configs/disagg_router.yaml") == [
        "Frontend", "Worker", "PrefillWorker",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--Frontend.port=x", "Frontend.port: expected `int`, got `str`"),
        (
            "--Frontend.prot=9000",
            "Frontend: unknown key 'prot' (valid keys: api_key, api_key_exempt, body_timeout_s,",
        ),
        ("--Frontend.router_mode=fastest", "(choices: round_robin, random, kv, service)"),
        ("--Worker.max_modle_len=5", "Worker: unknown key 'max_modle_len' (valid keys: block_size"),
        ("--Worker.kv_cache_gb=-1", "Worker.kv_cache_gb: expected `float` > 0.0"),
        ("--Worker.engine=tensorrt", "unknown engine 'tensorrt'; known engines: echo, mocker"),
        ("--Workr.engine=torch", "section(s) for unknown service(s) Workr"),
    ],
)
def test_a_bad_section_is_one_message_naming_service_key_and_choices(
    override: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        plan("graphs.agg:Frontend", "configs/agg.yaml", override)
    assert message in str(info.value)


def test_a_misspelt_vllm_argument_is_caught_without_importing_vllm() -> None:
    pytest.importorskip("vllm")  # the names are read from its source, which must be here
    with pytest.raises(ConfigurationError, match=r"unknown vLLM engine argument.*max_modle_len"):
        plan("graphs.agg:Frontend", "configs/agg_vllm.yaml", "--Worker.max_modle_len=5")
    assert plan("graphs.agg:Frontend", "configs/agg_vllm.yaml", "--Worker.max_num_seqs=4")


def test_dry_run_shows_the_decoded_settings_and_what_is_not_started() -> None:
    built = build_plan(
        "graphs.agg:Frontend",
        config_file="configs/agg.yaml",
        override_args=[],
        cwd=str(REPO_ROOT),
        environ={},
    )
    text = render(built)
    assert '"startup_wait": 60.0' in text  # a default filled in by the Frontend's type
    assert '"kv_cache_gb": 0.25' in text
    assert "not started (no active edge reaches them): Processor, Router" in text


class Knobs(msgspec.Struct, forbid_unknown_fields=True):
    helper: bool = False


@service(dynamo={"namespace": "typed"})
class Helper:
    @async_on_start
    async def start(self) -> None: ...


@service(dynamo={"namespace": "typed"}, config=Knobs)
class Entry:
    helper = depends(Helper, when=lambda c: c.helper)


def test_a_when_edge_follows_the_decoded_config() -> None:
    assert [s.name for s in resolve_graph(Entry)] == ["Entry", "Helper"]  # every possible edge
    off = {"Entry": Entry.decode_config({}), "Helper": {}}
    on = {"Entry": Entry.decode_config({"helper": True}), "Helper": {}}
    assert [s.name for s in resolve_graph(Entry, off)] == ["Entry"]
    assert [s.name for s in resolve_graph(Entry, on)] == ["Entry", "Helper"]
    with pytest.raises(ConfigurationError, match=r"Entry\.helper: expected `bool`"):
        Entry.decode_config({"helper": "yes"})


def test_a_packaged_graph_and_config_plan_from_any_directory(tmp_path: Path) -> None:
    from dynamo_sdk.cli.main import config_path

    built = build_plan(
        "dynamo_sdk.llm.graphs.agg:Frontend",
        config_file=config_path("agg"),
        override_args=[],
        cwd=str(tmp_path),
        environ={},
    )
    assert [s.name for s in built.services] == ["Frontend", "Worker"]
    with pytest.raises(ConfigurationError, match="packaged configs: agg, agg_echo"):
        config_path("agg_nope")
