"""Post-quantum signatures in federated LoRA: per-scheme costs, and signing overhead on a real round.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/pqc_fl.py [--repeats 5] [--rounds-pairs 2]
        [--signed ml-dsa-65 ml-dsa-65-pqcrypto] [--json runs/bench/pqc_fl.json]

Part 1 (the paper's table), for each scheme of ``expertkit.federated.measure.PAPER_SCHEMES``:
key generation, signing and verification time (median of ``--repeats``; the signed message is
the 32-byte update digest bound to run, round and client), public key and signature sizes.

Part 2 (overhead on a real round, same run): a federated LoRA round on the bundled
SmolLM2-135M-Instruct (2 clients, 2 local AdamW steps of 8 examples, q/v rank 4: a 0.92 MB
update, one torch thread), unsigned and signed with each ``--signed`` scheme (default: ML-DSA-65,
OpenSSL's implementation, and the pqcrypto reference it replaced as the default), alternated
``--rounds-pairs`` times (inline engine, so all see the same arithmetic). Reported: the median
round times and their ratio, and the time spent inside signing and verification (hashing
included, counted by expertkit.federated.records) as a fraction of the signed round: the
wall-time difference of two rounds is dominated by noise on a shared machine; the counted
crypto time is what signing adds.

Part 3: per-round added time by update size, from 1 MB to the full bundled model (538 MB fp32),
for every scheme: client hash + sign, server hash + verify, as % of the measured LoRA round.

Goal (issue 7): under 1% added to a LoRA round with ML-DSA-65.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

FULL_MODEL_BYTES = 134_515_008 * 4  # SmolLM2-135M-Instruct parameters, fp32


def lora_rounds(pairs: int, signed: list[str]) -> dict[str, object]:
    """Median wall time of an unsigned round and of a round signed with each scheme of ``signed``,
    and the counted crypto time of each signed round."""
    from expertkit.federated import records
    from expertkit.federated.config import FlConfig
    from expertkit.federated.simulate import simulate

    base = dict(model="smollm2-135m", task="family_relation", clients=2, rounds=1, examples_per_client=16,
                local_steps=2, batch_size=8, rank=4, alpha=8, eval_n=0, engine="inline", threads=1)
    simulate(FlConfig.model_validate({**base, "signing": {"scheme": "none"}}), write=False)  # warm-up: load model
    schemes = ["none", *signed]
    times: dict[str, list[float]] = {s: [] for s in schemes}
    crypto: dict[str, list[float]] = {s: [] for s in signed}
    update_bytes = 0
    for _ in range(pairs):
        for scheme in schemes:
            before = sum(records.CRYPTO_SECONDS.values())
            res = simulate(FlConfig.model_validate({**base, "signing": {"scheme": scheme}}), write=False)
            times[scheme].append(res["seconds"])
            if scheme != "none":
                crypto[scheme].append(sum(records.CRYPTO_SECONDS.values()) - before)
            update_bytes = sum(v.nbytes for v in res["final_state"].values())
    unsigned = statistics.median(times["none"])
    out: dict[str, object] = {"unsigned_s": unsigned, "runs": times, "update_bytes": update_bytes, "signed": {}}
    for scheme in signed:
        secs, c = statistics.median(times[scheme]), statistics.median(crypto[scheme])
        out["signed"][scheme] = {"signed_s": secs, "ratio": secs / unsigned, "crypto_s": c,  # type: ignore[index]
                                 "crypto_fraction": c / secs}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds-pairs", type=int, default=2)
    ap.add_argument("--signed", nargs="+", default=["ml-dsa-65", "ml-dsa-65-pqcrypto"])
    ap.add_argument("--json", default="runs/bench/pqc_fl.json")
    args = ap.parse_args()
    import os

    import flwr  # noqa: F401  (configures its logger; quiet it afterwards)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    from expertkit.federated.measure import markdown, measure
    from expertkit.federated.signing import get_signer

    print(f"load average before: {os.getloadavg()}; ml-dsa-65 runs on {get_signer('ml-dsa-65').backend}", flush=True)
    rounds = lora_rounds(args.rounds_pairs, args.signed)
    res = measure(None, (1, 10, 100), full_model_bytes=FULL_MODEL_BYTES, round_seconds=rounds["unsigned_s"],
                  repeats=args.repeats)
    res["lora_round"] = rounds
    res["load_average_after"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))
    r = rounds
    print(f"\nLoRA round (2 clients, {r['update_bytes'] / 2**20:.2f} MB update each): unsigned {r['unsigned_s']:.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in r['runs']['none'])})")
    for scheme, x in r["signed"].items():
        print(f"  signed {scheme}: {x['signed_s']:.2f} s (ratio {x['ratio']:.3f}, wall-time noise included; runs "
              f"{', '.join(f'{t:.2f}' for t in r['runs'][scheme])}); time inside signing + verification "
              f"{1000 * x['crypto_s']:.1f} ms = {100 * x['crypto_fraction']:.3f}% of the signed round (goal: < 1%)")
    rows = res["schemes"]
    fastest = min(rows, key=lambda x: x["sign_ms"] + x["verify_ms"] + x["keygen_ms"])
    pq = [x for x in rows if x["post_quantum"] and "+" not in x["scheme"]]
    best_pq = min(pq, key=lambda x: x["sign_ms"] + x["verify_ms"])
    print(f"fastest overall (keygen+sign+verify): {fastest['scheme']}; fastest post-quantum sign+verify: "
          f"{best_pq['scheme']}; load average after: {res['load_average_after']}")


if __name__ == "__main__":
    main()
