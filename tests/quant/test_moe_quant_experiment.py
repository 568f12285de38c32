"""experiments/moe_quant.py --smoke: its systems as sweep cells give the models of the in-memory loop.

The cells read the Hessians, batches and blocks the driver saved under ``<out>/state`` and quantize a
fresh copy of the MoE; the loop they replaced quantized every system from the Hessians in memory. So
the direct path is recomputed here (one calibration pass, each system quantized from it) and its
numbers must equal the run's exactly. (Skipping finished cells is run_sweep's, tested in
tests/pipeline/test_sweep.py and through mc_smoe in tests/moe/compress/test_experiment.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from expertkit.pipeline.sweep import SweepError

from tests.scripts import load_script


ARGV = ["--smoke", "--policies", "block:attention", "--bits", "3", "--uniform-bits", "3"]


def test_smoke_cells_equal_the_in_memory_loop(tmp_path, monkeypatch, capsys):
    from expertkit.models import load_model
    from expertkit.quant.calibrate import calibrate
    from expertkit.quant.data import calibration_batches
    from expertkit.quant.targets import find_targets
    from expertkit.tasks.perplexity import block_nll, heldout_blocks

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    exp = load_script("experiments/moe_quant.py")
    argv = [*ARGV, "--out", str(tmp_path / "mq")]
    res = exp.main(argv)
    run = tmp_path / "mq_smoke"
    assert list(res["systems"]) == ["fp", "rtn-3", "gptq-3", "block:attention@3"]
    assert res["selected"] == "block:attention@3"
    cells = sorted(p.name for p in (run / "cells").iterdir())
    assert cells == sorted(["rtn-3.json", "gptq-3.json", "block_attention@3.json", "acc-rtn-3.json",
                            "acc-gptq-3.json", "acc-block_attention@3.json"])
    assert "block:attention@3 has lower test NLL than gptq-3:" in capsys.readouterr().out

    # the run's code store (GPTQ only): every matrix solved once at 3 bits (the mix's 3-bit matrices are those),
    # the mix's 2- and 4-bit ones under keys of their own
    n_targets = len(find_targets(load_model(str(run / "tiny-moe")).model))
    per_key = sorted(len(list(k.glob("*.safetensors"))) for k in (run / "state" / "codes").glob("*/*/"))
    assert per_key[-1] == n_targets and len(per_key) == 3 and 0 < sum(per_key[:2]) < n_targets

    # the direct path: one calibration pass in memory, every system quantized from it (the loop before cells),
    # with no code store: every matrix solved again
    a = exp._args(argv)
    moe = run / "tiny-moe"
    loaded = load_model(str(moe))
    tok = loaded.tokenizer
    val_blocks = heldout_blocks(tok, split="validation", n_blocks=a.calib_blocks + a.val_blocks)[a.calib_blocks:]
    test_blocks = heldout_blocks(tok, split="test", n_blocks=a.test_blocks)
    batches = calibration_batches(tok, text_blocks=a.calib_blocks, tasks=a.tasks, prompts_per_task=a.prompts,
                                  split="validation", seed=a.seed)
    hessians = calibrate(loaded.model, batches, find_targets(loaded.model), min_tokens_per_expert=a.min_tokens)
    assert block_nll(loaded.model, test_blocks) == res["systems"]["fp"]["test_nll"]
    for name in ("gptq-3", "block:attention@3"):
        saved = res["systems"][name]
        q = exp._quantize(moe, a, saved["method"], saved["policy"], hessians, batches)
        assert q.report()["bits"]["achieved_bits"] == saved["bits"]
        assert block_nll(q.loaded.model, val_blocks) == saved["val_nll"]
        assert block_nll(q.loaded.model, test_blocks) == saved["test_nll"]
        scores = exp._accuracy(a, q.loaded, cache=False)
        assert len(scores) == 2 * a.n and float(np.mean(scores)) == res["accuracy"][name]

    # results are tied to the MoE's bytes: another MoE's results.json is refused, not mixed in
    saved = __import__("json").loads((run / "cells" / "gptq-3.json").read_text())
    assert saved["settings"]["moe_digest"] == res["moe_digest"]
    path = run / "results.json"
    path.write_text(path.read_text().replace(res["moe_digest"], "0" * 32))

    with pytest.raises(SweepError, match="another MoE"):
        exp.main(argv)


def test_on_grid_counts_quantized_matrices_only():
    """The auto-round cell's check: a matrix whose groups hold at most 2**bits values is on the grid."""
    import torch

    exp = load_script("experiments/moe_quant.py")
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    levels = torch.linspace(-1, 1, 8)  # 3-bit grid, one per group of 32
    model.layers[0].q = torch.nn.Linear(64, 8, bias=False)
    model.layers[0].q.weight.data = levels[torch.randint(0, 8, (8, 64), generator=gen)] * torch.tensor(
        [1.0, 2.0]).repeat_interleave(32)
    model.layers[0].router = torch.nn.Linear(64, 8, bias=False)
    model.layers[0].router.weight.data = w
    on, off = exp._on_grid(model, 3, 32)
    assert on == ["layers.0.q.weight"] and off == ["layers.0.router.weight"]
    assert exp._on_grid(model, 2, 32)[0] == []  # 8 levels do not fit 2 bits


def test_every_bit_point_leaves_room_both_ways():
    exp = load_script("experiments/moe_quant.py")
    assert [exp.choices(b) for b in (2.5, 3.0, 3.5, 4.0)] == [[2, 3, 4], [2, 3, 4], [3, 4, 5], [3, 4, 5]]
    assert exp.choices(2.0) == [2, 3]  # never below 2 bits


def test_sequential_systems_are_streamed_gptq_with_their_own_verdicts(tmp_path, monkeypatch, capsys):
    """--sequential: GPTQ-3 and the chosen mix quantized with layers_per_pass 1, each cell the model that
    quantize_model gives with that setting (not the shared-Hessian one), scored and compared."""
    from expertkit.models import load_model
    from expertkit.quant.run import quantize_model
    from expertkit.tasks.perplexity import block_nll

    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    exp = load_script("experiments/moe_quant.py")
    argv = [*ARGV, "--sequential", "--out", str(tmp_path / "mq")]
    res = exp.main(argv)
    run = tmp_path / "mq_smoke"
    assert {"gptq-3+seq", "block:attention@3+seq"} <= set(res["systems"])
    assert {"gptq-3_seq.json", "block_attention@3_seq.json"} <= {p.name for p in (run / "cells").iterdir()}
    out = capsys.readouterr().out
    assert "block:attention@3+seq has lower test NLL than gptq-3+seq" in out
    assert "closes >= 30% of the perplexity gap between gptq-3+seq" in out
    a = exp._args(argv)
    _h, batches, data = exp._shared(run / "state")
    seq = res["systems"]["gptq-3+seq"]
    q = quantize_model(exp._config(run / "tiny-moe", a, "gptq", seq["policy"], layers_per_pass=1),
                       load_model(str(run / "tiny-moe")), batches=batches)
    assert block_nll(q.loaded.model, data["test_blocks"]) == seq["test_nll"]
    assert seq["test_nll"] != res["systems"]["gptq-3"]["test_nll"]  # layer 1 saw layer 0's quantized outputs
    assert res["systems"]["block:attention@3+seq"]["bits"] == res["systems"]["block:attention@3"]["bits"]
    assert len(res["gap_closed_sequential"]) == 3
