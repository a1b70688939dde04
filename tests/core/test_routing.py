"""Mixed-adapter batches: each row through its own adapter, equal to running them one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import model_inputs, output_tensor, tiny_bert, tiny_llama
from vblora import VBLoRAConfig, get_vblora_model
from vblora.core import functional as VF

CFG = VBLoRAConfig(
    num_vectors=16,
    vector_length=16,
    target_modules="all-linear",
    init_vector_bank_bound=0.5,
    init_logits_std=1.0,
)


def llama_with_adapters():
    model = get_vblora_model(tiny_llama(), CFG, "a")
    model.add_adapter("b", dataclasses.replace(CFG, r=2))
    model.add_adapter("c", dataclasses.replace(CFG, target_modules=["q_proj"]))
    return model


def per_adapter(model, inputs: dict, name: str) -> torch.Tensor:
    with torch.no_grad():
        if name == "__base__":
            with model.disable_adapter():
                return output_tensor(model(**inputs))
        model.set_adapter(name)
        return output_tensor(model(**inputs))


def test_mixed_batch_equals_each_adapter_alone() -> None:
    model = llama_with_adapters()
    inputs = model_inputs("llama", batch=5)
    names = ["a", "__base__", "b", "a", "c"]
    with torch.no_grad():
        mixed = output_tensor(model(**inputs, adapter_names=names))
    for row, name in enumerate(names):
        alone = per_adapter(model, inputs, name)
        torch.testing.assert_close(mixed[row], alone[row], atol=1e-5, rtol=1e-5)
    # The routing is cleared afterwards: a plain call uses the active adapter again.
    model.set_adapter("b")
    torch.testing.assert_close(output_tensor(model(**inputs)), per_adapter(model, inputs, "b"))


def test_mixed_batch_with_trained_heads() -> None:
    cfg = VBLoRAConfig(
        num_vectors=16, vector_length=16, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    model = get_vblora_model(tiny_bert(), cfg, "a")
    model.add_adapter("b", cfg)
    with torch.no_grad():
        model.model.classifier.modules_to_save["b"].weight.mul_(3.0)
    inputs = model_inputs("bert", batch=3)
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        mixed = output_tensor(model(**inputs, adapter_names=names))
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], per_adapter(model, inputs, name)[row], atol=1e-5, rtol=1e-5)


def test_mixed_batch_generate_with_beams() -> None:
    model = llama_with_adapters()
    ids = torch.randint(1, 128, (3, 4), generator=torch.Generator().manual_seed(0))
    names = ["c", "a", "__base__"]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[row : row + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[row : row + 1], **kwargs)
        assert mixed[row].equal(alone[0])


def test_mixed_batch_gradients_reach_each_adapter() -> None:
    model = llama_with_adapters()
    model.train()
    inputs = model_inputs("llama", batch=2)
    for name in ("a", "b"):
        model.vblora_banks[name].requires_grad_(True)
    output_tensor(model(**inputs, adapter_names=["a", "b"])).square().sum().backward()
    assert model.vblora_banks["a"].logits.grad.abs().sum() > 0
    assert model.vblora_banks["b"].logits.grad.abs().sum() > 0
    assert model.vblora_banks["c"].logits.grad is None


def test_mixed_batch_errors() -> None:
    model = llama_with_adapters()
    inputs = model_inputs("llama", batch=2)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zzz'\]"):
        model(**inputs, adapter_names=["a", "zzz"])
    for names in (["a", "b", "c"], ["a"]):  # one name for two rows is not "the same for both"
        with pytest.raises(ValueError, match="one adapter name per row"):
            model(**inputs, adapter_names=names)
    with torch.no_grad():  # a single string is every row's adapter
        every = output_tensor(model(**inputs, adapter_names="b"))
    torch.testing.assert_close(every, per_adapter(model, inputs, "b"), atol=1e-5, rtol=1e-5)
    model.merge_adapter(["a"])
    with pytest.raises(ValueError, match="unmerged"):
        model(**inputs, adapter_names=["a", "b"])


def test_cache_keeps_the_factors_of_at_most_max_cached_adapters() -> None:
    model = llama_with_adapters()
    for name in ("d", "e"):
        model.add_adapter(name, dataclasses.replace(CFG, r=3))
    model.eval()
    inputs = model_inputs("llama", batch=3)
    reference = {}
    model.max_cached_adapters = None  # unbounded: every adapter used keeps its factors
    for names in (["a", "b", "c"], ["d", "e", "a"]):
        with torch.no_grad():
            reference[tuple(names)] = output_tensor(model(**inputs, adapter_names=names))
    assert all(bank._factors is not None for bank in model.vblora_banks.values())

    def cached() -> set[str]:
        return {n for n, bank in model.vblora_banks.items() if bank._factors is not None}

    model.max_cached_adapters = 2  # lowering the limit evicts at once, least recently used first
    assert cached() == {"e", "a"}
    for names in (["a", "b", "c"], ["d", "e", "a"], ["a", "b", "c"]):
        with torch.no_grad():
            out = output_tensor(model(**inputs, adapter_names=names))
        assert cached() == set(names)  # the pass in flight keeps its three, beyond the limit
        torch.testing.assert_close(out, reference[tuple(names)], atol=0, rtol=0)
    with torch.no_grad():
        model(**inputs)  # the active adapter alone: the two most recent stay
    assert cached() == {"a", "c"} and model.active_adapters == ["a"]
    model.delete_adapter("c")
    model.max_cached_adapters = 1
    assert cached() == {"a"}
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_cached_adapters must be a positive int or None"):
            model.max_cached_adapters = bad
    assert model.max_cached_adapters == 1


def test_mixed_batch_refuses_a_saved_module_called_with_more_than_its_input() -> None:
    """A saved encoder layer also takes the attention mask: splitting only its first input by rows
    would drop or misalign the rest, so it is refused, not run wrong."""
    cfg = VBLoRAConfig(
        num_vectors=16, vector_length=16, target_modules=["query"], modules_to_save=["layer.1"]
    )
    model = get_vblora_model(tiny_bert(), cfg, "a").eval()
    model.add_adapter("b", cfg)
    inputs = model_inputs("bert", batch=2)
    with pytest.raises(ValueError, match=r"called with more .* cannot be split safely"):
        model(**inputs, adapter_names=["a", "b"])
    with torch.no_grad():  # nothing was left routed
        torch.testing.assert_close(output_tensor(model(**inputs)), per_adapter(model, inputs, "a"))


def test_mixed_batch_refuses_what_it_cannot_route_by_row() -> None:
    """Rows are told apart by position along the first dimension; anything else is refused
    rather than run on the wrong rows."""
    from torch import nn

    class SequenceFirst(nn.Module):  # like nn.Transformer(batch_first=False): (T, B, H) inside
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.proj = nn.Embedding(64, 16), nn.Linear(16, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.proj(self.emb(ids).transpose(0, 1)).transpose(0, 1)

    cfg = VBLoRAConfig(num_vectors=8, vector_length=8, target_modules=["proj"])
    seq_first = get_vblora_model(SequenceFirst(), cfg, "a")
    seq_first.add_adapter("b", cfg)
    for ids in (torch.randint(0, 64, (2, 5)), torch.randint(0, 64, (2, 2))):  # 2 x 2: equal sizes
        with pytest.raises(ValueError, match=r"model type None is not one known to be batch-major"):
            seq_first(ids, adapter_names=["a", "b"])
    seq_first.batch_major = True  # the user's word: then the shape check still refuses what it can
    with pytest.raises(ValueError, match=r"proj saw an input of 5 rows, not the batch's 2.*batch-major"):
        seq_first(torch.randint(0, 64, (2, 5)), adapter_names=["a", "b"])

    class TorchSequenceFirst(nn.Module):  # torch's own layer marks itself batch_first=False
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 16)
            self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=16, dropout=0.0)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.layer(self.emb(ids).transpose(0, 1)).transpose(0, 1)

    torch_cfg = VBLoRAConfig(num_vectors=8, vector_length=8, target_modules=["linear1", "linear2"])
    torch_seq_first = get_vblora_model(TorchSequenceFirst(), torch_cfg, "a")
    torch_seq_first.add_adapter("b", torch_cfg)
    torch_seq_first.batch_major = True  # even declared: its sequence-first layer is refused
    with pytest.raises(ValueError, match=r"layer.self_attn is sequence-first"):
        torch_seq_first(torch.randint(0, 64, (2, 2)), adapter_names=["a", "b"])

    model = llama_with_adapters()
    inputs = model_inputs("llama", batch=2)
    for names, message in (
        (["a", 1], "must hold adapter names"),
        ({"a": 1, "b": 2}, "must be a list of names"),
    ):
        with pytest.raises(ValueError, match=message):
            model(**inputs, adapter_names=names)
    with model.disable_adapter(), pytest.raises(ValueError, match=r"inside disable_adapter\(\)"):
        model(**inputs, adapter_names=["a", "b"])
    model.train()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="cannot train with gradient checkpointing"):
        model(**inputs, adapter_names=["a", "b"])
    with torch.no_grad():  # inference recomputes nothing: allowed
        model(**inputs, adapter_names=["a", "b"])


def test_mixed_generate_reads_beams_from_every_place_generate_does() -> None:
    """num_beams can come from the call, a generation_config passed to it, or the model's own."""
    from transformers import GenerationConfig

    model = llama_with_adapters()
    ids = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    model.model.generation_config.num_beams = 2
    model.model.generation_config.pad_token_id = 0
    mixed = model.generate(
        input_ids=ids,
        generation_config=GenerationConfig(max_new_tokens=3, do_sample=False),
        adapter_names=["a", "b"],
    )
    for row, name in enumerate(["a", "b"]):
        model.set_adapter(name)
        alone = model.generate(
            input_ids=ids[row : row + 1], generation_config=GenerationConfig(max_new_tokens=3)
        )
        assert mixed[row].equal(alone[0])


