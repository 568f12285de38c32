"""Signed federated LoRA at small scale: signing costs no accuracy and stops a malicious client.

    .venv/bin/python experiments/fl_pqc.py [--task family_relation] [--clients 3] [--rounds 3]
        [--local-steps 4] [--batch-size 4] [--lr 0.01] [--eval-n 0] [--scheme ml-dsa-65]
        [--attack {tamper,replay}] [--scale 0.2] [--out runs/experiments/fl_pqc] [--smoke]

Five federated runs of the bundled SmolLM2-135M-Instruct, each client fine-tuning LoRA (q/v,
rank 4, one torch thread) on its own IID shard of the task, FedAvg, the inline engine (clients in turn in one
process, identical arithmetic in every run):

1. honest, signed (ML-DSA-65 by default)     2. honest, unsigned
3. one attacked client, signed               4. the same attacker, unsigned
5. honest clients only, signed: client 1 takes no part (``exclude_clients: [1]``); clients 0 and 2
   keep exactly the shards, seeds and keys they have in the other runs, FedAvg over them every round.

The attacker sits on client 1's link after its signing step: ``tamper`` adds Gaussian noise
(std ``--scale``, default 0.2) to every LoRA tensor of its update each round; ``replay`` (``--attack
replay``) resends its first-round update later. Every run evaluates its own initial adapter (round 0)
and its global adapter after the last round on the same ``--eval-n`` test examples (seed 0), per
example, so that runs are compared by paired tests (exact McNemar, paired bootstrap interval of the
difference; :mod:`expertkit.tasks.paired`).

Claims checked:

* signing changes nothing: (1) == (2) bit for bit (every tensor);
* round 0 is the same adapter in every run (seeded LoRA init): the same prediction on every example;
* the explanation of (3) < (1), "the attacker's updates are all dropped, so the run trains on the
  honest clients' data only": (3) == (5) bit for bit. This is expected exactly, not approximately:
  the excluded client stays a node that answers with an error reply, so the server samples the same
  nodes in the same order in both runs; the rejected update and the error reply never reach FedAvg;
  the surviving updates are computed from the same global adapter with the same shards and seeds,
  weighted by the same example counts, and summed in the same order. (With ``--attack replay`` the
  round-1 update is accepted, so (3) != (5) there and the check says so.)
* (1) vs (3): does losing client 1 cost accuracy; (3) vs (4): signing keeps the attacker out, the
  unsigned run is harmed; (3) vs (5): no difference (0 discordant pairs when bit for bit equal);
  each run against its own round 0.

Why n = 300 by default (``--eval-n 0``): the gap to detect is about 10 points (honest 0.662 against
signed-with-attacker 0.562 at n = 80 in the first run); with 30% of pairs discordant,
``mcnemar_sample_size(0.10, 0.30)`` = 234 pairs detect it at power 0.8, alpha 0.05; 300 keeps a margin
(the attacker's 20-point harm needs 57). family_relation is generated, so its test split has no limit.

Writes ``<out>/<run>/result.json`` and ``global_lora.safetensors`` per run (an interrupted experiment
resumes: a run whose saved config matches is read back, not rerun), ``<out>/results.json``, and
prints the markdown for docs/results.md. ``--smoke`` runs the whole script on a tiny random Llama and a
toy task in seconds (a check of the script, not a result).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = ("honest-signed", "honest-unsigned", "attacker-signed", "attacker-unsigned", "honest-only-signed")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="family_relation")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--examples-per-client", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval-n", type=int, default=0, help="test examples scored in every run (paired); "
                    "0: max(300, mcnemar_sample_size(0.10, 0.30))")
    ap.add_argument("--scheme", default="ml-dsa-65")
    ap.add_argument("--attack", default="tamper", choices=["tamper", "replay"])
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=None, help="default: runs/experiments/fl_pqc (smoke: a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, toy task, tiny n: checks the script")
    a = ap.parse_args(argv)
    if a.clients < 2:
        ap.error("--clients must be at least 2 (client 1 is the attacked and the excluded one)")
    if a.smoke:
        a.model, a.task, a.rounds, a.local_steps, a.examples_per_client, a.eval_n = "tiny:llama", "toy:lohi", 2, 2, 16, 16
        a.out = a.out or Path(tempfile.mkdtemp(prefix="fl-pqc-smoke-"))
    if not a.eval_n:
        from expertkit.tasks.paired import mcnemar_sample_size

        a.eval_n = max(300, mcnemar_sample_size(0.10, 0.30))
    a.out = a.out or Path("runs/experiments/fl_pqc")
    return a


def run_configs(a: argparse.Namespace) -> dict[str, Any]:
    """The :class:`FlConfig` of each run, keyed by run name (also its folder under ``--out``)."""
    from expertkit.federated.config import FlConfig

    base = dict(model=a.model, task=a.task, clients=a.clients, rounds=a.rounds, split="iid",
                examples_per_client=a.examples_per_client, local_steps=a.local_steps, batch_size=a.batch_size, lr=a.lr,
                rank=4, alpha=8, threads=1, eval_n=a.eval_n, eval_rounds="last", eval_initial=True, engine="inline",
                output_dir=str(a.out))
    signed, unsigned = {"scheme": a.scheme}, {"scheme": "none"}
    attack = {"kind": a.attack, "client": 1, "scale": a.scale}
    extra = {
        "honest-signed": dict(signing=signed),
        "honest-unsigned": dict(signing=unsigned),
        "attacker-signed": dict(signing=signed, attack=attack),
        "attacker-unsigned": dict(signing=unsigned, attack=attack),
        "honest-only-signed": dict(signing=signed, exclude_clients=[1]),
    }
    return {name: FlConfig.model_validate({**base, **extra[name], "name": name}) for name in RUNS}


def labels(a: argparse.Namespace) -> dict[str, str]:
    """The table label of each run."""
    return {"honest-signed": "honest, signed", "honest-unsigned": "honest, unsigned",
            "attacker-signed": f"{a.attack} attacker, signed", "attacker-unsigned": f"{a.attack} attacker, unsigned",
            "honest-only-signed": "honest clients only (client 1 excluded), signed"}


def run_one(cfg: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(result, final LoRA state)`` of one run; read back from its folder when its config matches."""
    from safetensors.numpy import load_file

    from expertkit.federated.simulate import simulate, write_result

    folder = Path(cfg.output_dir) / cfg.name
    saved = folder / "result.json"
    if saved.is_file() and (folder / "global_lora.safetensors").is_file():
        res = json.loads(saved.read_text())
        if res.get("config") == cfg.model_dump(mode="json") and "eval_examples" in res:
            res["cached"] = True
            return res, load_file(str(folder / "global_lora.safetensors"))
    started = time.perf_counter()
    res = simulate(cfg, write=False)
    res["wall_seconds"] = time.perf_counter() - started
    write_result(folder, res)
    state = res.pop("final_state")
    return res, state


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Every LoRA tensor equal, bit for bit."""
    import numpy as np

    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def claims(a: argparse.Namespace, results: dict[str, Any], states: dict[str, Any]) -> dict[str, Any]:
    """The checks and paired tests, JSON-ready, with one verdict line each."""
    from expertkit.tasks.paired import compare, verdict

    last = str(a.rounds)
    scores = {k: r["eval_examples"][last]["scores"] for k, r in results.items()}
    preds0 = {k: r["eval_examples"]["0"]["predictions"] for k, r in results.items()}
    out: dict[str, Any] = {}
    out["round0_same_predictions"] = all(p == preds0[RUNS[0]] for p in preds0.values())
    out["round0_accuracy"] = {k: r["accuracy"]["0"] for k, r in results.items()}
    out["honest_signed_equals_unsigned_bitwise"] = same_state(states["honest-signed"], states["honest-unsigned"])
    out["attacker_signed_equals_honest_only_bitwise"] = same_state(states["attacker-signed"], states["honest-only-signed"])
    out["vs_round0"] = {k: compare(r["eval_examples"][last]["scores"], r["eval_examples"]["0"]["scores"]).as_dict()
                        for k, r in results.items()}
    tests = {
        "attacker_costs_signed_run": ("honest-signed", "attacker-signed",
                                      "the attacker costs the signed run accuracy (honest signed beats signed with attacker)"),
        "signing_protects": ("attacker-signed", "attacker-unsigned",
                             "signing keeps the attacker out (signed with attacker beats unsigned with attacker)"),
    }
    lines = []
    for key, (x, y, claim) in tests.items():
        r = compare(scores[x], scores[y])
        out[key] = r.as_dict()
        lines.append(verdict(claim, r))
    r = compare(scores["attacker-signed"], scores["honest-only-signed"])
    out["attacker_signed_vs_honest_only"] = r.as_dict()
    bitwise = out["attacker_signed_equals_honest_only_bitwise"]
    agree = sum(p == q for p, q in zip(results["attacker-signed"]["eval_examples"][last]["predictions"],
                                       results["honest-only-signed"]["eval_examples"][last]["predictions"], strict=True))
    word = ("supported (the same global adapter, bit for bit)" if bitwise else
            "contradicted (a paired difference)" if r.p_value < 0.05 else
            "not shown bit for bit (no paired difference detected)")
    lines.append(f"the signed run with an attacker trains on the honest clients' data only (equals the run with "
                 f"client 1 excluded): {word}; the same prediction on {agree} of {r.n} examples, difference "
                 f"{r.diff:+.3f}, exact McNemar p = {r.p_value:.2g} ({r.a_only} vs {r.b_only} discordant).")
    out["verdicts"] = lines
    return out


def report(a: argparse.Namespace, results: dict[str, Any], found: dict[str, Any]) -> str:
    """The markdown for docs/results.md."""
    from expertkit.tasks.paired import mcnemar_sample_size
    from expertkit.tasks.stats import wilson_interval

    n, last, names = a.eval_n, str(a.rounds), labels(a)
    rows = [f"Task {a.task}, {a.clients} clients x {a.examples_per_client} training examples, {a.rounds} rounds x "
            f"{a.local_steps} local steps (batch {a.batch_size}, lr {a.lr:g}), scheme {a.scheme}, attacker on client 1 "
            f"({a.attack}" + (f", noise std {a.scale:g}" if a.attack == "tamper" else "") + f"); n = {n} test examples, "
            "the same in every run (paired):", "",
            f"| run | round 0 | after round {last} [95% CI] | vs its own round 0 (exact McNemar p) | updates dropped | reported |",
            "|---|---:|---:|---:|---:|---|"]
    for key, r in results.items():
        acc0, acc = r["accuracy"]["0"], r["accuracy"][last]
        lo, hi = wilson_interval(round(acc * n), n)
        g = found["vs_round0"][key]
        sig = r.get("signing") or {}
        dropped = len(sig.get("rejections", [])) if sig else "-"
        flagged = (", ".join(sig.get("flagged", [])) or "none") if sig else "-"
        rows.append(f"| {names[key]} | {acc0:.3f} | {acc:.3f} [{lo:.2f}, {hi:.2f}] | {g['diff']:+.3f} (p = "
                    f"{g['p_value']:.2g}) | {dropped} | {flagged} |")
    rows += ["", f"- Round 0 (each run evaluates its own initial adapter): the same prediction on every example in all "
             f"{len(results)} runs: {found['round0_same_predictions']}.",
             f"- Honest signed == honest unsigned, bit for bit: {found['honest_signed_equals_unsigned_bitwise']}.",
             f"- Signed with attacker == honest clients only, bit for bit: "
             f"{found['attacker_signed_equals_honest_only_bitwise']}."]
    rows += [f"- {line}" for line in found["verdicts"]]
    for rej in results["attacker-signed"].get("signing", {}).get("rejections", []):
        rows.append(f"- round {rej['server_round']}: dropped {rej['client']} (node {rej['node_id']}): {rej['reason']}")
    rows.append(f"- n: `mcnemar_sample_size(0.10, 0.30)` = {mcnemar_sample_size(0.10, 0.30)} pairs detect a 10-point "
                "difference with 30% of pairs discordant (alpha 0.05, power 0.8).")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or read back) the five runs, check the claims, write results.json, print the markdown."""
    a = _args(argv)
    import flwr  # noqa: F401  (configures its logger; quiet it afterwards)

    from expertkit.fileio import write_atomic

    logging.getLogger("flwr").setLevel(logging.WARNING)
    results, states = {}, {}
    for name, cfg in run_configs(a).items():
        res, states[name] = run_one(cfg)
        results[name] = res
        took = "read back" if res.get("cached") else f"{res['wall_seconds']:.0f} s"
        print(f"{labels(a)[name]}: accuracy {res['accuracy']} ({took})", flush=True)
    found = claims(a, results, states)
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
               "runs": results, "claims": found}
    a.out.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out / "results.json", json.dumps(summary, indent=1))
    print("\n" + report(a, results, found))
    return summary


if __name__ == "__main__":
    main()
