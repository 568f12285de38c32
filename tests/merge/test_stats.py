"""Calibration statistics (diagonal Fisher, Gram matrices) and the merges that use them."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from expertkit.merge import MergeConfig, merge_state_dicts, run_merge
from expertkit.merge.stats import diagonal_fisher, gram_matrices
from expertkit.weights import Checkpoint, save_state_dict


class TinyLM(torch.nn.Module):
    """Embedding -> Linear -> vocabulary logits: enough to check the statistics by hand."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(6, 3)
        self.proj = torch.nn.Linear(3, 6, bias=False)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(6, 3, generator=g))
            self.proj.weight.copy_(torch.randn(6, 3, generator=g))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.proj(self.emb(input_ids)))


ROWS = [([1, 2], [3]), ([4], [5, 1])]  # (prompt ids, target ids); pad id 0


def test_gram_matrices_are_x_transpose_x_over_real_tokens():
    model = TinyLM(0)
    grams = gram_matrices(model, ROWS, pad_id=0, batch_size=1)
    tokens = torch.tensor([1, 2, 3, 4, 5, 1])
    x = model.emb.weight.detach()[tokens]  # (6, 3)
    torch.testing.assert_close(grams["proj.weight"], x.T @ x)
    padded = gram_matrices(model, ROWS, pad_id=0, batch_size=2)  # padding must not count
    torch.testing.assert_close(padded["proj.weight"], x.T @ x)


def test_diagonal_fisher_is_the_mean_squared_gradient_of_the_log_likelihood():
    model = TinyLM(1)
    fisher = diagonal_fisher(model, ROWS, pad_id=0)
    expect = torch.zeros(6, 3)
    for prompt, target in ROWS:
        ids = torch.tensor([prompt + target])
        w = model.proj.weight.detach().clone().requires_grad_(True)
        logits = model.emb(ids) @ w.T  # (1, L, 6)
        logp = torch.log_softmax(logits[0, :-1], -1)  # (L-1, 6)
        ll = sum(logp[i - 1, ids[0, i]] for i in range(len(prompt), ids.shape[1]))
        (grad,) = torch.autograd.grad(ll, w)
        expect += grad.square() / len(ROWS)
    torch.testing.assert_close(fisher["proj.weight"], expect)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_regmean_solves_the_least_squares_problem_of_every_models_outputs():
    models = [TinyLM(s) for s in (2, 3)]
    rows = [[([1, 2, 3], [4])], [([5, 1], [2, 2])]]  # each model has its own calibration data
    grams = [gram_matrices(m, r, 0) for m, r in zip(models, rows, strict=True)]
    sds = [{"proj.weight": m.proj.weight.detach()} for m in models]
    out = merge_state_dicts("regmean", sds, stats=grams, params={"alpha": 1.0, "ridge": 0.0})["proj.weight"]
    # the gradient of sum_i |X_i W^T - X_i W_i^T|^2 vanishes: sum_i (W - W_i) G_i = 0
    residual = sum((out.double() - sd["proj.weight"].double()) @ g["proj.weight"].double()
                   for sd, g in zip(sds, grams, strict=True))
    assert residual.abs().max() < 1e-4


def test_fisher_merge_reads_statistics_named_in_the_config(tmp_path, tiny_checkpoint):
    a, b = tiny_checkpoint("llama", 0), tiny_checkpoint("llama", 1)
    with Checkpoint(a) as ca, Checkpoint(b) as cb:
        sds = [dict(ca.iter_tensors()), dict(cb.iter_tensors())]
    g = torch.Generator().manual_seed(0)
    stats = [{k: torch.rand(v.shape, generator=g) for k, v in sd.items()} for sd in sds]
    for i, st in enumerate(stats):
        save_state_dict(st, tmp_path / f"stats{i}")
    cfg = MergeConfig.model_validate({"merge_method": "fisher", "models": [
        {"model": str(p), "stats": str(tmp_path / f"stats{i}")} for i, p in enumerate((a, b))]})
    out = run_merge(cfg, tmp_path / "out", progress=False)
    ref = merge_state_dicts("fisher", sds, stats=stats)
    with Checkpoint(out) as ck:
        assert all(torch.equal(ck.read(k), ref[k]) for k in ref)
