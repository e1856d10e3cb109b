"""`dynamo`: serve a graph, inspect the environment."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from dynamo_sdk import __version__
from dynamo_sdk.cli.env import env_report
from dynamo_sdk.sdk.errors import ConfigurationError
from dynamo_sdk.serve.config_loader import ConfigError
from dynamo_sdk.serve.embedded import EmbeddedServerError
from dynamo_sdk.serve.gpus import GPUAllocationError
from dynamo_sdk.serve.graph import GraphError

USER_ERRORS = (
    ConfigurationError,
    ConfigError,
    GraphError,
    GPUAllocationError,
    EmbeddedServerError,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="dynamo")
def cli() -> None:
    """Dynamo: serve Python service graphs over NATS and etcd."""


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    epilog="Any --Service.key=value (or --Service.key value) overrides the YAML config.",
)
@click.argument("graph")
@click.option(
    "-f",
    "--config-file",
    help="YAML config: a file, or the name of a packaged one (agg, agg_router, disagg, ...).",
)
@click.option(
    "--working-dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory to import the graph from (default: the current one).",
)
@click.option("--dry-run", is_flag=True, help="Print the resolved graph and exit.")
@click.option("--grace", type=float, default=10.0, show_default=True, help="Drain seconds on stop.")
@click.pass_context
def serve(
    ctx: click.Context,
    graph: str,
    config_file: str | None,
    working_dir: str | None,
    dry_run: bool,
    grace: float,
) -> None:
    """Serve GRAPH (module.path:EntryService): one process per worker of each service."""
    from dynamo_sdk.serve.plan import build_plan, render

    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        config_file = config_path(config_file) if config_file else None
        plan = build_plan(graph, config_file=config_file, override_args=ctx.args, cwd=working_dir)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    if dry_run:
        click.echo(render(plan))
        return
    from dynamo_sdk.serve.run import serve_graph

    try:
        code = serve_graph(plan, grace=grace)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def config_path(value: str) -> str:
    """A config file's path: the file itself, or a packaged config by name (`agg`)."""
    if Path(value).is_file():
        return value
    packaged = Path(__file__).resolve().parent.parent / "llm" / "configs"
    if "/" not in value:
        candidate = packaged / (value if value.endswith(".yaml") else f"{value}.yaml")
        if candidate.is_file():
            return str(candidate)
    names = ", ".join(sorted(p.stem for p in packaged.glob("*.yaml")))
    raise ConfigError(f"config file {value!r} does not exist (packaged configs: {names})")


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    epilog="Example: dynamo run in=http out=torch --http-port 8000; -h lists every option.",
)
@click.pass_context
def run(ctx: click.Context) -> None:
    """Serve a model in one process: in=http|text|batch:FILE out=ENGINE [MODEL] (-h: options)."""
    from dynamo_sdk.llm.model_resolver import ModelNotAvailableError
    from dynamo_sdk.llm.run import RunUsageError, run_help
    from dynamo_sdk.llm.run import run as run_model
    from dynamo_sdk.llm.tokenizer import TokenizerError

    args = list(ctx.args)
    if "-h" in args or "--help" in args:
        click.echo(run_help(args))
        return
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stderr)
    try:
        run_model(args)
    except (
        RunUsageError,
        ModelNotAvailableError,
        ConfigurationError,
        TokenizerError,
        OSError,
    ) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


@cli.command()
def env() -> None:
    """Show versions, the NATS/etcd servers `dynamo serve` would use, and the GPUs seen."""
    click.echo(env_report())


if __name__ == "__main__":
    cli()
