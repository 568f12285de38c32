"""Prompt- and prefix-tuned adapters from ``expertkit train`` are scored on the real tokens by evaluation."""

from __future__ import annotations

import warnings

import pytest
import torch

from expertkit.models.loader import load_model
from expertkit.tasks.base import Example, Task
from expertkit.tasks.evaluate import evaluate
from expertkit.tasks.infer import encode_continuations, encode_prompts, prepends_virtual_tokens

# prompts of different lengths (padding) and multi-token choices (the cached continuation path)
EXAMPLES = [
    Example("abc:", "x", ("x", "yz w", "w")),
    Example("hello there, a longer prompt:", "yz w", ("x", "yz w", "w")),
    Example("q", "w", ("x", "yz w", "w")),
]
TASK = Task("toy-choice", "toy", "choice", "test", "MIT", "tiny choice task",
            build=lambda split, n, seed: list(EXAMPLES[:n]), scorer=lambda e, p: float(p == e.answer))


def by_hand(model: torch.nn.Module, tokenizer) -> list[list[float]]:
    """Summed log p(choice | prompt), one unpadded sequence at a time, from the full logits."""
    out = []
    prompts = encode_prompts(tokenizer, [TASK.format_prompt(e) for e in EXAMPLES])
    for ex, p in zip(EXAMPLES, prompts):
        row = []
        for c in encode_continuations(tokenizer, [" " + ch for ch in ex.choices]):
            ids = torch.tensor([p + c])  # (1, L)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (1, P + L, V)
            real = logits[0, logits.shape[1] - ids.shape[1] :]  # (L, V): the real tokens' logits
            lp = torch.log_softmax(real[:-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # (L-1,)
            row.append(float(lp[len(p) - 1 :].sum()))
        out.append(row)
    return out


@pytest.mark.parametrize("scheme,extra", [("prompt", 4), ("prefix", 0)])
def test_trained_adapter_is_scored_on_the_real_tokens(scheme, extra, tiny_checkpoint, tmp_path, cli) -> None:
    from peft import PeftModel

    folder = tiny_checkpoint("llama")
    out = tmp_path / scheme
    code, _, err = cli(["--quiet", "train", "leap_year", str(out), "--model", str(folder), "--optimizer", "zo-sgd",
                        "--scheme", scheme, "--steps", "2", "--batch-size", "2", "--virtual-tokens", "4"])
    assert code == 0, err
    lm = load_model(folder)
    base_scores = by_hand(lm.model, lm.tokenizer)
    res = evaluate(lm.model, lm.tokenizer, TASK, n=3, adapter=out, batch_size=2)  # and the model is given back
    assert by_hand(lm.model, lm.tokenizer) == base_scores

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(load_model(folder).model, str(out)).eval()
    ids = torch.tensor([[5, 6, 7]])
    assert peft_model(input_ids=ids).logits.shape[1] == 3 + extra  # prompt tuning adds positions
    assert prepends_virtual_tokens(peft_model) == (scheme == "prompt")
    expected = by_hand(peft_model, lm.tokenizer)
    assert max(abs(a - b) for r, s in zip(expected, base_scores) for a, b in zip(r, s)) > 1e-3  # adapter matters
    for got, want in zip(res.examples, expected):
        assert got.choice_logprobs == pytest.approx(want, abs=1e-4)


def test_prompt_tuned_generation_matches_step_by_step_greedy() -> None:
    from peft import PromptTuningConfig, get_peft_model

    from expertkit.models.tiny import EOS_ID, tiny_model, tiny_tokenizer
    from expertkit.tasks.infer import first_line, greedy_generate

    tok = tiny_tokenizer()
    torch.manual_seed(0)  # the virtual tokens' random initialisation
    model = get_peft_model(tiny_model("llama", seed=3), PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model.eval()
    prompts = encode_prompts(tok, ["abc:", "hello world, a longer one:", "x"])
    expected = []
    for p in prompts:  # no cache, no padding: PEFT's forward puts the virtual tokens first every time
        ids = list(p)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == EOS_ID:
                break
        expected.append(first_line(tok.decode(ids[len(p) :], skip_special_tokens=True)))
    assert greedy_generate(model, tok, prompts, 6, batch_size=3) == expected  # left-padded batch
    assert [greedy_generate(model, tok, [p], 6, batch_size=1)[0] for p in prompts] == expected
