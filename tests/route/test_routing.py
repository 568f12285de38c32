"""Known answers of per-token routing on a tiny llama: gates, GLIDER's alpha limits, batching, merges."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from expertkit.route import RouteConfig, Router
from expertkit.route.layers import RoutedLinear, RouteState, attach, standardise
from expertkit.route.library import Expert, ExpertLibrary

from .conftest import FakeEmbedder

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
PROMPTS = ["ab:", "hello there:", "x:", "a longer prompt here:", "qq:"]


def gated_library(library: ExpertLibrary, tmp_path, direction: torch.Tensor) -> ExpertLibrary:
    """The two-expert library with hand-set gates: expert 0 gets ``+direction``, expert 1 ``-direction``."""
    experts = []
    for k, e in enumerate(library.experts):
        path = tmp_path / f"gates-{e.name}.safetensors"
        save_file({m: (direction if k == 0 else -direction).clone() for m in MODULES}, str(path))
        experts.append(Expert(e.name, e.task, e.description, e.adapter, path))
    return ExpertLibrary.from_adapters(experts)


class FixedWriter:
    """An instruction writer that answers from a dict (query -> instruction)."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def __call__(self, queries):
        return [self.answers[q] for q in queries]


def glider_router(loaded, lib, answers, **cfg):
    from expertkit.route import GlobalRouter

    return Router(loaded, lib, RouteConfig(**cfg), global_router=GlobalRouter(lib.descriptions, FixedWriter(answers), FakeEmbedder()))


def logits(router: Router, prompts) -> torch.Tensor:
    """Last-position logits (B, V) of the routed model on left-padded prompts."""
    from expertkit.tasks.infer import pad

    ids = router.prepare(prompts)
    x, mask = pad(ids, 0, side="left")
    with router as model, torch.inference_mode():
        return model(input_ids=x, attention_mask=mask).logits[:, -1]


def test_hand_set_gates_route_every_token_as_the_gates_say(loaded, library, tmp_path) -> None:
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))
    lib = gated_library(library, tmp_path, direction)
    stacks = lib.stacks()
    state = RouteState(mode="local", top_k=1, trace=[])
    inputs: dict[str, torch.Tensor] = {}
    detach = attach(loaded.model, stacks, state)
    try:
        for name, mod in loaded.model.named_modules():
            if isinstance(mod, RoutedLinear):
                mod.register_forward_hook(lambda m, a, o: inputs.__setitem__(m.name, (a[0].detach(), o.detach())))
        ids = torch.tensor([[1, 40, 41, 42, 50, 60, 70, 80]])
        with torch.inference_mode():
            loaded.model(input_ids=ids)
    finally:
        detach()
    assert sorted(inputs) == sorted(MODULES) and len(state.trace) == len(MODULES)
    chosen = dict(state.trace)
    for name in MODULES:
        x, out = inputs[name]  # (1, T, 64), (1, T, out)
        corr = standardise(x) @ standardise(direction)  # (1, T)
        expected = (corr < 0).long()  # expert 0 where the token correlates with +direction
        assert torch.equal(chosen[name][..., 0], expected), name
        layer = loaded.model.get_submodule(name)
        st = stacks[name]
        with torch.no_grad():
            want = layer(x) + torch.stack([x[0, t] @ st.a[e].T @ st.b[e].T for t, e in enumerate(expected[0].tolist())])
        torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-5)
    assert {int(v) for _, t in state.trace for v in t.flatten()} == {0, 1}


def test_alpha_zero_is_local_only_and_huge_alpha_is_retrieval_only(loaded, library, tmp_path) -> None:
    lib = gated_library(library, tmp_path, torch.randn(64, generator=torch.Generator().manual_seed(4)))
    answers = {p: ("repeat the character" if i % 2 else "early or late letters") for i, p in enumerate(PROMPTS)}
    glider0 = logits(glider_router(loaded, lib, answers, alpha=0.0, top_k=1), PROMPTS)
    local = logits(Router(loaded, lib, RouteConfig(method="phatgoose", top_k=1)), PROMPTS)
    torch.testing.assert_close(glider0, local, rtol=0, atol=0)
    huge = logits(glider_router(loaded, lib, answers, alpha=1e6, top_k=1), PROMPTS)
    retrieval = logits(glider_router(loaded, lib, answers, method="global", top_k=1), PROMPTS)
    torch.testing.assert_close(huge, retrieval, rtol=0, atol=0)
    assert not torch.allclose(huge, glider0)  # the two limits differ: the test can tell them apart
    # retrieval-only with one expert per query is that expert alone: compare with PEFT applying it
    from peft import PeftModel

    peft = PeftModel.from_pretrained(loaded.model, str(lib.experts[1].adapter))
    with torch.inference_mode():
        from expertkit.tasks.infer import pad

        ids = loaded.tokenizer([PROMPTS[0]]).input_ids
        x, mask = pad(ids, 0, side="left")
        want = peft(input_ids=x, attention_mask=mask).logits[:, -1]
    peft.unload()
    torch.testing.assert_close(retrieval[:1], want, rtol=1e-5, atol=1e-5)  # PROMPTS[0] is written as expert 1's description


