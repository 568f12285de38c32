"""Turn a :class:`~expertkit.merge.config.MergeConfig` into a list of per-tensor jobs, and check
that the inputs are compatible before any tensor is read.

Each :class:`TensorJob` says which tensor of which input feeds one output tensor, its depth
``t`` (for gradient parameters) and its architecture group (for group filters). With
``models:`` every output tensor is the same name in every input; with ``slices:`` output layer
``o`` takes source layer ``start + offset`` of each source, and non-layer tensors come from the
first slice's sources (embeddings) or the last slice's (final norm, lm_head), as in mergekit.

:func:`check_compatible` collects every mismatch (architecture, tied embeddings, tensor names,
shapes, vocabulary) into one :class:`~expertkit.errors.IncompatibleModelsError`, each with what to
do. Vocabularies that differ only by added tokens are aligned (:class:`VocabPlan`).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from expertkit.errors import ConfigError, IncompatibleModelsError
from expertkit.merge.config import MergeConfig, Parameters
from expertkit.merge.methods.base import MergeMethod
from expertkit.merge.sources import Source, SourceSet, read_tokenizer_vocab
from expertkit.weights.arch import describe

VOCAB_GROUPS = ("embedding", "lm_head")


@dataclass
class TensorJob:
    """One output tensor: inputs ``(source index, tensor name)``, optional base, depth and group."""

    out_name: str
    inputs: list[tuple[int, str]]
    base: tuple[int, str] | None
    t: float
    group: str
    model_params: list[list[Parameters | None]]  # per input: settings, highest precedence first
    shared_params: list[Parameters | None]  # settings for global parameters, highest first


@dataclass
class MergePlan:
    """Everything the executor needs: sources (inputs then base), jobs, and output facts."""

    method: MergeMethod
    sources: list[Source]  # index 0..n-1 as referenced by jobs
    stats: list[str | None]  # per source: statistics file
    jobs: list[TensorJob]
    reference: Source  # config.json / tokenizer template
    num_layers: int | None  # output layer count (slices)
    vocab: VocabPlan | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class VocabPlan:
    """Rows of vocabulary tensors: the output has ``rows`` rows; an input with fewer gets the mean
    of the inputs that have a row; an input with more is cut."""

    rows: int
    template: Source  # tokenizer files come from here


def _layers(src: Source) -> tuple[dict[int, list[str]], list[str], dict[str, str]]:
    """(layer -> names, non-layer names, name -> group) of a source, from its architecture descriptor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = describe(src.names(), src.config or None)
    by_layer: dict[int, list[str]] = {}
    other: list[str] = []
    for name in src.names():
        role = summary.roles[name]
        if role.layer is not None and role.stack is None:
            by_layer.setdefault(role.layer, []).append(name)
        else:
            other.append(name)
    return by_layer, other, {n: r.group for n, r in summary.roles.items()}


def rename_layer(name: str, src_layer: int, out_layer: int) -> str:
    """``name`` with its layer index ``src_layer`` (first ``.N.`` component) replaced by ``out_layer``."""
    return re.sub(rf"(^|\.){src_layer}(\.|$)", rf"\g<1>{out_layer}\g<2>", name, count=1)


def build_plan(config: MergeConfig, sources: SourceSet, method: MergeMethod) -> MergePlan:
    """Open every input and lay out the per-tensor jobs (no tensor data is read)."""
    base_ref = config.base_model
    if config.models is not None:
        takes_base = method.needs_base or method.optional_base
        models = [m for m in config.models if not (takes_base and m.model == base_ref)]
        if not models:
            raise ConfigError("no input models besides the base; list the models to merge under 'models'.")
        refs = [m.model for m in models]
        stats = [m.stats for m in models]
        srcs = [sources.get(r) for r in refs]
        base_idx = None
        if base_ref and takes_base:
            srcs.append(sources.get(base_ref))
            stats.append(None)
            base_idx = len(srcs) - 1
        reference = srcs[base_idx] if base_idx is not None else srcs[0]
        _, _, groups = _layers(reference)
        t_of = _depths(reference)
        jobs = [TensorJob(name, [(i, name) for i in range(len(models))],
                          (base_idx, name) if base_idx is not None else None, t_of.get(name, 0.0),
                          groups.get(name, "other"), [[m.parameters, config.parameters] for m in models],
                          [config.parameters]) for name in reference.names()]
        plan = MergePlan(method, srcs, stats, jobs, reference, None)
    else:
        plan = _slice_plan(config, sources, method)
    return plan


