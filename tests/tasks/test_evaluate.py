"""Evaluation: hand-computed log-likelihoods, batched vs reference generation, cache, Wilson interval."""

from __future__ import annotations

import json

import pytest
import torch

from expertkit.errors import ConfigError, InputTypeError
from expertkit.models.loader import LoadedModel
from expertkit.models.tiny import EOS_ID, tiny_model, tiny_tokenizer
from expertkit.tasks.base import Example, Task
from expertkit.tasks.evaluate import EvalResult, evaluate
from expertkit.tasks.infer import (
    _line_done,
    choice_logprobs,
    encode_continuations,
    encode_prompts,
    first_line,
    pad,
    shared_prefix_logprobs,
)
from expertkit.tasks.stats import wilson_interval


def exact(example: Example, prediction: str) -> float:
    return float(prediction.strip() == example.answer)


CHOICE_EXAMPLES = [
    Example("abc:", "x", ("x", "yz", "w")),
    Example("hello there:", "yz", ("x", "yz", "w")),
    Example("q", "w", ("x", "yz", "w")),
    Example("Q: 1+1=? A:", "2", ("2", "11", "10 ")),
    Example("zz top", "no", ("yes", "no")),
]
GEN_PROMPTS = ["abc:", "hello world:", "x", "Q: 12+3=?", "long prompt with words:", "k"]


def choice_task(examples: list[Example] = CHOICE_EXAMPLES) -> Task:
    return Task(
        "toy-choice", "toy", "choice", "test", "MIT", "tiny choice task",
        build=lambda split, n, seed: list(examples[:n]), scorer=exact,
    )


def gen_task(max_new_tokens: int = 6) -> Task:
    return Task(
        "toy-gen", "toy", "generate", "test", "MIT", "tiny generation task",
        build=lambda split, n, seed: [Example(p, "zz") for p in GEN_PROMPTS[:n]], scorer=exact,
        max_new_tokens=max_new_tokens,
    )


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=3), tiny_tokenizer()


# ------------------------------------------------------------------ Wilson interval
def test_wilson_hand_cases() -> None:
    lo, hi = wilson_interval(5, 10)
    # p = .5: centre .5, half = z/(1+z^2/n) * sqrt(.025 + z^2/400)
    assert lo == pytest.approx(0.236593, abs=1e-6) and hi == pytest.approx(0.763407, abs=1e-6)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / (10 + 3.841459), abs=1e-6)  # z^2/(n+z^2)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + 3.841459), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(81, 100)
    # by hand: denom 1.038415, centre .829207/1.038415 = .798533, half 1.887492 * sqrt(.001539 + .000096) = .076321
    assert (round(lo, 4), round(hi, 4)) == (0.7222, 0.8749)
    with pytest.raises(ConfigError):
        wilson_interval(11, 10)


# ------------------------------------------------------------------ choice tasks
def _reference_logprob(model, tok, prompt: str, cont: str) -> float:
    """Unbatched, unpadded: sum of log p(cont tokens | prompt) from one plain forward."""
    p = tok(prompt).input_ids
    c = tok(cont, add_special_tokens=False).input_ids
    ids = torch.tensor([p + c])  # (1, L)
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)  # (L, V)
    return sum(float(logp[len(p) - 1 + j, tok_id]) for j, tok_id in enumerate(c))


@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_choice_eval_equals_hand_computation(tiny, batch_size: int) -> None:
    model, tok = tiny
    expected_lp = [[_reference_logprob(model, tok, e.prompt, " " + c) for c in e.choices] for e in CHOICE_EXAMPLES]
    expected_pred = [e.choices[max(range(len(lp)), key=lp.__getitem__)] for e, lp in zip(CHOICE_EXAMPLES, expected_lp)]
    expected_acc = sum(p == e.answer for p, e in zip(expected_pred, CHOICE_EXAMPLES)) / len(CHOICE_EXAMPLES)

    res = evaluate(model, tok, choice_task(), n=5, batch_size=batch_size)
    assert res.predictions == expected_pred
    for got, want in zip(res.examples, expected_lp):
        assert got.choice_logprobs == pytest.approx(want, abs=1e-4)
    assert res.accuracy == pytest.approx(expected_acc)
    assert res.ci == pytest.approx(wilson_interval(expected_acc * 5, 5))
    assert res.n == 5 and res.scores == [float(p == e.answer) for p, e in zip(expected_pred, CHOICE_EXAMPLES)]
    assert not model.training


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral", "qwen2"])
def test_fast_paths_equal_reference_across_archs(arch: str) -> None:
    """Right-padded pairs and the shared-prefix KV-cache path both equal unbatched forwards."""
    model, tok = tiny_model(arch, seed=5), tiny_tokenizer()
    prompts = encode_prompts(tok, [e.prompt for e in CHOICE_EXAMPLES])
    conts = [encode_continuations(tok, [" " + c for c in e.choices]) for e in CHOICE_EXAMPLES]
    want = [[_reference_logprob(model, tok, e.prompt, " " + c) for c in e.choices] for e in CHOICE_EXAMPLES]
    shared = shared_prefix_logprobs(model, prompts, conts, 0, batch_size=3)
    pairs = [(p, c) for p, cs in zip(prompts, conts) for c in cs]
    flat = choice_logprobs(model, pairs, 0, batch_size=4)
    assert [x for row in shared for x in row] == pytest.approx([x for row in want for x in row], abs=1e-4)
    assert flat == pytest.approx([x for row in want for x in row], abs=1e-4)


