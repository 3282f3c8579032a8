"""bench.py: step, repro, growth, frontier and the CPU part of gpu, on tiny runs; and what it may delete."""

import argparse
import json
import math
import os
import shutil

import pytest
import torch

import bench
import emo
import runs
import train
from conftest import tiny_run, records, assert_one_line, a_users_run


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
    (["frontier", "--trained_at=0.3"], "--trained_at='0.3' is not allowed: must be a comma-separated subset of "
                                       "0.5,0.25,0.125, each once"),
    (["repro", "--seeds="], "--seeds= is empty: give a value, or leave the flag out"),
    (["repro", "--train_args=--out_dir=mine"], "--train_args='--out_dir=mine' is not allowed: must be train.py flags "
                                               "other than --out_dir"),
]


@pytest.mark.parametrize("argv,match", BENCH_BAD)
def test_bad_bench_flags_fail_with_one_line(argv, match):
    with pytest.raises(SystemExit) as err:
        bench.main(argv)
    assert_one_line(err, "^bench.py: .*" + match)


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


def changed_defaults(argv):
    """The train.py settings that argv gives a value other than its default."""
    s, model, given = train.parse(argv)
    default = lambda k: getattr(train.Settings, k) if k in train.Settings.__dataclass_fields__ else getattr(emo.Config, k)
    return {k for k in given if (getattr(s, k) if hasattr(s, k) else model[k]) != default(k)}