def _depths(src: Source) -> dict[str, float]:
    """name -> t = layer / (num_layers - 1) (1 for a single layer), as mergekit's gradients."""
    by_layer, _, _ = _layers(src)
    layers = sorted(by_layer)
    n = len(layers)
    return {name: (k / (n - 1) if n > 1 else 1.0) for k, layer in enumerate(layers) for name in by_layer[layer]}


def _slice_plan(config: MergeConfig, sources: SourceSet, method: MergeMethod) -> MergePlan:
    slices = config.slices or []
    refs = list(dict.fromkeys(s.model for sl in slices for s in sl.sources))
    srcs = [sources.get(r) for r in refs]
    index = {r: i for i, r in enumerate(refs)}
    info = {r: _layers(srcs[index[r]]) for r in refs}
    jobs: list[TensorJob] = []
    out_layer = 0

    def split(sl: Any) -> tuple[list[Any], Any | None]:
        base = sl.base_model or config.base_model
        if base is None or not (method.needs_base or method.optional_base):
            return list(sl.sources), None
        found = [s for s in sl.sources if s.model == base]
        if not found:
            raise ConfigError(f"slice with sources {[s.model for s in sl.sources]}: the base model '{base}' "
                              "must be one of the slice's sources (it gives the base layers).")
        return [s for s in sl.sources if s.model != base], found[0]

    def ends(sl: Any, pre: bool) -> None:
        inputs, base = split(sl)
        first = refs.index(inputs[0].model)
        by_layer, other, groups = info[refs[first]]
        for name in other:
            if (groups.get(name) in ("embedding", "position")) != pre:
                continue
            jobs.append(TensorJob(name, [(index[s.model], name) for s in inputs],
                                  (index[base.model], name) if base else None, 0.0, groups.get(name, "other"),
                                  [[s.parameters, sl.parameters, config.parameters] for s in inputs],
                                  [sl.parameters, config.parameters]))

    ends(slices[0], True)
    for sl in slices:
        inputs, base = split(sl)
        span = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for off in range(span):
            t = off / (span - 1) if span > 1 else 1.0
            first = inputs[0]
            src_layer = first.layer_range[0] + off
            names = info[first.model][0].get(src_layer)
            if names is None:
                raise ConfigError(f"model '{first.model}' has no layer {src_layer} (layer_range "
                                  f"{list(first.layer_range)}); check the slice.")
            groups = info[first.model][2]
            for name in names:
                def src_name(s: Any) -> str:
                    return rename_layer(name, src_layer, s.layer_range[0] + off)

                jobs.append(TensorJob(
                    rename_layer(name, src_layer, out_layer), [(index[s.model], src_name(s)) for s in inputs],
                    (index[base.model], src_name(base)) if base else None, t, groups.get(name, "other"),
                    [[s.parameters, sl.parameters, config.parameters] for s in inputs],
                    [sl.parameters, config.parameters]))
            out_layer += 1
    ends(slices[-1], False)
    return MergePlan(method, srcs, [None] * len(srcs), jobs, srcs[0], out_layer)


# ------------------------------------------------------------------ compatibility
def _cfg(src: Source, key: str) -> Any:
    return (src.config or {}).get(key)


