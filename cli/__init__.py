"""The `decomp-hooks` command: one click group, one module per command."""
from __future__ import annotations

import click

from decomp_hooks.cli.cluster import cluster_command
from decomp_hooks.cli.compare import compare_command
from decomp_hooks.cli.dashboard import dashboard_command
from decomp_hooks.cli.decompose import decompose_command
from decomp_hooks.cli.export import export_command
from decomp_hooks.cli.graph import graph_command
from decomp_hooks.cli.harvest import harvest_command
from decomp_hooks.cli.lib import lib_command
from decomp_hooks.cli.toy import toy_group


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="decomp-hooks")
def main() -> None:
    """Parameter decomposition (SPD) of the models you already load, from the command line."""


main.add_command(decompose_command)
main.add_command(export_command)
main.add_command(lib_command)
main.add_command(toy_group)
main.add_command(dashboard_command)
main.add_command(compare_command)
main.add_command(cluster_command)
main.add_command(harvest_command)
main.add_command(graph_command)