def test_the_default_arms_of_bench_pass_no_flag_that_changes_a_train_py_default():
    """What RESULTS calls emo's default is what `python train.py` runs: bench.py's default progressive arm
    changes only what bench.py sets for every run; its growth runs, beside that, only what they are about
    (the init, Table 3's split) and how often they evaluate."""
    args = argparse.Namespace(experts="2,4,8,16,32", total_tokens=2_500_000, out_dir="runs/x", train_args="")
    per_run = {"out_dir", "seed", "total_tokens", "sample_tokens"}
    _, command = bench.arm_command("progressive", bench.repro_arms(args)["progressive"], 1, args)
    assert changed_defaults(command[2:]) <= per_run
    growth = bench.growth_flags("gaussian", 1, "runs/x", args)
    assert changed_defaults(growth) <= per_run | {"growth_init", "grow_after", "replan", "eval_interval", "eval_batches",
                                                  "log_interval"}


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
    args = argparse.Namespace(seeds="0", experts="2,4", inits="gaussian", total_tokens=2048,
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


def test_a_finished_run_is_reused_by_its_settings_not_by_how_its_flags_are_spelled(corpus, tmp_path):
    """Another folder, another flag order, the same values: the same run. Another value: not."""
    flags = [a for a in tiny_run(corpus, "x") if a.split("=")[0] not in ("--out_dir", "--total_tokens", "--stages")]
    args = argparse.Namespace(seeds="0", total_tokens=2048, out_dir=str(tmp_path / "a"), train_args="")
    out = bench.run_arm("fixed", [*flags, "--schedule=fixed", "--experts=4"], 0, args)
    copy = tmp_path / "b" / out.name
    shutil.copytree(out, copy)
    args.out_dir = str(tmp_path / "b")
    reordered = bench.arm_command("fixed", ["--experts=4", "--schedule=fixed", *reversed(flags)], 0, args)[1]
    assert bench.finished(copy, reordered)
    assert not bench.finished(copy, [*reordered, "--lr=0.001"])
    assert not bench.finished(copy, [*reordered, "--pool_size_range=0.25,1.0"])
    (copy / "command.json").unlink()  # command.json is written last: without it the run did not finish
    assert not bench.finished(copy, reordered)


def test_bench_growth_keeps_table_3s_split_so_that_each_growth_has_steps_of_its_own(corpus, tmp_path):
    """The closed loop would move E = 8 and 16 to the steps right after E = 4 (at this scale the run's curve
    moves them: the re-plan test above); bench.py growth turns it off to see each growth apart."""
    tiny_flags = [a for a in tiny_run(corpus, "x") if a.split("=")[0] not in ("--out_dir", "--total_tokens", "--stages")]
    args = argparse.Namespace(seeds="0", inits="silent", total_tokens=16384, out_dir=str(tmp_path),
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
    args = argparse.Namespace(seeds="0", experts="2,4", inits="gaussian", total_tokens=4096,
                              out_dir=str(tmp_path), train_args=f"--data={corpus}")
    live = tmp_path / "fixed-4-seed0"
    lock = runs.claim_folder(live, resuming=False)  # as a running train.py holds it
    (live / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(emo.SettingError, match=f"pid {os.getpid()}\\) is running"):
        bench.bench_repro(args)
    assert (live / "metrics.jsonl").read_text() == "{}\n"
    lock.close()


def test_bench_frontier_prunes_each_arm_and_compares_it_with_models_trained_at_the_pruned_sizes(corpus, tmp_path):
    args = argparse.Namespace(seeds="0", experts="2,4,8", trained_at="0.5,0.25,0.125", total_tokens=2048,
                              out_dir=str(tmp_path), train_args=" ".join(a for a in tiny_run(corpus, "x") if a.split("=")[0] not in
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


def test_the_frontier_trains_the_papers_recipe_beside_emos_only_when_they_differ(monkeypatch):
    args = argparse.Namespace(experts="2,4,8,16,32", train_args="", trained_at="0.25")
    assert ("modular-paper" in bench.frontier_arms(args)) != bench.recipe_is_papers()
    monkeypatch.setattr(bench, "recipe_is_papers", lambda: False)
    flags, share = bench.frontier_arms(args)["modular-paper"]
    s, model, _ = train.parse(flags)
    assert share is None and all(f in flags for f in bench.PAPER_MODULAR)
    assert (model["router"], model["pool_size_range"], s.schedule, s.experts) == ("softmax", (0.0625, 1.0), "fixed", "32")


def test_each_modular_lead_compares_arms_that_differ_only_by_their_pools():
    """Per lead: the standard MoE and EMO-modular share every setting but the pools, the MoE trained at the
    subset's size differs from the standard one only in E; a lead that changes only the pools reuses the paper's
    standard and trained runs; the paper's recipe is spelled out, whatever configs/modular.json says."""
    arms = bench.modular_arms(argparse.Namespace(leads=",".join(bench.MODULAR_LEADS)))
    for lead, roles in arms.items():
        (std, std_flags), (mod, mod_flags), (trained, trained_flags) = (roles[r] for r in ("standard", "modular",
                                                                                          "trained"))
        s_std, m_std, _ = train.parse(std_flags[1:] + [f"--config={bench.HERE / 'configs' / 'modular.json'}"])
        s_mod, m_mod, _ = train.parse(mod_flags[1:] + [f"--config={bench.HERE / 'configs' / 'modular.json'}"])
        assert m_std["pool_size_range"] is None and m_mod["pool_size_range"] is not None
        assert {k: v for k, v in m_std.items() if k != "pool_size_range"} == \
            {k: v for k, v in m_mod.items() if k != "pool_size_range"}
        assert set(std_flags) ^ set(trained_flags) <= {f for f in std_flags + trained_flags if f.startswith("--experts=")}
        assert all(f in mod_flags for f in bench.PAPER_MODULAR)
    assert arms["floor"]["standard"][0] == arms["paper"]["standard"][0] == "standard-paper"
    assert arms["floor"]["trained"][0] == "trained-paper" and arms["window"]["standard"][0] == "standard-window"
    assert arms["sigmoid-floor"]["standard"] == arms["sigmoid"]["standard"]  # the same command, the same run
    assert arms["sigmoid-floor"]["trained"] == arms["sigmoid"]["trained"]


def test_bench_modular_measures_both_gaps_seed_by_seed_and_how_routing_specialises(corpus, tmp_path):
    args = argparse.Namespace(seeds="0", leads="paper,floor", total_tokens=2048, out_dir=str(tmp_path),
                              train_args=" ".join(a for a in tiny_run(corpus, "x") if a.split("=")[0] not in
                                                  ("--out_dir", "--total_tokens", "--stages")))
    result = bench.bench_modular(args)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "modular-floor-seed0", "modular-paper-seed0", "standard-paper-seed0", "trained-paper-seed0"]
    paper, floor = result["leads"]
    assert floor["standard"] == paper["standard"]  # the same standard run
    bpb = {(r["arm"], r["keep"]): r["bpb"] for r in result["runs"]}
    assert paper["full_gap"] == [pytest.approx(bpb["modular-paper", 1.0] - bpb["standard-paper", 1.0])]
    assert paper["pruned_gap"] == [pytest.approx(bpb["modular-paper", 0.25] - bpb["trained-paper", 1.0])]
    assert paper["smallest"] == [pytest.approx(bpb["modular-paper", bench.SMALLEST_KEEP])]
    assert result["best"] == {"standard": "standard-paper", "trained": "trained-paper"}  # the only ones here
    assert floor["full_gap_best"] == floor["full_gap"] and floor["pruned_gap_best"] == floor["pruned_gap"]
    assert paper["causal_gap"] == [pytest.approx(bpb["modular-paper", "causal"] - bpb["standard-paper", 1.0])]
    assert all(0 <= v[0] <= 1 for v in paper["nmi"].values()) and len(paper["nmi"]) == 4


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
    assert report["ok"] and len(report["checks"]) == 16 and all(c["ok"] for c in report["checks"])
    assert any(c["check"].startswith("compiled bf16 modular run") for c in report["checks"])
    assert [s.split(":")[0] for s in report["skipped"]] == bench.CUDA_ONLY
    table = capsys.readouterr().out
    assert "| resume at a stage boundary continues the run | ok | " in table and "allowed 0.005" in table


def test_the_gpu_tables_pass_or_fail_against_their_floors():
    """bench.py gpu's acceptance lines for the moe and step tables, on rows as those benchmarks write them."""
    moe = [dict(experts=8, tokens_per_s={"grouped+compile": 100.0}, grouped_vs_naive=3.0),
           dict(experts=128, tokens_per_s={"grouped+compile": 80.0}, grouped_vs_naive=1.5)]
    assert all(c["ok"] for c in bench.moe_table_checks(moe))
    moe[1]["tokens_per_s"]["grouped+compile"] = 40.0  # E = 128 at 40 % of E = 8: a broken dispatch
    assert [c["ok"] for c in bench.moe_table_checks(moe)] == [True, False]
    step = [dict(experts=8, step_time_ratio=1.0, mfu=0.3, peak_memory=10e9),
            dict(experts=128, step_time_ratio=1.2, mfu=0.25, peak_memory=14e9)]
    assert all(c["ok"] for c in bench.step_table_checks(step, [11e9, 15e9]))
    assert [c["ok"] for c in bench.step_table_checks(step, [11e9, 10e9])] == [True, True, False]  # 1.4x the estimate
    step[0]["mfu"] = None  # a GPU whose peak FLOP/s emo does not know
    assert [c["ok"] for c in bench.step_table_checks(step, [11e9, 15e9])] == [True, False, True]


def unchanged(folder, before):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("what", ["users run", "bench arm with notes", "bench arm with a subfolder"])
def test_bench_never_deletes_a_folder_it_cannot_prove_it_made(corpus, tmp_path, what):
    args = argparse.Namespace(seeds="0", experts="2,4", inits="gaussian", total_tokens=4096,
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
    args = argparse.Namespace(seeds="0", inits="gaussian", total_tokens=16384,
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