def check_compatible(plan: MergePlan, tokenizer_source: str | None = None) -> None:
    """Raise one :class:`IncompatibleModelsError` listing every mismatch; set ``plan.vocab``."""
    problems: list[str] = []
    ref = plan.reference
    used = sorted({i for job in plan.jobs for i, _ in [*job.inputs, *([job.base] if job.base else [])]})
    for i in used:
        src = plan.sources[i]
        if src is ref:
            continue
        for key in ("model_type", "architectures"):
            if _cfg(src, key) != _cfg(ref, key):
                problems.append(f"architecture: {src.ref} has {key}={_cfg(src, key)!r} but {ref.ref} has "
                                f"{_cfg(ref, key)!r}; only models of one architecture can be merged")
        if bool(_cfg(src, "tie_word_embeddings")) != bool(_cfg(ref, "tie_word_embeddings")):
            problems.append(f"tied embeddings: {src.ref} has tie_word_embeddings={_cfg(src, 'tie_word_embeddings')} "
                            f"but {ref.ref} has {_cfg(ref, 'tie_word_embeddings')}; one shares the input "
                            "embedding with the output head and the other does not, so lm_head cannot be merged")
        if plan.num_layers is None and set(src.names()) != set(ref.names()):
            only = sorted(set(src.names()) - set(ref.names()))
            missing = sorted(set(ref.names()) - set(src.names()))
            problems.append(f"tensor names: {src.ref} has {len(only)} tensors {ref.ref} lacks "
                            f"({', '.join(only[:3])}) and lacks {len(missing)} ({', '.join(missing[:3])}); "
                            "the models have different architectures or layer counts")
    vocab_rows: dict[str, set[int]] = {}
    for job in plan.jobs:
        ins = [*job.inputs, *([job.base] if job.base else [])]
        missing = [f"{plan.sources[i].ref}:{n}" for i, n in ins if n not in plan.sources[i]]
        if missing:
            problems.append(f"missing tensor for '{job.out_name}': {', '.join(missing[:3])}")
            continue
        shapes = {tuple(plan.sources[i].shape(n)) for i, n in ins}
        if len(shapes) == 1:
            continue
        if job.group in VOCAB_GROUPS and len({s[1:] for s in shapes}) == 1:
            vocab_rows[job.out_name] = {s[0] for s in shapes}
            continue
        detail = ", ".join(f"{plan.sources[i].ref}: {list(plan.sources[i].shape(n))}" for i, n in ins[:4])
        problems.append(f"shape of '{job.out_name}' differs ({detail}); the models have different sizes")
    if vocab_rows and not problems:
        plan.vocab = _vocab_plan(plan, used, tokenizer_source, problems)
    if problems:
        raise IncompatibleModelsError(
            f"the models cannot be merged ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  - "
            + "\n  - ".join(dict.fromkeys(problems)) + "\nNothing was written.")


def _vocab_plan(plan: MergePlan, used: list[int], tokenizer_source: str | None, problems: list[str]) -> VocabPlan | None:
    """Align vocabularies that differ only by tokens added at the end; else record the problem."""
    rows: dict[int, int] = {}  # source -> rows of its vocabulary tensors
    for job in plan.jobs:
        if job.group in VOCAB_GROUPS:
            for k, n in [*job.inputs, *([job.base] if job.base else [])]:
                rows.setdefault(k, plan.sources[k].shape(n)[0])
    used = [i for i in used if i in rows]
    vocabs = {i: read_tokenizer_vocab(plan.sources[i].folder) for i in used}
    if any(v is None for v in vocabs.values()):
        problems.append("vocabulary: the embedding sizes differ and some models have no tokenizer.json to "
                        "align them; give models with the same vocabulary")
        return None
    union: dict[str, int] = {}
    by_id: dict[int, str] = {}
    for i in used:
        for tok, tid in vocabs[i].items():  # type: ignore[union-attr]
            if union.get(tok, tid) != tid or by_id.get(tid, tok) != tok:
                other = (f"'{tok}' at id {union[tok]}" if union.get(tok, tid) != tid else f"'{by_id[tid]}' at id {tid}")
                problems.append(f"vocabulary: {plan.sources[i].ref} has '{tok}' at id {tid} where another model has "
                                f"{other}; the tokenizers differ by more than added tokens and cannot be aligned "
                                "(give models that share one tokenizer)")
                return None
            union[tok], by_id[tid] = tid, tok
    if tokenizer_source in (None, "union"):
        template_idx = max(used, key=lambda i: rows[i])
    elif tokenizer_source == "base":
        template_idx = next((i for i in used if plan.sources[i] is plan.reference), used[0])
    else:
        matching = [i for i in used if plan.sources[i].ref == tokenizer_source]
        if not matching:
            problems.append(f"tokenizer_source '{tokenizer_source}' is not one of the merged models")
            return None
        template_idx = matching[0]
    plan.notes.append(f"vocabularies aligned: {sorted(set(rows.values()))} rows -> {rows[template_idx]} "
                      f"(tokenizer of {plan.sources[template_idx].ref})")
    return VocabPlan(rows[template_idx], plan.sources[template_idx])