def test_choice_all_right_and_all_wrong(tiny) -> None:
    """Answer = the model's own argmax gives accuracy 1; the worst choice gives 0."""
    model, tok = tiny
    best, worst = [], []
    for e in CHOICE_EXAMPLES:
        lp = [_reference_logprob(model, tok, e.prompt, " " + c) for c in e.choices]
        best.append(Example(e.prompt, e.choices[lp.index(max(lp))], e.choices))
        worst.append(Example(e.prompt, e.choices[lp.index(min(lp))], e.choices))
    assert evaluate(model, tok, choice_task(best), n=5, batch_size=3).accuracy == 1.0
    res = evaluate(model, tok, choice_task(worst), n=5, batch_size=3)
    assert res.accuracy == 0.0 and res.ci_low == 0.0


# ------------------------------------------------------------------ generation
def _reference_generate(model, tok, prompt: str, max_new: int) -> str:
    """Slow reference: no padding, no KV cache, full forward per token, argmax."""
    ids = tok(prompt).input_ids
    new: list[int] = []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]  # (V,)
        nxt = int(logits.argmax())
        if nxt == EOS_ID:
            break
        new.append(nxt)
        if _line_done(tok.decode(new, skip_special_tokens=True)):
            break
    return first_line(tok.decode(new, skip_special_tokens=True))


def test_batched_generation_equals_unbatched_reference(tiny) -> None:
    model, tok = tiny
    task = gen_task(max_new_tokens=6)
    expected = [_reference_generate(model, tok, p, 6) for p in GEN_PROMPTS]
    assert any(expected)  # the comparison is about real text
    batched = evaluate(model, tok, task, n=len(GEN_PROMPTS), batch_size=4)
    single = evaluate(model, tok, task, n=len(GEN_PROMPTS), batch_size=1)
    assert batched.predictions == expected
    assert single.predictions == expected


def test_generation_scores_with_task_scorer(tiny) -> None:
    model, tok = tiny
    preds = evaluate(model, tok, gen_task(), n=6, batch_size=6).predictions
    # a task whose answers are the model's own outputs for half of the prompts
    examples = [Example(p, preds[i] if i % 2 == 0 else "nope") for i, p in enumerate(GEN_PROMPTS)]
    task = Task(
        "toy-gen2", "toy", "generate", "t", "MIT", "d", lambda s, n, seed: examples[:n], exact, max_new_tokens=6
    )
    res = evaluate(model, tok, task, n=6, batch_size=4)
    assert res.scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] and res.accuracy == 0.5


def test_line_helpers_and_left_padding() -> None:
    assert first_line("\n  42 \nnext") == "42"
    assert first_line("  \n") == ""
    assert not _line_done("\n  ") and _line_done(" 7\n") and not _line_done(" 7")
    ids, mask = pad([[5, 6, 7], [8]], 0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[5, 6, 7], [8]], 0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------ cache