def test_batched_and_one_at_a_time_generation_give_the_same_tokens(loaded, library, tmp_path) -> None:
    lib = gated_library(library, tmp_path, torch.randn(64, generator=torch.Generator().manual_seed(5)))
    answers = {p: ("repeat the character" if i % 2 else "early or late letters") for i, p in enumerate(PROMPTS)}
    router = glider_router(loaded, lib, answers, alpha=0.05, top_k=1)
    from expertkit.tasks.infer import greedy_generate

    ids = router.prepare(PROMPTS)
    with router as model:
        batched = greedy_generate(model, loaded.tokenizer, ids, 6, batch_size=5)
        single = [greedy_generate(model, loaded.tokenizer, [i], 6, batch_size=1)[0] for i in ids]
    assert batched == single
    with Router(loaded, lib, RouteConfig(method="base")) as model:
        plain = greedy_generate(model, loaded.tokenizer, ids, 6, batch_size=5)
    assert plain != batched  # routing changed what the model says


def test_uniform_merge_equals_the_mean_delta_and_lorahub_one_hot_equals_one_expert(loaded, library) -> None:
    stacks = library.stacks()
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(6))
    layer = loaded.model.get_submodule(MODULES[0])
    st = stacks[MODULES[0]]
    mean_delta = torch.einsum("eor,eri->oi", st.b, st.a) / 2  # (out, in)
    uniform = RoutedLinear(layer, st, RouteState(mode="fixed", weights=torch.tensor([0.5, 0.5])), "m")
    torch.testing.assert_close(uniform(x), layer(x) + x @ mean_delta.T, rtol=1e-5, atol=1e-5)
    hub = RoutedLinear(layer, st, RouteState(mode="lorahub", weights=torch.tensor([0.0, 1.0])), "m")
    torch.testing.assert_close(hub(x), layer(x) + x @ (st.b[1] @ st.a[1]).T, rtol=1e-5, atol=1e-5)
    half = RoutedLinear(layer, st, RouteState(mode="lorahub", weights=torch.tensor([0.5, 0.5])), "m")
    composed = (st.b.sum(0) / 2) @ (st.a.sum(0) / 2)  # LoraHub composes A and B apart, not the deltas
    torch.testing.assert_close(half(x), layer(x) + x @ composed.T, rtol=1e-5, atol=1e-5)


def test_lorahub_search_stays_within_its_budget_and_improves_on_zero(loaded, library) -> None:
    from expertkit.route.lorahub import fit_lorahub
    from expertkit.tasks.toy import copy_task

    router = Router(loaded, library, RouteConfig(method="lorahub", lorahub_budget=12, lorahub_examples=4))
    fit = fit_lorahub(router, copy_task())
    assert fit.evaluations == 12 and fit.weights.shape == (2,)  # the whole budget (2 generations of 6), no more
    assert torch.all(fit.weights.abs() <= 1.5)
    zero = fit_lorahub(Router(loaded, library, RouteConfig(method="lorahub", lorahub_budget=2, lorahub_examples=4)), copy_task())
    assert fit.objective <= zero.objective
    again = fit_lorahub(Router(loaded, library, RouteConfig(method="lorahub", lorahub_budget=12, lorahub_examples=4)),
                        copy_task())
    assert again.objective == fit.objective and torch.equal(again.weights, fit.weights)  # seeded
    assert isinstance(loaded.model.get_submodule(MODULES[0]), torch.nn.Linear)  # layers given back


def test_arrow_peer_from_peft_runs_on_the_library_and_one_expert_is_that_expert(loaded, library) -> None:
    one = ExpertLibrary.from_adapters(library.experts[:1])
    ids = torch.tensor([[1, 40, 41, 42, 50]])
    with Router(loaded, one, RouteConfig(method="arrow", top_k=1)) as model, torch.inference_mode():
        arrow = model(input_ids=ids).logits
    with Router(loaded, one, RouteConfig(method="uniform")) as model, torch.inference_mode():
        alone = model(input_ids=ids).logits  # uniform over one expert = that expert
    torch.testing.assert_close(arrow, alone, rtol=1e-4, atol=1e-4)
    with Router(loaded, library, RouteConfig(method="arrow", top_k=1)) as model, torch.inference_mode():
        two = model(input_ids=ids).logits
    assert two.shape == arrow.shape and isinstance(loaded.model.get_submodule(MODULES[0]), torch.nn.Linear)


def test_arrow_routes_inside_cached_batched_generation(loaded, library) -> None:
    """PEFT's Arrow router is applied at every cached decoding step, not only to the prompt: over a
    one-expert library it generates exactly what that expert generates, and not what the base does."""
    one = ExpertLibrary.from_adapters(library.experts[:1])
    said = {m: Router(loaded, one, RouteConfig(method=m, top_k=1)).generate(PROMPTS, 8, batch_size=3)
            for m in ("arrow", "uniform", "base")}
    assert said["arrow"] == said["uniform"]
    assert said["arrow"] != said["base"]


def test_modes_without_what_they_need_are_refused(loaded, library) -> None:
    from expertkit.errors import ConfigError

    with pytest.raises(ConfigError, match="gate vectors"):
        Router(loaded, library, RouteConfig(method="phatgoose"))
    with pytest.raises(ConfigError, match="global router"):
        Router(loaded, library, RouteConfig(method="glider"))
    router = Router(loaded, library, RouteConfig(method="oracle"))
    with pytest.raises(ConfigError, match="held-in task"):
        router.prepare(["ab:"], task="unknown-task")


def test_alpha_presets_and_auto_follow_the_best_global_score() -> None:
    from expertkit.route import ALPHA_PRESETS

    assert RouteConfig(alpha=0.3).alpha_for(0.9) == 0.3
    assert RouteConfig(alpha="held_out").alpha_for(0.9) == ALPHA_PRESETS["held_out"]
    auto = RouteConfig(alpha="auto", held_in_threshold=0.6)
    assert auto.alpha_for(0.61) == ALPHA_PRESETS["held_in"] and auto.alpha_for(0.59) == ALPHA_PRESETS["held_out"]
