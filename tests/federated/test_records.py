"""Signed Flower message contents: every tampering, replay or unknown key is rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from expertkit.federated.keys import Identity
from expertkit.federated.records import CLIENT_ROLE, SERVER_ROLE, SIG_KEY, sign_content, static_lookup, verify_content

RUN = "run-abc"


def _content(seed: int = 0) -> RecordDict:
    g = torch.Generator().manual_seed(seed)
    arrays = ArrayRecord({"l0.lora_A": torch.randn(4, 3, generator=g), "l0.lora_B": torch.randn(3, 4, generator=g),
                          "l1.lora_A": torch.randn(4, 3, generator=g)})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 16, "train_loss": 1.25})})


@pytest.fixture(scope="module")
def ident() -> Identity:
    return Identity.generate("client-0", "ml-dsa-65")


def _verify(content, ident, **kw):
    args = dict(run_id=RUN, server_round=2, role=CLIENT_ROLE)
    args.update(kw)
    return verify_content(content, static_lookup([ident.public_key]), **args)


def _signed(ident, seed=0, server_round=2):
    c = _content(seed)
    sign_content(c, ident, run_id=RUN, server_round=server_round, role=CLIENT_ROLE)
    return c


def test_honest_content_verifies(ident):
    v = _verify(_signed(ident), ident)
    assert v.ok and v.sender == "client-0" and v.key == ident.fingerprint


@pytest.mark.parametrize("tensor", ["l0.lora_A", "l0.lora_B", "l1.lora_A"])
def test_flipping_any_byte_of_any_tensor_is_rejected(ident, tensor):
    c = _signed(ident)
    arr = c["arrays"][tensor]
    for pos in range(0, arr.numpy().nbytes, 7):  # every 7th byte of the tensor, first and last included
        raw = bytearray(arr.numpy().tobytes())
        raw[pos] ^= 0x01
        c2 = _signed(ident)
        c2["arrays"][tensor] = Array(np.frombuffer(bytes(raw), dtype=np.float32).reshape(arr.shape))
        v = _verify(c2, ident)
        assert not v.ok and "altered" in v.reason, (pos, v.reason)
    raw = bytearray(arr.numpy().tobytes())
    raw[-1] ^= 0x80
    c["arrays"][tensor] = Array(np.frombuffer(bytes(raw), dtype=np.float32).reshape(arr.shape))
    assert not _verify(c, ident).ok


def test_reordered_tensors_and_inflated_weight_are_rejected(ident):
    c = _signed(ident)
    items = list(c["arrays"].items())
    c["arrays"] = ArrayRecord(dict(reversed(items)))
    assert not _verify(c, ident).ok
    c = _signed(ident)
    c["metrics"]["num-examples"] = 1600  # claim more data to dominate the average
    assert "altered" in _verify(c, ident).reason
    c = _signed(ident)
    c["extra"] = ConfigRecord({"x": 1})
    assert not _verify(c, ident).ok


def test_round_run_role_and_client_are_bound(ident):
    c = _signed(ident, server_round=1)
    assert "replay" in _verify(c, ident, server_round=2).reason  # an old update replayed next round
    c = _signed(ident)
    assert "another run" in _verify(c, ident, run_id="run-other").reason
    assert "expected a global-model" in _verify(c, ident, role=SERVER_ROLE).reason
    # the record's claimed round changed to match: the signature no longer matches
    c[SIG_KEY]["round"] = 3
    assert not _verify(c, ident, server_round=3).ok
    # reassigned to another client: the record claims client-1 (signed by client-0)
    other = Identity.generate("client-1", "ml-dsa-65")
    lookup = static_lookup([ident.public_key, other.public_key])
    c = _signed(ident)
    c[SIG_KEY]["sender"] = "client-1"
    v = verify_content(c, lookup, run_id=RUN, server_round=2, role=CLIENT_ROLE)
    assert not v.ok and "belongs to 'client-0'" in v.reason
    c[SIG_KEY]["key"] = other.fingerprint
    v = verify_content(c, lookup, run_id=RUN, server_round=2, role=CLIENT_ROLE)
    assert not v.ok and "signature does not verify" in v.reason


def test_unknown_key_unsigned_and_malformed_are_rejected(ident):
    stranger = Identity.generate("client-0", "ml-dsa-65")  # same name, key not in the allowlist
    c = _content()
    sign_content(c, stranger, run_id=RUN, server_round=2, role=CLIENT_ROLE)
    assert "unknown key" in _verify(c, ident).reason
    assert "unsigned" in _verify(_content(), ident).reason
    c = _signed(ident)
    del c[SIG_KEY]["signature"]
    assert "malformed" in _verify(c, ident).reason
    c = _signed(ident)
    c[SIG_KEY]["signature"] = b"\x00" * 10
    assert "signature does not verify" in _verify(c, ident).reason