def test_cache_hit_does_not_run_the_model(tiny, tmp_path, monkeypatch) -> None:
    model, tok = tiny
    first = evaluate(model, tok, choice_task(), n=5, cache_dir=tmp_path, model_fingerprint="fp-a")
    assert not first.cached
    files = list(tmp_path.glob("eval-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"]["model"] == "fp-a"

    def boom(*args, **kwargs):
        raise AssertionError("the model ran on a cache hit")

    monkeypatch.setattr(model, "forward", boom)
    again = evaluate(model, tok, choice_task(), n=5, cache_dir=tmp_path, model_fingerprint="fp-a")
    assert again.cached and again.to_dict() == first.to_dict()
    # another key (n, seed, fingerprint) is a miss and runs the model
    for kwargs in ({"n": 4}, {"seed": 1}, {"model_fingerprint": "fp-b"}):
        with pytest.raises(AssertionError, match="cache hit"):
            evaluate(model, tok, choice_task(), **{"n": 5, "model_fingerprint": "fp-a", **kwargs}, cache_dir=tmp_path)


def test_cache_fingerprint_computed_from_weights(tmp_path) -> None:
    tok = tiny_tokenizer()
    a = evaluate(tiny_model("llama", seed=1), tok, choice_task(), n=3, cache_dir=tmp_path)
    b = evaluate(tiny_model("llama", seed=2), tok, choice_task(), n=3, cache_dir=tmp_path)
    c = evaluate(tiny_model("llama", seed=1), tok, choice_task(), n=3, cache_dir=tmp_path)
    assert a.model_fingerprint != b.model_fingerprint and not b.cached and c.cached
    assert EvalResult.from_dict(a.to_dict()).to_dict() == a.to_dict()


def test_cache_tells_apart_models_that_differ_only_in_unsampled_tensors(tmp_path) -> None:
    """The sampled fingerprint reads 8 tensors; a model changed elsewhere (routers trained alone,
    weights edited in memory after loading) must not get the other model's cached scores."""
    from expertkit.weights.fingerprint import fingerprint, sampled_names

    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=1)
    state = model.state_dict()
    unsampled = next(n for n in sorted(state) if n not in sampled_names({k: tuple(v.shape) for k, v in state.items()}))
    loaded = LoadedModel("tiny", model, tok, None, fingerprint(state))
    first = evaluate(loaded, None, choice_task(), n=5, cache_dir=tmp_path)
    before = fingerprint(model.state_dict())
    with torch.no_grad():
        model.get_parameter(unsampled).mul_(-3.0)  # edited in memory after loading
    assert fingerprint(model.state_dict()) == before  # the sampled fingerprint cannot see it
    second = evaluate(loaded, None, choice_task(), n=5, cache_dir=tmp_path)
    assert not second.cached and second.model_fingerprint != first.model_fingerprint
    assert evaluate(loaded, None, choice_task(), n=5, cache_dir=tmp_path).cached  # unchanged again: a hit


def test_content_digest_reads_every_byte_and_shares_tied_tensors() -> None:
    from expertkit.weights.fingerprint import content_digest

    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base = content_digest({"a": w, "b": torch.ones(2)})
    assert base == content_digest({"b": torch.ones(2), "a": w.clone()})  # order and storage do not matter
    changed = w.clone()
    changed[2, 3] += 1
    assert content_digest({"a": changed, "b": torch.ones(2)}) != base
    assert content_digest({"a": w.to(torch.bfloat16), "b": torch.ones(2)}) != base  # dtype
    assert content_digest({"a": w.reshape(4, 3), "b": torch.ones(2)}) != base  # shape
    assert content_digest({"a": w, "b": torch.ones(2)}, extra="top_k=2") != base  # config
    tied = {"emb": w, "head": w}
    assert content_digest(tied) == content_digest({"emb": w, "head": w.clone()})


# ------------------------------------------------------------------ inputs
def test_loaded_model_and_bad_inputs(tiny) -> None:
    model, tok = tiny
    loaded = LoadedModel("tiny", model, tok, None, None)
    assert evaluate(loaded, None, choice_task(), n=2).n == 2
    with pytest.raises(InputTypeError):
        evaluate(model, None, choice_task(), n=2)
    with pytest.raises(ConfigError):
        evaluate(model, tok, choice_task(), n=0)
    no_choices = choice_task([Example("abc", "x")])
    with pytest.raises(ConfigError, match="no choices"):
        evaluate(model, tok, no_choices, n=1)


def test_restores_training_mode(tiny) -> None:
    model, tok = tiny
    model.train()
    try:
        evaluate(model, tok, gen_task(), n=2)
        assert model.training
    finally:
        model.eval()


def test_toy_tasks_are_deterministic_and_disjoint_by_split():
    from expertkit.tasks.toy import copy_task, lohi_task

    for task in (copy_task(), lohi_task()):
        assert task.examples("train", 20, 0) == task.examples("train", 20, 0)
        assert task.examples("train", 20, 0) != task.examples("test", 20, 0)
        for ex in task.examples("test", 20, 0):
            assert task.score(ex, ex.answer + "\n") == 1.0 and task.score(ex, "zz") == 0.0
