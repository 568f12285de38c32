"""The expert library, gate training, the global router and the bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from expertkit.errors import CheckpointError, ConfigError, ExpertkitError, IncompatibleModelsError
from expertkit.route import GlobalRouter, InstructionWriter, RouteConfig, Router, train_gates
from expertkit.route.library import Expert, ExpertLibrary

from .conftest import FakeEmbedder, make_adapter


def test_library_round_trips_and_stacks_the_factors(library, tmp_path) -> None:
    library.save(tmp_path)
    again = ExpertLibrary.load(tmp_path)
    assert again.names == ["copy", "lohi"] and again.descriptions == library.descriptions
    assert again.base_fingerprint == "tinybase00000000"
    stacks = again.stacks()
    st = stacks["model.layers.1.self_attn.v_proj"]
    assert st.a.shape == (2, 4, 64) and st.b.shape == (2, 32, 4)  # v_proj: 2 kv heads x 16 = 32 outputs
    from expertkit.weights.lora import lora_delta

    delta = lora_delta(library.experts[1].adapter)["model.layers.1.self_attn.v_proj.weight"]
    torch.testing.assert_close(st.b[1] @ st.a[1], delta)


def test_library_digest_follows_the_experts_bytes_not_the_folder(library, tmp_path) -> None:
    import dataclasses
    import shutil

    copied = [dataclasses.replace(e, adapter=Path(shutil.copytree(e.adapter, tmp_path / e.name)))
              for e in library.experts]
    assert ExpertLibrary.from_adapters(copied).digest() == library.digest()  # the same experts elsewhere
    renamed = [dataclasses.replace(copied[0], description="another description"), copied[1]]
    assert ExpertLibrary.from_adapters(renamed).digest() != library.digest()
    weights = copied[1].adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert ExpertLibrary.from_adapters(copied).digest() != library.digest()


def test_bad_libraries_are_one_line_errors(adapters, tmp_path) -> None:
    with pytest.raises(ConfigError, match="empty"):
        ExpertLibrary.from_adapters([])
    other = make_adapter(tmp_path / "other", seed=3, fp="otherbase0000000")
    with pytest.raises(IncompatibleModelsError, match="different bases") as err:
        ExpertLibrary.from_adapters([Expert("a", "t", "d", adapters[0]), Expert("b", "t2", "d", other)])
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="library.json"):
        ExpertLibrary.load(tmp_path)
    (tmp_path / "library.json").write_text(json.dumps({"format": "expertkit-route-library-v1", "experts": []}))
    with pytest.raises(ConfigError, match="empty"):
        ExpertLibrary.load(tmp_path)


def test_a_model_of_another_base_and_a_query_longer_than_the_context_are_refused(loaded, library) -> None:
    loaded.fingerprint = "someotherbase000"
    with pytest.raises(IncompatibleModelsError, match="trained on base"):
        Router(loaded, library, RouteConfig(method="uniform"))
    loaded.fingerprint = "tinybase00000000"
    router = Router(loaded, library, RouteConfig(method="uniform"))
    with pytest.raises(ExpertkitError, match="longer than the model's context of 256") as err:
        router.generate(["x" * 300], 4)
    assert "\n" not in str(err.value)
    assert isinstance(loaded.model.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)


def test_global_router_retrieves_the_expert_whose_description_is_the_query_instruction() -> None:
    descriptions = ["Sort the given words alphabetically.", "Count the legs of the animals.",
                    "Reverse the order of the listed words.", "Say whether the year is a leap year."]
    queries = [f"query {i}" for i in range(4)]
    own = {q: descriptions[(i + 2) % 4] for i, q in enumerate(queries)}  # each query's own instruction
    router = GlobalRouter(descriptions, lambda qs: [own[q] for q in qs], FakeEmbedder())
    scores, written = router.scores(queries)
    assert written == [own[q] for q in queries]
    assert scores.argmax(1).tolist() == [2, 3, 0, 1]
    torch.testing.assert_close(scores.max(1).values, torch.ones(4))  # the own description: cosine 1


def test_instructions_are_written_per_query_and_cached_by_query_hash(loaded, tmp_path) -> None:
    short = "Input: {query}\nTask:"  # the default few-shot template alone fills the tiny model's 256 positions
    writer = InstructionWriter(loaded, cache_dir=tmp_path, max_new_tokens=4, template=short)
    first = writer(["ab:", "cd:", "ab:"])
    assert writer.generated == 2 and len(list(tmp_path.glob("*.json"))) == 2  # the repeated query once
    assert first[0] == first[2]
    again = InstructionWriter(loaded, cache_dir=tmp_path, max_new_tokens=4, template=short)
    assert again(["cd:", "ab:"]) == [first[1], first[0]] and again.generated == 0  # from the cache
    assert again(["ef:"]) and again.generated == 1
    with pytest.raises(ConfigError, match="context"):
        again(["y" * 400])


def test_packed_instructions_carry_a_cache_to_another_folder(loaded, tmp_path) -> None:
    from expertkit.errors import CheckpointError
    from expertkit.route.global_router import pack_instructions, unpack_instructions

    short = "Input: {query}\nTask:"
    writer = InstructionWriter(loaded, cache_dir=tmp_path / "a", max_new_tokens=4, template=short)
    first = writer(["ab:", "cd:"])
    assert pack_instructions(tmp_path / "a", tmp_path / "pack.jsonl") == 2
    assert "ab:" not in (tmp_path / "pack.jsonl").read_text()  # the queries stay out of the pack
    assert unpack_instructions(tmp_path / "pack.jsonl", tmp_path / "b") == 2
    moved = InstructionWriter(loaded, cache_dir=tmp_path / "b", max_new_tokens=4, template=short)
    assert moved(["cd:", "ab:"]) == [first[1], first[0]] and moved.generated == 0  # read, not written
    assert unpack_instructions(tmp_path / "pack.jsonl", tmp_path / "b") == 0  # present entries are kept
    other = InstructionWriter(loaded, cache_dir=tmp_path / "b", max_new_tokens=5, template=short)
    other(["ab:"])
    assert other.generated == 1  # another writer setting is another key: written, not read
    (tmp_path / "bad.jsonl").write_text('{"key": "../../etc", "instruction": "x"}\n')
    with pytest.raises(CheckpointError, match="line 1: key"):
        unpack_instructions(tmp_path / "bad.jsonl", tmp_path / "c")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(CheckpointError, match="line 1: not an instruction entry"):
        unpack_instructions(tmp_path / "bad.jsonl", tmp_path / "c")


def test_gates_train_with_the_expert_frozen_and_are_reused(loaded, adapters, tmp_path) -> None:
    from safetensors.torch import load_file

    from expertkit.route.gates import GateConfig
    from expertkit.tasks.toy import copy_task

    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    cfg = GateConfig(steps=3, batch_size=4, lr=0.05)
    res = train_gates(loaded, adapters[0], copy_task(), tmp_path / "g.safetensors", cfg)
    gates = load_file(tmp_path / "g.safetensors")
    assert sorted(gates) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert all(g.shape == (64,) and g.abs().max() > 0 for g in gates.values())  # moved from their zero start
    assert len(res["losses"]) == 3 and not res["reused"]
    after = loaded.model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert train_gates(loaded, adapters[0], copy_task(), tmp_path / "g.safetensors", cfg)["reused"]
    assert not train_gates(loaded, adapters[0], copy_task(), tmp_path / "g.safetensors",
                           GateConfig(steps=2, batch_size=4))["reused"]  # another config: trained again


def test_build_library_trains_each_expert_and_its_gates_and_a_second_build_reuses_them(loaded, tmp_path) -> None:
    from expertkit.route import LibraryConfig, build_library

    cfg = LibraryConfig(tasks=["reverse_words", "leap_year"], descriptions={"leap_year": "Is it a leap year?"},
                        train={"steps": 2, "batch_size": 2, "rank": 2, "target_modules": ["q_proj", "v_proj"],
                               "save_every": 0},
                        gates={"steps": 2, "batch_size": 2})
    lib = build_library(loaded, cfg, tmp_path / "lib")
    assert lib.names == ["reverse_words", "leap_year"] and lib.has_gates
    assert lib.descriptions[1] == "Is it a leap year?" and lib.descriptions[0].startswith("Reverse the order")
    assert lib.base_fingerprint == loaded.fingerprint
    files = sorted(p for p in (tmp_path / "lib").rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files if p.name != "library.json"}
    again = build_library(loaded, cfg, tmp_path / "lib")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained or written again
    assert ExpertLibrary.load(tmp_path / "lib").names == again.names
    with pytest.raises(ValueError, match="evaluation only"):
        LibraryConfig(tasks=["gsm8k"])


def test_expert_vectors_from_written_instructions_of_their_inputs_retrieve_by_the_writers_style() -> None:
    # the descriptions alone point the wrong way; the instructions written for each expert's inputs fix it
    descriptions = ["melon pears", "cars trucks"]
    style = {"in-a1": "count bits", "in-a2": "count bits", "in-b1": "sort words", "in-b2": "sort words",
             "q1": "sort words", "q2": "count bits"}
    writer = lambda qs: [style[q] for q in qs]  # noqa: E731
    plain = GlobalRouter(descriptions, writer, FakeEmbedder())
    assert torch.equal(plain.scores(["q1", "q2"])[0], torch.zeros(2, 2))  # no word in common: no signal
    router = GlobalRouter(descriptions, writer, FakeEmbedder(), expert_queries=[["in-a1", "in-a2"], ["in-b1", "in-b2"]])
    scores, _ = router.scores(["q1", "q2"])
    assert scores.argmax(1).tolist() == [1, 0]
    # vector of expert 0 = normalised mean of its description's and its two written instructions' embeddings
    emb = FakeEmbedder().encode(["melon pears", "count bits", "count bits"])
    want = torch.nn.functional.normalize(torch.nn.functional.normalize(torch.tensor(emb), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(router.expert_vectors[0], want)


def test_gates_of_two_bases_differing_only_in_an_unsampled_tensor_are_not_shared(loaded, adapters, tmp_path) -> None:
    from expertkit.route.gates import GateConfig, gate_identity
    from expertkit.tasks.toy import copy_task
    from expertkit.weights.fingerprint import fingerprint, model_digest, sampled_names

    state = loaded.model.state_dict()
    unsampled = sorted(set(state) - set(sampled_names({k: tuple(v.shape) for k, v in state.items()})))[0]
    cfg = GateConfig(steps=1, batch_size=2)
    fp_before, digest_before = fingerprint(dict(state)), model_digest(loaded.model)
    assert not train_gates(loaded, adapters[0], copy_task(), tmp_path / "g.safetensors", cfg)["reused"]
    with torch.no_grad():
        state[unsampled].add_(0.5)  # the other base: one tensor the sampled fingerprint never reads
    assert fingerprint(dict(loaded.model.state_dict())) == fp_before  # the old key could not tell them apart
    digest_after = model_digest(loaded.model)
    assert digest_after != digest_before
    assert gate_identity(adapters[0], "copy", cfg, digest_before) != gate_identity(adapters[0], "copy", cfg, digest_after)
    # the gates trained on the first base are not reused for the second
    assert not train_gates(loaded, adapters[0], copy_task(), tmp_path / "g.safetensors", cfg)["reused"]
    assert train_gates(loaded, adapters[0], copy_task(), tmp_path / "g.safetensors", cfg)["reused"]