def test_concurrent_passes_on_one_model_each_see_their_own_rows() -> None:
    """Two threads call generate and forward on one model at once with different adapter_names:
    each gets its own sequential result (the routing travels with the pass, not on the layers)."""
    import threading

    model = llama_with_adapters()
    model.max_cached_adapters = 1  # evictions race with the other thread's pass too
    ids = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(3))
    inputs = model_inputs("llama", batch=3)
    jobs = {
        "gen_abc": lambda: model.generate(
            input_ids=ids, adapter_names=["a", "b", "c"], max_new_tokens=6, do_sample=False
        ),
        "gen_cba": lambda: model.generate(
            input_ids=ids, adapter_names=["c", "__base__", "a"], max_new_tokens=6, do_sample=False
        ),
        "fwd_bb": lambda: output_tensor(model(**inputs, adapter_names=["b", "b", "__base__"])),
        "fwd_ca": lambda: output_tensor(model(**inputs, adapter_names=["c", "a", "a"])),
    }
    with torch.no_grad():
        expected = {name: job() for name, job in jobs.items()}  # one after the other
    results: dict[str, list[torch.Tensor]] = {name: [] for name in jobs}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def worker(name: str) -> None:
        try:
            start.wait(timeout=30)
            with torch.no_grad():
                for _ in range(3):
                    results[name].append(jobs[name]())
        except BaseException as err:  # reported below, with the thread's name
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(name,), daemon=True) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    for name, outs in results.items():
        assert len(outs) == 3
        for out in outs:
            if out.dtype == torch.long:
                assert torch.equal(out, expected[name]), name
            else:
                torch.testing.assert_close(out, expected[name], atol=1e-5, rtol=1e-5)


