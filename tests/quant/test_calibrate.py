"""Calibration Hessians: exactly the routed tokens per expert, the counts the routing statistics give, and balance."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from expertkit.models.tiny import tiny_model, tiny_tokenizer
from expertkit.moe.collect import collect_routing_stats
from expertkit.quant.apply import quantize_targets
from expertkit.quant.budget import Format
from expertkit.quant.calibrate import Calibration, calibrate, expert_token_table
from expertkit.quant.targets import find_targets
from expertkit.tasks.infer import encode_prompts, pad

PROMPTS = ["hello world, this is calibration", "abc", "the quick brown fox jumps over", "MoE 123 + 456 = ?"]


def _batches(tok, prompts=PROMPTS, size=2):
    out = []
    for i in range(0, len(prompts), size):
        out.append(pad(encode_prompts(tok, prompts[i:i + size]), tok.pad_token_id, side="right"))
    return out


def test_plain_linear_hessian_is_the_gram_of_its_real_inputs():
    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    batches = _batches(tok)
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    calib = calibrate(model, batches, find_targets(model))
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1])[m.reshape(-1).bool()] for s, (_, m) in zip(seen, batches, strict=True)])
    torch.testing.assert_close(calib.hessians["model.layers.1.mlp.down_proj"], x.T @ x, rtol=1e-5, atol=1e-5)
    assert calib.tokens["model.layers.1.mlp.down_proj"] == sum(int(m.sum()) for _, m in batches)


def test_expert_hessians_see_exactly_their_routed_tokens_and_counts_match_routing_stats():
    model, tok = tiny_model("mixtral", seed=2), tiny_tokenizer()
    batches = _batches(tok)
    routers = []
    handle = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, i, o: routers.append((i[0], o[2])))
    calib = calibrate(model, batches, find_targets(model))
    handle.remove()
    experts = model.model.layers[0].mlp.experts
    h_in = {e: 0 for e in range(4)}
    h_mid = {e: 0 for e in range(4)}
    for (x, idx), (_, mask) in zip(routers, batches, strict=True):
        real = mask.reshape(-1).bool()
        for e in range(4):
            xe = x[((idx == e).any(-1)) & real]  # (n_e, H) tokens routed to e, by the router's own choice
            gate, up = F.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
            mid = F.silu(gate) * up  # Mixtral's expert: down(silu(w1 x) * w3 x)
            h_in[e] = h_in[e] + xe.T @ xe
            h_mid[e] = h_mid[e] + mid.T @ mid
    for e in range(4):
        torch.testing.assert_close(calib.hessians[f"model.layers.0.mlp.experts[{e}].in"], h_in[e], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(calib.hessians[f"model.layers.0.mlp.experts[{e}].mid"], h_mid[e], rtol=1e-4, atol=1e-4)
    prompts = {"calib": PROMPTS}
    stats = collect_routing_stats(model, tok, prompts, batch_size=2, sample_tokens=0)
    assert np.array_equal(np.array(list(calib.routed.values())), stats.counts)


def test_balance_tops_up_rare_experts_with_their_highest_logit_tokens():
    model, tok = tiny_model("mixtral", seed=2), tiny_tokenizer()
    batches = _batches(tok)
    total = sum(int(m.sum()) for _, m in batches)
    full = calibrate(model, batches, find_targets(model), min_tokens_per_expert=10 * total)
    for e in range(4):  # every expert topped up with every token it missed: all see the whole layer input
        assert full.tokens[f"model.layers.1.mlp.experts[{e}].in"] == total
    torch.testing.assert_close(full.hessians["model.layers.1.mlp.experts[0].in"],
                               full.hessians["model.layers.1.mlp.experts[3].in"], rtol=1e-4, atol=1e-4)
    routed = np.array(full.routed["model.layers.1.mlp.experts"])
    n = int(routed.max())
    some = calibrate(model, batches, find_targets(model), min_tokens_per_expert=n)
    table = expert_token_table(some)
    assert table.min() == n and np.array_equal(np.array(some.routed["model.layers.1.mlp.experts"]), routed)
    assert some.added["model.layers.1.mlp.experts"] == (n - routed).tolist()
    # the added tokens of the rarest expert are its highest-logit unrouted tokens
    rare = int(routed.argmin())
    logits, hidden = [], []

    def grab(_m, i, o):  # a forward hook must return None, or it replaces the router's output
        logits.append(o[0])
        hidden.append((i[0], o[2]))

    handle = model.model.layers[1].mlp.gate.register_forward_hook(grab)
    calibrate(model, batches, [])
    handle.remove()
    cand_x, cand_s = [], []
    for lg, (x, idx), (_, mask) in zip(logits, hidden, batches, strict=True):
        keep = mask.reshape(-1).bool() & ~(idx == rare).any(-1)
        cand_x.append(x[keep])
        cand_s.append(lg[keep, rare])
    cx, cs = torch.cat(cand_x), torch.cat(cand_s)
    top = cx[torch.topk(cs, n - int(routed[rare])).indices]
    routed_x = torch.cat([x[mask.reshape(-1).bool() & (idx == rare).any(-1)] for (x, idx), (_, mask) in
                          zip(hidden, batches, strict=True)])
    want = routed_x.T @ routed_x + top.T @ top
    torch.testing.assert_close(some.hessians[f"model.layers.1.mlp.experts[{rare}].in"], want, rtol=1e-4, atol=1e-4)


def test_an_expert_no_token_reaches_is_rounded_unless_balanced():
    model, tok = tiny_model("deepseek_v3", seed=0), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[3] = -1e9  # V3 chooses by score + bias: never 3
    targets = find_targets(model)
    batches = _batches(tok)
    natural = calibrate(model, batches, targets)
    assert natural.routed["model.layers.1.mlp.experts"][3] == 0
    assert "model.layers.1.mlp.experts[3].in" not in natural.hessians
    bits = {t.name: 4 for t in targets}
    recs = quantize_targets(model, targets, bits, Format(16, True), hessian=natural.hessians.get)
    assert {r.method for n, r in recs.items() if "experts.gate_up_proj[3]" in n} == {"rtn-no-tokens"}
    assert {r.method for n, r in recs.items() if "experts.gate_up_proj[0]" in n} == {"gptq"}
    model2 = tiny_model("deepseek_v3", seed=0)
    with torch.no_grad():
        model2.model.layers[1].mlp.gate.e_score_correction_bias[3] = -1e9
    balanced = calibrate(model2, batches, find_targets(model2), min_tokens_per_expert=12)
    assert balanced.added["model.layers.1.mlp.experts"][3] == 12 and balanced.tokens["model.layers.1.mlp.experts[3].mid"] == 12


def test_hessians_save_and_load_round_trip(tmp_path):
    model, tok = tiny_model("qwen2_moe", seed=0), tiny_tokenizer()
    calib = calibrate(model, _batches(tok), find_targets(model), min_tokens_per_expert=5)
    back = Calibration.load(calib.save(tmp_path / "h.safetensors"))
    assert back.tokens == calib.tokens and back.routed == calib.routed and back.added == calib.added
    assert all(torch.equal(back.hessians[k], v) for k, v in calib.hessians.items())
    assert "model.layers.0.mlp.shared_expert.down_proj" in back.hessians  # the shared expert sees every token


def test_chunked_calibration_quantizes_a_layer_at_a_time_with_the_same_first_layer(tmp_path, monkeypatch):
    from expertkit.quant.config import QuantizeConfig
    from expertkit.quant.run import quantize_model
    from expertkit.models.tiny import save_tiny

    folder = save_tiny("mixtral", tmp_path / "m", seed=4)
    base = {"model": str(folder), "group_size": 32, "calibration": {"text_blocks": 0, "tasks": ["add_sub"],
                                                                     "prompts_per_task": 4}}
    one = quantize_model(QuantizeConfig.model_validate(base))
    two = quantize_model(QuantizeConfig.model_validate({**base, "calibration": {**base["calibration"],
                                                                                 "layers_per_pass": 1}}))
    a, b = one.loaded.model.state_dict(), two.loaded.model.state_dict()
    assert torch.equal(a["model.layers.0.mlp.experts.down_proj"], b["model.layers.0.mlp.experts.down_proj"])
    # layer 1's inputs come through the quantized layer 0 in the chunked run: its Hessians, and so its codes, differ
    assert not torch.equal(a["model.layers.1.mlp.experts.down_proj"], b["model.layers.1.mlp.experts.down_proj"])
    first = "model.layers.0.mlp.experts"
    assert one.report()["tokens_per_expert"][first] == two.report()["tokens_per_expert"][first]
    for run in (one, two):  # each layer's report is from the pass its Hessians came from
        for module, v in run.report()["tokens_per_expert"].items():
            seen = [run.calibration.tokens.get(f"{module}[{e}].in", 0) for e in range(4)]
            assert seen == [r + a for r, a in zip(v["routed"], v["added"], strict=True)]
    # ending each pass after the chunk's last layer changes nothing: the same codes as full passes
    import expertkit.quant.run as run_module

    monkeypatch.setattr(run_module, "last_layer", lambda *a, **k: None)
    full = quantize_model(QuantizeConfig.model_validate({**base, "calibration": {**base["calibration"],
                                                                                  "layers_per_pass": 1}}))
    c = full.loaded.model.state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b) and full.report()["tokens_per_expert"] == two.report()["tokens_per_expert"]


def test_recorded_layer_errors_are_the_relative_output_errors_and_gptq_beats_rtn():
    from expertkit.quant.gptq import layer_error

    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    targets = find_targets(model)
    originals = {t.name: t.read(model) for t in targets}
    calib = calibrate(model, _batches(tok), targets)
    recs = quantize_targets(model, targets, {t.name: 3 for t in targets}, Format(16, True), hessian=calib.hessians.get)
    for t in targets:
        w, h, r = originals[t.name], calib.hessians[t.hessian], recs[t.name]
        want = layer_error(w, t.read(model), h) / layer_error(w, torch.zeros_like(w), h)
        assert r.method == "gptq" and abs(r.error - want) <= 1e-4 * want
        assert r.error <= r.rtn_error


def test_a_pass_stopped_after_a_layer_gives_the_same_hessians_up_to_it_and_runs_nothing_after():
    from expertkit.quant.calibrate import last_layer

    model, tok = tiny_model("mixtral", seed=5), tiny_tokenizer()
    batches, targets = _batches(tok), find_targets(model)
    assert last_layer(model, targets) == "model.layers.1"
    assert last_layer(model, targets, {(targets[0].stack, 0)}) == "model.layers.0"
    full = calibrate(model, batches, targets, min_tokens_per_expert=6)
    ran = []
    handles = [model.model.layers[1].register_forward_pre_hook(lambda m, i: ran.append("layer 1")),
               model.lm_head.register_forward_pre_hook(lambda m, i: ran.append("head"))]
    first = {(targets[0].stack, 0)}
    cut = calibrate(model, batches, targets, min_tokens_per_expert=6, layers=first, stop_after="model.layers.0")
    whole = calibrate(model, batches, targets, min_tokens_per_expert=6, stop_after=last_layer(model, targets))
    for h in handles:
        h.remove()
    assert ran.count("head") == 0 and ran.count("layer 1") == len(batches)  # only the second pass reached layer 1
    layer0 = [k for k in full.hessians if k.startswith("model.layers.0.")]
    assert layer0 and sorted(cut.hessians) == sorted(layer0)
    for k in layer0:
        assert torch.equal(cut.hessians[k], full.hessians[k]) and cut.tokens[k] == full.tokens[k]
    assert sorted(whole.hessians) == sorted(full.hessians)
    assert all(torch.equal(whole.hessians[k], v) for k, v in full.hessians.items())
    assert whole.routed == full.routed and whole.added == full.added
    assert cut.routed["model.layers.1.mlp.experts"] == [0, 0, 0, 0]  # layer 1 never ran on the cut pass


def test_last_layer_is_none_across_an_encoder_and_a_decoder():
    from expertkit.quant.calibrate import last_layer

    model = tiny_model("t5", seed=0)
    targets = find_targets(model)
    assert len({t.stack for t in targets}) == 2 and last_layer(model, targets) is None
