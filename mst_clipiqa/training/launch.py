"""Launchers that start the processes themselves (torchrun, SLURM's srun, `fabric run`) and the Trainer's options,
which must then be set for exactly the processes started: otherwise each would run a fit of its own, or wait for
ranks that never come.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_warn

from mst_clipiqa.errors import OptionError

# The Trainer option each of `fabric run`'s variables carries: Fabric reads them, the Trainer does not.
FABRIC_RUN_OPTIONS = {
    "accelerator": "LT_ACCELERATOR",
    "strategy": "LT_STRATEGY",
    "devices": "LT_DEVICES",
    "num_nodes": "LT_NUM_NODES",
    "precision": "LT_PRECISION",
}


def take_launcher_options(trainer: MutableMapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Fill the `trainer` options left unset (at their `defaults` or "auto": the shipped configs write the defaults
    out) with the values `fabric run` passes in LT_* variables, in place. An option set otherwise wins, with a
    warning; a launcher's "auto" fills nothing."""
    overridden = []
    for option, variable in FABRIC_RUN_OPTIONS.items():
        value: str | int | None = os.environ.get(variable)
        if value is None or value == "auto":
            continue
        if option in ("devices", "num_nodes") and value.lstrip("-").isdigit():  # else GPU ids: "0,1"
            value = int(value)
        current = trainer.get(option)
        if current == defaults.get(option) or current == "auto":
            trainer[option] = value
        elif str(current) != str(value):
            overridden.append(f"--trainer.{option} {current} (fabric run gave {value})")
    if overridden:
        overrides = "; ".join(overridden)
        rank_zero_warn(f"Set on the command line or in the config, these win over fabric run's: {overrides}")


def launched_processes() -> tuple[int, int | None, str] | None:
    """What the launcher that started this process started: (processes in all, nodes where it says, the variables
    that say so), or None without a launcher."""
    env = os.environ
    if "WORLD_SIZE" in env:  # torchrun, fabric run, Lightning's own launcher
        world = int(env["WORLD_SIZE"])
        if "LOCAL_WORLD_SIZE" not in env:
            return world, None, f"WORLD_SIZE={world}"
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return world, world // per_node, f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={per_node}"
    if SLURMEnvironment.detect():  # srun; Lightning ignores the shell of an interactive allocation
        world, nodes = int(env["SLURM_NTASKS"]), env.get("SLURM_NNODES")
        if nodes is None:
            return world, None, f"SLURM_NTASKS={world}"
        return world, int(nodes), f"SLURM_NTASKS={world}, SLURM_NNODES={nodes}"
    return None


def take_launched_processes(options: MutableMapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Set `devices` and `num_nodes` left at their `defaults` to the processes a launcher started, in place: for a
    command whose ranks share one job (score), who launched N processes wants N ranks. Options set otherwise stay,
    for `check_world_size` to judge."""
    launched = launched_processes()
    if launched is None:
        return
    world, nodes, _ = launched
    if nodes is not None and options.get("num_nodes") == defaults.get("num_nodes"):
        options["num_nodes"] = nodes
    if options.get("devices") in (defaults.get("devices"), "auto"):
        options["devices"] = max(world // options["num_nodes"], 1)


def check_world_size(
    num_devices: int, num_nodes: int, strategy: Any, prefix: str = "--trainer.", job: str = "a fit"
) -> None:
    """Raise an `OptionError` naming what was started and the options that match it, unless the Trainer's devices
    per node times nodes are the processes the launcher started. `prefix` is how the command spells its Trainer
    options in the advice, `job` what each process would run alone."""
    launched = launched_processes()
    if launched is None:
        return
    world, nodes, variables = launched
    nodes = nodes or num_nodes
    if num_devices * num_nodes == world and num_nodes == nodes:
        return
    advice = f"{prefix}devices {max(world // nodes, 1)} {prefix}num_nodes {nodes}"
    if strategy == "auto" and world > 1:
        advice += f" {prefix}strategy ddp"
    wanted = num_devices * num_nodes
    outcome = f"each would run {job} of its own" if wanted == 1 else "they would not form one job"
    raise OptionError(
        f"The launcher started {_count(world, 'process')} ({variables}), but the Trainer is set for "
        f"{_count(num_devices, 'device')} per node x {_count(num_nodes, 'node')}: {outcome}. Pass {advice}, "
        f"or launch {_count(wanted, 'process')}."
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"