def test_stacked_factors_are_reused_only_while_they_are_the_batchs_current_ones() -> None:
    """Decoding repeats a pass with the same adapters: the stacked factors of each layer are kept
    from the previous pass (no restacking), and never once an adapter's factors change or go."""
    model = llama_with_adapters()
    model.add_adapter("d", CFG)
    model.eval()
    inputs = model_inputs("llama", batch=4)
    names = ["a", "b", "d", "__base__"]

    def mixed() -> torch.Tensor:
        with torch.no_grad():
            return output_tensor(model(**inputs, adapter_names=names))

    def expected() -> torch.Tensor:
        return torch.stack([per_adapter(model, inputs, n)[row] for row, n in enumerate(names)])

    first = mixed()
    path = next(iter(model.adapters.stacks))
    kept = model.adapters.stacks[path][2]
    torch.testing.assert_close(mixed(), first, atol=0, rtol=0)
    assert model.adapters.stacks[path][2] is kept  # reused, not restacked
    with torch.no_grad():
        model.vblora_banks["b"].bank.mul_(0.5)  # an in-place change: b's factors are composed anew
    changed = mixed()
    assert model.adapters.stacks[path][2] is not kept
    torch.testing.assert_close(changed, expected(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[1], first[1])
    model.delete_adapter("d")  # deletion drops every stack (none may hold a deleted adapter)
    assert model.adapters.stacks == {}
    names = ["a", "b", "c", "a"]  # two rows of one adapter: gathered by index, not in order
    torch.testing.assert_close(mixed(), expected(), atol=1e-5, rtol=1e-5)
    model.max_cached_adapters = 1  # an eviction drops them too
    assert model.adapters.stacks == {}


@pytest.mark.parametrize("index", [None, [2, 0, 3, 0, 1]])
def test_gathered_delta_equals_a_plain_loop(index) -> None:
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(r, 12, generator=g), torch.randn(8, r, generator=g)) for r in (2, 3, 1)]
    a, bt = VF.stack_factors(factors)
    rows = 3 if index is None else len(index)
    x = torch.randn(rows, 4, 12, generator=g)
    got = VF.gathered_delta(x, a, bt, None if index is None else torch.tensor(index))
    for n in range(rows):
        i = n if index is None else index[n]
        want = torch.zeros(4, 8) if i == len(factors) else x[n] @ factors[i][0].T @ factors[i][1].T
        torch.testing.assert_close(got[n], want, atol=1e-5, rtol=1e-5)


def test_a_model_with_stacked_factors_deep_copies_and_pickles() -> None:
    import copy
    import io

    model = llama_with_adapters().eval()
    inputs = model_inputs("llama", batch=3)
    with torch.no_grad():
        want = output_tensor(model(**inputs, adapter_names=["a", "b", "c"]))
    assert model.adapters.stacks  # weak references inside
    for twin in (copy.deepcopy(model), torch.load(_saved(model, io.BytesIO()), weights_only=False)):
        with torch.no_grad():
            torch.testing.assert_close(output_tensor(twin(**inputs, adapter_names=["a", "b", "c"])), want)


def _saved(model, buffer):
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


def test_threads_that_ended_leave_no_trace_of_their_passes() -> None:
    """A thread-per-request server runs each pass on a new thread: the model keeps a record only for
    the threads alive, not one for every thread that ever ran."""
    import threading

    model = llama_with_adapters().eval()
    inputs = model_inputs("llama", batch=2)

    def run() -> None:
        with torch.no_grad():
            model(**inputs, adapter_names=["a", "b"])

    for _ in range(30):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    run()  # this thread too
    assert len(model.adapters._cells) <= 2
    assert model.adapters._in_flight() == set()
