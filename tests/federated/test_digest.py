"""Canonical streamed hashing: equals the in-memory reference, and every change changes it."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import UnknownNameError
from expertkit.federated.digest import (
    UpdateHasher,
    as_buffer,
    binding_message,
    digest_tensors,
    reference_digest,
)


def _update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_A": torch.randn(4, 3, generator=g), "a.lora_B": torch.randn(3, 4, generator=g),
            "b.bias": torch.arange(5, dtype=torch.int64), "c.half": torch.ones(2, 2, dtype=torch.bfloat16)}


@pytest.mark.parametrize("alg", ["sha3-256", "blake2b"])
def test_streamed_digest_equals_reference(alg):
    upd = _update()
    items = [("section", "arrays", "u")]
    items += [("tensor", n, str(t.dtype).removeprefix("torch."), tuple(t.shape), bytes(as_buffer(t))) for n, t in upd.items()]
    items += [("scalar", "num-examples", 12), ("scalar", "loss", 0.5), ("scalar", "flag", True), ("scalar", "l", [1, 2.5])]
    h = UpdateHasher(alg)
    h.section("arrays", "u")
    for n, t in upd.items():
        h.tensor(n, str(t.dtype).removeprefix("torch."), tuple(t.shape), as_buffer(t))
    for _, n, v in items[-4:]:
        h.scalar(n, v)
    assert h.digest() == reference_digest(items, alg)
    assert len(h.digest()) == 32


def test_every_change_changes_the_digest():
    upd = _update()
    base = digest_tensors(upd)
    assert digest_tensors(_update()) == base
    for name, t in upd.items():  # flip one byte of each tensor
        raw = bytearray(as_buffer(t))
        for pos in (0, len(raw) - 1):
            changed = dict(upd)
            flipped = bytearray(raw)
            flipped[pos] ^= 0x01
            changed[name] = torch.frombuffer(flipped, dtype=t.dtype).reshape(t.shape).clone()
            assert digest_tensors(changed) != base, (name, pos)
    assert digest_tensors(dict(reversed(list(upd.items())))) != base  # reordered
    renamed = {("z" + k if k == "b.bias" else k): v for k, v in upd.items()}
    assert digest_tensors(renamed) != base
    reshaped = {**upd, "a.lora_A": upd["a.lora_A"].reshape(3, 4)}  # same bytes, other shape
    assert digest_tensors(reshaped) != base
    retyped = {**upd, "b.bias": upd["b.bias"].view(torch.float64)}  # same bytes, other dtype
    assert digest_tensors(retyped) != base
    # a byte moved across a tensor boundary: the same concatenated bytes, split differently
    a, b = torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)
    assert digest_tensors({"x": a, "y": b}) != digest_tensors({"x": a[:3], "y": torch.cat([a[3:], b])})
    with pytest.raises(UnknownNameError):
        digest_tensors(upd, alg="md5")


def test_binding_message_binds_every_field():
    d = bytes(32)
    kw = dict(alg="sha3-256", run_id="r1", server_round=3, sender="client-0", role="client-update")
    base = binding_message(d, **kw)
    for key, value in [("run_id", "r2"), ("server_round", 4), ("sender", "client-1"), ("role", "global-model"),
                       ("alg", "blake2b")]:
        assert binding_message(d, **{**kw, key: value}) != base, key
    assert binding_message(b"\x01" + d[1:], **kw) != base
    # length prefixes: moving characters between fields cannot produce the same message
    assert binding_message(d, **{**kw, "run_id": "r1c", "sender": "lient-0"}) != base
