"""The MoE subject: building a sparse MoE from a dense model, and one place that reads routing.

* :func:`build_moe` / :class:`MoeBuildConfig`: a Branch-Train-MiX MoE from the bundled model
  (full-rank experts per task cluster, centroid-initialised routers trained with load balancing),
  cached by its recipe (``expertkit moe build``).
* :func:`routing_stats` / :func:`collect_routing_stats` / :class:`RoutingStats`: per layer and
  expert token counts, co-activation, router-logit and expert-output similarity, per-task
  profiles, from hooks found through the architecture descriptors (``expertkit moe stats``).
* :func:`moe_structure`: an MoE checkpoint's layers, checked from its headers.
"""

from expertkit.moe.build import BuildResult, build_moe
from expertkit.moe.collect import collect_routing_stats, routing_stats, task_prompts
from expertkit.moe.config import DEFAULT_CLUSTERS, ClusterSpec, MoeBuildConfig, RouterSpec
from expertkit.moe.inspect import MoeLayer, moe_structure
from expertkit.moe.routing import NotAnMoeError, RoutingTap
from expertkit.moe.stats import RoutingStats

__all__ = [
    "DEFAULT_CLUSTERS", "BuildResult", "ClusterSpec", "MoeBuildConfig", "MoeLayer", "NotAnMoeError", "RouterSpec",
    "RoutingStats", "RoutingTap", "build_moe", "collect_routing_stats", "moe_structure", "routing_stats",
    "task_prompts",
]
