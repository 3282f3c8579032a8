"""train.py: progressive runs and the closed loop, exact resume (mid-stage, at a boundary, after a signal or
SIGKILL, whatever its log says), torchrun, and its bad settings refused before any work."""

import argparse
import copy
import dataclasses
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

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import emo
import eval as evaluate
import plan
import report
import runs
import train
from data.corpus import Corpus, prepare
from conftest import (tiny, seeded_model, tiny_run, stopped, records, train_process, wait_for_steps,
                      assert_one_line, damage, write_checkpoint, a_users_run)


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
    s = train.Settings(experts="2,4,8", total_tokens=2048 * 1000, grow_after=0)
    stages = train.plan_schedule(s, tiny(n_experts=2, vocab_size=8192), 2048, [2, 4, 8], None)
    n_law = emo.law_active_params(tiny(n_experts=8, vocab_size=8192))
    expected = emo.plan_stages(n_law, 2048 * 1000, [2, 4, 8], 2, batch_tokens=2048)
    assert [st.end for st in stages] == [p["end"] // 2048 for p in expected]


def test_grow_after_keeps_the_laws_first_stages_then_brings_every_later_e_at_once():
    s, model, _ = train.parse(["--grow_after=0"])
    cfg = emo.Config(**{**model, "n_experts": 2, "vocab_size": 8192})
    law = [st.end for st in train.plan_schedule(s, cfg, 2048, [2, 4, 8, 16, 32], None)]
    s.grow_after = 2
    early = [st.end for st in train.plan_schedule(s, cfg, 2048, [2, 4, 8, 16, 32], None)]
    assert law == [76, 162, 380, 890, 1953]  # Table 3's split of 4M tokens for the default model
    assert early == [76, 162, 163, 164, 1953]
    s.grow_after = 4  # no stage after the fourth but the last: the law's split
    assert [st.end for st in train.plan_schedule(s, cfg, 2048, [2, 4, 8, 16, 32], None)] == law


def test_the_warmup_runs_its_steps_whatever_the_stages_and_each_growth_re_warms_from_its_own_first_step():
    stages = emo.stages_at([2, 4, 8], [4, 30, 100])
    stage_of = lambda step: next(st for st in stages if st.start <= step < st.end)
    for rewarm in (0, 10):
        s = train.Settings(lr=1.0, warmup_steps=20, rewarm_steps=rewarm, decay_frac=0.0)
        lr = [train.lr_at(step, s, 100, stage_of(step)) for step in range(100)]
        warmup = [(step + 1) / 20 for step in range(20)] + [1.0] * 80
        rewarm_of = lambda step: min(1.0, (step - stage_of(step).start + 1) / rewarm) if rewarm and step >= 4 else 1.0
        assert lr == pytest.approx([min(w, rewarm_of(step)) for step, w in enumerate(warmup)])
    assert lr[4] == pytest.approx(0.1) and lr[10] == pytest.approx(0.55) and lr[30] == pytest.approx(0.1)


def test_a_replanned_run_records_each_replan_and_resumes_on_its_new_schedule(corpus, tmp_path):
    # delta alone: the loop's mechanics, on a run too short for the default to tell anything (it keeps the plan)
    flags = ["--experts=2,4,8,16", "--grow_after=0", "--total_tokens=16384", "--eval_interval=4", "--replan",
             "--replan_params=delta", "--phase_in_steps=2"]

    def law_planned(out, *extra):  # the tiny run, its stages from the law instead of --stages
        return [f for f in tiny_run(corpus, out, *extra) if not f.startswith("--stages=")]

    train.main(law_planned(tmp_path / "a", *flags))
    replans = records(tmp_path / "a", "replan")
    assert [r["stage"] for r in replans] == [1, 2] and replans[0]["ends"] == replans[0]["ends_before"]
    moved = [r for r in replans if r["ends"] != r["ends_before"]]
    assert moved, replans  # at this scale the run's own curve moves a boundary
    stop = moved[0]["step"] + 2
    stopped(law_planned(tmp_path / "b", *flags, f"--stop_at={stop}"))
    train.main([f"--resume={tmp_path / 'b'}"])
    a, b = records(tmp_path / "a", "step"), records(tmp_path / "b", "step")
    assert [(r["experts"], r["loss"]) for r in a] == [(r["experts"], r["loss"]) for r in b]
    assert records(tmp_path / "b", "replan") == replans


WINDOWED = ("--router=softmax", "--growth_init=gaussian", "--lb_window=4")  # balancing over the last 4 steps


# mid-stage, right at the stage boundary, and with a balancing window that spans the stop
@pytest.mark.parametrize("stop_at,extra", [(7, ()), (12, ()), (17, WINDOWED)])
def test_a_resumed_run_continues_exactly(corpus, tmp_path, stop_at, extra):
    train.main(tiny_run(corpus, tmp_path / "a", *extra))
    stopped(tiny_run(corpus, tmp_path / "b", f"--stop_at={stop_at}", *extra))
    assert records(tmp_path / "b", "step")[-1]["step"] == stop_at
    train.main([f"--resume={tmp_path / 'b'}", f"--out_dir={tmp_path / 'b'}"])
    a, b = records(tmp_path / "a", "step"), records(tmp_path / "b", "step")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    final_a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    final_b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize("extra", [(), WINDOWED])
def test_torchrun_with_two_cpu_processes_matches_one_process(corpus, tmp_path, extra):
    """Also through the closed loop: rank 0 re-plans at each stage end and every rank follows its plan; and
    with a balancing window, which every rank fills with the same global loads."""
    law_planned = [f for f in tiny_run(corpus, "x", "--total_tokens=6144", "--experts=2,4,8,16", "--grow_after=0",
                                       "--replan_params=delta", "--phase_in_steps=1", "--warmup_steps=1",
                                       "--rewarm_steps=1", *extra)
                   if not f.startswith(("--stages", "--out"))]
    train.main([*law_planned, f"--out_dir={tmp_path / 'one'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *law_planned, "--batch_size=4", "--batch_tokens=256", f"--out_dir={tmp_path / 'two'}"]
    done = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = records(tmp_path / "one", "step"), records(tmp_path / "two", "step")
    assert len(one) == len(two) == 24 and [r["experts"] for r in one] == [r["experts"] for r in two]
    replans = records(tmp_path / "two", "replan")
    assert len(replans) == 2 and [r["ends"] for r in replans] == [r["ends"] for r in records(tmp_path / "one", "replan")]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["load_cv"] == pytest.approx(b["load_cv"], abs=1e-6)  # balancing saw the global counts


def two_processes(args, check=True):
    """train.py under torchrun with two CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    done = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert not check or done.returncode == 0, done.stderr[-2000:]
    return done


def two_process_run(corpus, out, schedule, *extra):
    """A tiny run for two processes: one fixed pool of 4 experts, or E = 2 -> 4 at step 12."""
    fixed = ("--schedule=fixed", "--experts=4") if schedule == "fixed" else ()
    return [f for f in tiny_run(corpus, out, *fixed, "--batch_size=4", "--batch_tokens=256", *extra)
            if not (fixed and f.startswith("--stages"))]


@pytest.mark.parametrize("schedule", ["fixed", "grown"])
def test_fsdp_with_two_cpu_processes_trains_as_ddp_does_and_its_sharded_checkpoint_loads_in_one(corpus, tmp_path,
                                                                                               schedule):
    for shard in ("ddp", "fsdp"):
        two_processes(two_process_run(corpus, tmp_path / shard, schedule, f"--shard={shard}"))
    ddp, fsdp = records(tmp_path / "ddp", "step"), records(tmp_path / "fsdp", "step")
    assert len(ddp) == len(fsdp) == 24 and [r["experts"] for r in ddp] == [r["experts"] for r in fsdp]
    # the same sums in another order (reduce-scatter instead of all-reduce). clip_grad_norm_'s float32 norm is
    # itself ~5e-5 off the float64 one here (the 8192-row embedding), differently for whole and sharded tensors
    for a, b in zip(ddp, fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-4)
    for growth in records(tmp_path / "fsdp", "growth"):  # every rank grew the same experts
        assert len(set(growth["weights_per_rank"])) == 1
    states = [runs.load_checkpoint(tmp_path / shard)[0] for shard in ("ddp", "fsdp")]
    assert states[1]["model"] is None and (tmp_path / "fsdp" / "shards" / states[1]["shards"]).is_dir()
    named = {runs.load_checkpoint(pt)[0]["shards"] for pt in (tmp_path / "fsdp").glob("*.pt")}  # latest, stageN
    assert {p.name for p in (tmp_path / "fsdp" / "shards").iterdir()} == named  # superseded saves dropped
    assert len(named) == (1 if schedule == "fixed" else 2)
    # each rank wrote its own part; one process reads them all back, weights and moments, as eval.py does
    raw = runs.model_from_checkpoint(states[1], tmp_path / "fsdp" / "latest.pt")
    optimizer = train.make_optimizer(raw, train.Settings(), torch.device("cpu"))
    runs.load_shards(raw, optimizer, runs.shards_of(states[1], tmp_path / "fsdp" / "latest.pt"))
    states[1] = dict(model=raw.state_dict(), optimizer=optimizer.state_dict())
    # the clip factors differ by ~5e-5 a step (above): weights drift 1e-5 apart, Adam's moments 1e-4; a moment
    # stored at another parameter's position would differ by its whole size
    close = lambda a, b, tol: torch.equal(a, b) or ((a.double() - b.double()).norm() / b.double().norm()).item() < tol
    for name, weight in states[0]["model"].items():
        if "expert_counts" not in name:  # each rank's own routing counts: rank 0's are saved
            assert close(states[1]["model"][name], weight, 1e-4), name
    moments = [[s[key] for s in state["optimizer"]["state"].values() for key in ("exp_avg", "exp_avg_sq")]
               for state in states]
    assert len(moments[0]) == len(moments[1]) == 40 and all(close(a, b, 2e-3) for a, b in zip(*moments))


@pytest.mark.parametrize("init,mode", [("gaussian", "reset"), ("copy", "keep"), ("silent", "keep"), ("upcycle", "reset")])
def test_sharded_growth_grows_layer_by_layer_exactly_as_unsharded_growth_does(init, mode):
    """grow_sharded (one MoE layer gathered at a time) against emo.grow_experts and grow_optimizer on a whole
    copy: the same weights, buffers and Adam moments, bit for bit, after the same random draws (one gloo
    process; the two-process tests above split the experts across ranks)."""
    cfg = emo.Config(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32, n_experts=2, d_expert=16,
                     router="softmax" if init in ("gaussian", "copy") else "sigmoid")
    s = train.Settings(growth_init=init, growth_optimizer=mode)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        whole = emo.Transformer(cfg)
        sharded = copy.deepcopy(whole)
        train.wrap(sharded, dataclasses.replace(s, shard="fsdp"), torch.device("cpu"))
        optimizers = [train.make_optimizer(m, s, torch.device("cpu")) for m in (whole, sharded)]
        x = torch.randint(0, 256, (2, 16))
        for model, optimizer in zip((whole, sharded), optimizers):  # one step, so that there are moments
            model(x, x)["loss"].backward()
            optimizer.step()
        torch.manual_seed(1)
        emo.grow_experts(whole, 4, init=init)
        emo.grow_optimizer(optimizers[0], mode)
        torch.manual_seed(1)
        grown, optimizer, _ = train.grow_sharded(sharded, optimizers[1], 4, dataclasses.replace(s, shard="fsdp"),
                                                 torch.device("cpu"))
        local = lambda t: t.full_tensor() if isinstance(t, DTensor) else t
        assert grown.config == whole.config and grown.lm_head.weight is grown.wte.weight
        for (name, a), (_, b) in zip(whole.state_dict().items(), grown.state_dict().items()):
            assert torch.equal(a, local(b)), name
        ours = [{k: local(v) for k, v in optimizer.state[p].items()} for p in grown.parameters() if p in optimizer.state]
        theirs = [optimizers[0].state[p] for p in whole.parameters() if p in optimizers[0].state]
        assert len(ours) == len(theirs) == (0 if mode == "reset" else len(list(whole.parameters())))
        assert all(torch.equal(a[k], b[k]) for a, b in zip(ours, theirs) for k in a)
    finally:
        dist.destroy_process_group()


def test_an_fsdp_run_stopped_before_its_growth_resumes_exactly_through_it(corpus, tmp_path):
    two_processes(two_process_run(corpus, tmp_path / "full", "grown", "--shard=fsdp"))
    two_processes(two_process_run(corpus, tmp_path / "cut", "grown", "--shard=fsdp", "--stop_at=9"),
                  check=False)  # a stop: torchrun reports exit 1
    assert torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)["step"] == 9
    two_processes([f"--resume={tmp_path / 'cut'}"])
    full, cut = records(tmp_path / "full", "step"), records(tmp_path / "cut", "step")
    assert [(r["step"], r["experts"], r["loss"]) for r in full] == [(r["step"], r["experts"], r["loss"]) for r in cut]
    assert [r["experts"] for r in full] == [2] * 12 + [4] * 12


def test_fsdp_with_torch_compile_and_bf16_grows_and_trains_with_two_processes(corpus, tmp_path):
    """Each block compiled on its own inside FSDP2, recompiled after the growth (the GPU recipe's path)."""
    two_processes(two_process_run(corpus, tmp_path, "grown", "--shard=fsdp", "--compile", "--dtype=bf16",
                                  "--total_tokens=3072"))
    steps = records(tmp_path, "step")
    assert [r["experts"] for r in steps] == [2] * 6 + [4] * 6 and steps[-1]["loss"] < 0.8 * steps[0]["loss"]


def test_a_checkpoint_saved_by_two_sharded_processes_continues_in_one(corpus, tmp_path):
    """With batch_tokens fixed, one process reads in two micro-batches the windows two processes read in one
    each: the continuation is the same run, up to the order of the sums."""
    two_processes(two_process_run(corpus, tmp_path / "two", "grown", "--shard=fsdp"))
    two_processes(two_process_run(corpus, tmp_path / "cut", "grown", "--shard=fsdp", "--stop_at=9"), check=False)
    train.main([f"--resume={tmp_path / 'cut'}", f"--out_dir={tmp_path / 'one'}"])
    two, one = records(tmp_path / "two", "step"), records(tmp_path / "one", "step")
    assert [r["step"] for r in one] == list(range(1, 25)) and [r["experts"] for r in one] == [r["experts"] for r in two]
    for a, b in zip(two[9:], one[9:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


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
    """torch.compile around DDP, as configs/gpu-8x.json runs it (bf16 takes the grouped path a GPU takes).
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


def test_a_checkpoint_with_non_finite_weights_is_refused_without_lr_advice(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    broken = write_checkpoint(tmp_path / "latest.pt", lambda s: s["model"]["norm.weight"].fill_(float("nan")))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={broken}", f"--out_dir={tmp_path / 'branch'}"])
    assert_one_line(err, "its weight norm.weight holds NaN or inf .* go on from an earlier checkpoint")


def test_a_resumed_run_keeps_no_copy_of_the_checkpoint(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    s, cfg, stages, world, resume, law = train.setup([f"--resume={tmp_path}"])
    weight = weakref.ref(resume.state["model"]["blocks.0.moe.w_in"])
    raw = emo.Transformer(cfg)
    run = argparse.Namespace(rank=0, world=1, device=torch.device("cpu"), out_dir=tmp_path, log=print, retained=None)
    runs.load_weights(raw, resume.state["model"], resume.path)
    step = runs.resume_from(resume, raw, train.make_optimizer(raw, s, run.device), run)
    assert weight() is None and step == 2  # the weights were copied into the model, then let go


def test_a_checkpoint_from_before_grow_after_resumes_on_the_split_it_ran(corpus, tmp_path):
    """A run saved before --grow_after existed ran the law's own split with the closed loop: it keeps both."""
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    older = write_checkpoint(tmp_path / "latest.pt", lambda s: s["settings"].pop("grow_after"))
    s = train.setup([f"--resume={older}", f"--out_dir={tmp_path / 'branch'}"])[0]
    assert s.grow_after == 0 and train.loop_on(s) == (not s.stages)


def test_a_checkpoint_is_read_memory_mapped_so_ranks_resuming_from_it_share_one_copy(corpus, tmp_path, monkeypatch):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or load(*args, **kwargs))
    runs.load_checkpoint(tmp_path)
    assert calls == [dict(map_location="cpu", weights_only=True, mmap=True)]


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.glob("configs/*.json")), ids=lambda p: p.name)
def test_shipped_configs_parse_and_validate(path):
    settings, model, _ = train.parse([f"--config={path}"])
    experts, _ = train.parse_stages(settings)
    model["n_experts"] = experts[0]
    train.validate(settings, emo.Config(**model), world=8, n_stages=len(experts))


def test_each_shipped_gpu_recipe_writes_to_its_own_run_folder():
    recipes = [train.parse([f"--config={p}"])[0] for p in sorted(Path(__file__).parent.glob("configs/*.json"))
               if p.name != "modular.json"]  # a recipe of settings, not a run of its own
    folders = [s.out_dir for s in recipes] + [train.Settings().out_dir]
    assert len(recipes) == 3 and len(set(folders)) == len(folders)  # a second recipe is never refused


def test_the_paper_modular_recipe_is_emo_modulars_model_sharded_over_eight_gpus():
    s, model, _ = train.parse(["--config=configs/paper-modular.json"])
    cfg = emo.Config(**{**model, "n_experts": 128})
    total, active = emo.count_params(cfg)
    assert 13e9 < total < 14e9 and 1.0e9 < active < 1.4e9  # the paper: ~14B total, ~1B active (its head untied)
    assert s.shard == "fsdp" and s.batch_tokens == 4 * 2**20 and s.batch_tokens % (s.batch_size * cfg.seq_len * 8) == 0
    assert emo.BYTES_PER_PARAM * total / 8 < 40e9 < emo.BYTES_PER_PARAM * total  # fits 80 GB GPUs only when sharded


@pytest.mark.slow  # two train.py processes of ~2.5 GB: ~45 s
def test_the_memory_estimate_grows_with_the_experts_as_a_runs_measured_peak_does(corpus, tmp_path):
    """Two short runs at E = 8 and E = 64 (a CPU's peak resident set holds the Python and torch runtime too, so
    the check is of the difference): what memory_need adds (weights, gradients, AdamW moments; the activations
    barely change at fixed top-k) is within 20 % of what the peak grows by (measured: 11 % more, AdamW's
    temporaries)."""
    shape = ["--d_model=256", "--d_expert=512", "--n_layer=2", "--n_head=4", "--seq_len=128", "--batch_size=16"]
    peak, need = {}, {}
    for E in (8, 64):
        done = subprocess.run([sys.executable, "train.py", f"--data={corpus}", *shape, "--schedule=fixed",
                               f"--experts={E}", "--total_tokens=4096", "--eval_batches=1", "--sample_tokens=0",
                               "--checkpoint_interval=0", f"--out_dir={tmp_path / str(E)}"],
                              cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        peak[E] = records(tmp_path / str(E), "stage")[0]["peak_memory"]
        cfg = emo.Config(**json.loads((tmp_path / str(E) / "config.json").read_text())["model"])
        need[E] = sum(train.memory_need(cfg, 16, False, 1, False).values())
    assert need[64] - need[8] > 500 * 2**20
    assert 0.8 < (peak[64] - peak[8]) / (need[64] - need[8]) < 1.2


def test_a_run_longer_than_its_train_split_is_warned_with_the_epochs(corpus):
    data = Corpus(corpus, "train")
    assert train.epochs_warning(train.Settings(data=str(corpus), total_tokens=len(data.tokens)), data) is None
    warning = train.epochs_warning(train.Settings(data=str(corpus), total_tokens=3 * len(data.tokens)), data)
    assert "is 3.0 epochs of" in warning and "the data repeats" in warning


def grouped_mm_shapes_ok(cfg, experts):
    """torch._grouped_mm's rules for bf16 operands: every row stride a multiple of 16 bytes (8 bf16
    elements) and fewer than 1024 groups (experts)."""
    return all(n % 8 == 0 for n in (cfg.d_model, 2 * cfg.d_expert, cfg.d_expert)) and max(experts) < 1024


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.glob("configs/*.json")) + [None],
                         ids=lambda p: "defaults" if p is None else p.name)
def test_every_shipped_config_fits_the_grouped_matmul(path):
    settings, model, _ = train.parse([f"--config={path}"] if path else [])
    experts, _ = train.parse_stages(settings)
    assert grouped_mm_shapes_ok(emo.Config(**{**model, "n_experts": experts[0]}), experts)


def test_a_non_finite_loss_stops_before_the_step_with_advice_the_program_accepts(corpus, tmp_path):
    args = tiny_run(corpus, tmp_path, "--lr=1e30", "--grad_clip=0", "--warmup_steps=0", "--checkpoint_interval=1")
    with pytest.raises(SystemExit, match=r"non-finite loss or gradient at step \d+ .*the step was not taken") as err:
        train.main(args)
    advice = re.search(r"python train.py (--resume=\S+ --lr=\S+)", str(err.value)).group(1).split()
    s, _, _, _, resume, _ = train.setup(advice)  # resuming with a lower lr is allowed
    assert s.lr == 2.5e29 and resume.state["step"] == len(records(tmp_path, "step"))


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


class HostWaits(TorchDispatchMode):
    """Counts what would make the host wait for a GPU: .item() (aten._local_scalar_dense), .tolist() (patched
    in: on CPU it never dispatches), and ops whose output size depends on values (nonzero, a boolean index)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count, tolist = 0, torch.Tensor.tolist

        def counted_tolist(tensor):
            self.count += 1
            return tolist(tensor)
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        self.count += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default) or bool_index
        return func(*args, **(kwargs or {}))


def test_a_training_step_waits_for_the_device_once_and_its_record_once(monkeypatch):
    """The step's one wait decides whether to take it (a non-finite loss or gradient); the record's one wait
    brings its numbers over. Not counted: AdamW's step counter, which lives on the host unless fused (it is
    fused on CUDA)."""
    model = seeded_model(n_experts=4)  # sigmoid router: the balancing update runs
    emo.grow_experts(model, 8, init="silent")  # 4 experts still phased in: the masked balancing too
    optimizer = train.make_optimizer(model, train.Settings(), torch.device("cpu"))
    x = torch.randint(0, 128, (4, 33))
    batches = [(x[:2, :-1], x[:2, 1:]), (x[2:, :-1], x[2:, 1:])]
    train.train_step(model, optimizer, batches, 1e-3, 1.0, None)  # AdamW's state exists from here on
    step = optimizer.step

    def uncounted_step():
        with _disable_current_modes():
            step()
    monkeypatch.setattr(optimizer, "step", uncounted_step)
    waits = HostWaits(monkeypatch)
    with waits:
        _, _, _, loads = train.train_step(model, optimizer, batches, 1e-3, 1.0, None)
        in_step = waits.count
        report.step_summary(torch.zeros_like(loads, dtype=torch.long), loads, 4, 200)
    assert (in_step, waits.count - in_step) == (1, 1)


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
    (["--replan_params=delta,kappa"], "--replan_params='delta,kappa' is not allowed: must be auto, or names of the law's"),
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
    (["--router=softmax", "--growth_init=silent"], "--growth_init='silent' is not allowed: must be gaussian or copy with router='softmax'"),
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


def test_resume_refuses_a_step_past_the_end_and_a_stop_before_the_checkpoint(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=4"))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={tmp_path}", "--stop_at=3"])
    assert_one_line(err, "--stop_at=3 is not allowed: must be after the checkpoint's step 4")
    far = write_checkpoint(tmp_path / "latest.pt", lambda s: s.update(step=10**6))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={far}", f"--out_dir={tmp_path / 'branch'}"])
    assert_one_line(err, "its step=1000000 is not allowed: must be at most the run's last step 24")


def test_resume_refuses_another_world_size_when_the_batch_depends_on_it_or_another_batch(corpus, tmp_path):
    stopped(tiny_run(corpus, tmp_path, "--stop_at=2"))
    two = write_checkpoint(tmp_path / "latest.pt", lambda s: s.update(world_size=2, rng=s["rng"] * 2))
    with pytest.raises(SystemExit) as err:
        train.main([f"--resume={two}", f"--out_dir={tmp_path / 'branch'}"])
    assert_one_line(err, "the run used 2 process\\(es\\), this one has 1, and its step is one micro-batch a process")
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


def replanned_run(corpus, out, *extra):
    """A run whose closed loop moves its stage ends: 4 stages planned by the law, a re-plan at each end (the one
    at the end of stage 2 moves stage 3's end from step 27 to 12)."""
    return [a for a in tiny_run(corpus, out, "--experts=2,4,8,16", "--grow_after=0", "--total_tokens=16384",
                                "--eval_interval=4", "--replan_params=delta", "--phase_in_steps=2", *extra)
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


def test_the_printed_resume_command_is_shell_quoted(corpus, tmp_path, capsys):
    stopped(tiny_run(corpus, tmp_path / "my run", "--stop_at=2"))
    command = capsys.readouterr().out.split("resume with: ")[1].strip()
    assert command == f"python train.py --resume='{tmp_path / 'my run'}'"
    stopped(shlex.split(command)[2:] + ["--stop_at=3"])
