"""Executors beyond the local loop: shards of a run on a Ray cluster (`--executor ray`)."""

from nnrun.executor._ray import INSTALL_HINT, RayOptions, RayReport, import_ray, run_ray
from nnrun.executor._shards import Shard, plan_shards, run_shard, shard_dir

__all__ = [
    "INSTALL_HINT",
    "RayOptions",
    "RayReport",
    "Shard",
    "import_ray",
    "plan_shards",
    "run_ray",
    "run_shard",
    "shard_dir",
]
