"""Model-GLUE zoo planning: cluster mergeable models, a merge strategy per cluster, a mixture.

* :func:`discover_zoo` / :class:`MemberWeights`: zoo inputs (HF folders, LoRA adapters, folders of them).
* :func:`pairwise_similarity`: streamed per-group similarity of weights or task vectors.
* :func:`agglomerative`: clustering that places every model; incompatible pairs never share a cluster.
* :func:`select_strategy`: per-cluster greedy selective merging and a method/coefficient grid under
  an evaluation budget.
* :func:`plan_zoo` -> :class:`ZooPlan` (:func:`save_plan` / :func:`load_plan`, editable YAML) ->
  :func:`build_plan`.
"""

from expertkit.merge.zoo.build import build_plan, build_representative
from expertkit.merge.zoo.cluster import Clustering, agglomerative, auto_threshold
from expertkit.merge.zoo.compat import Signature, compatibility_classes, explain, incompatibility_report
from expertkit.merge.zoo.members import MemberWeights, ZooMember, discover_zoo
from expertkit.merge.zoo.plan import ClusterSpec, MemberSpec, MixtureSpec, ZooPlan, load_plan, save_plan
from expertkit.merge.zoo.planner import plan_zoo, varying_names
from expertkit.merge.zoo.select import DEFAULT_GRID, Selection, merge_members, select_strategy
from expertkit.merge.zoo.similarity import SimilarityReport, pairwise_similarity

__all__ = [
    "DEFAULT_GRID", "ClusterSpec", "Clustering", "MemberSpec", "MemberWeights", "MixtureSpec", "Selection",
    "Signature", "SimilarityReport", "ZooMember", "ZooPlan", "agglomerative", "auto_threshold", "build_plan",
    "build_representative", "compatibility_classes", "discover_zoo", "explain", "incompatibility_report",
    "load_plan", "merge_members", "pairwise_similarity", "plan_zoo", "save_plan", "select_strategy",
    "varying_names",
]
