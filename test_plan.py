"""plan.py: the plan it prints, the law refit to measured runs, law files, and its bad flags."""

import json
import math
import re

import pytest

import emo
import flags
import plan
import runs
import train
from conftest import PAPER_TOKENS, tiny_run, records, assert_one_line


def test_step_time_exponent_is_recovered_from_measured_times():
    experts = [8, 16, 32, 64, 128]
    assert plan.step_time_exponent(experts, [0.5 * E ** 0.1 for E in experts]) == pytest.approx(0.1)


def test_plan_py_prints_the_paper_run_as_json(capsys):
    plan.main(["--preset=paper", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert [s["experts"] for s in out["stages"]] == [8, 16, 32, 64, 128]
    assert sum(s["tokens"] for s in out["stages"]) == out["fixed"]["tokens"]
    assert abs(out["fixed"]["tokens"] - PAPER_TOKENS) < 8_388_608


def test_plan_py_prints_the_stages_train_py_runs_from_the_same_config(tmp_path, capsys):
    """One schedule: plan.py --config plans with train.py's own settings, --grow_after included (train.py's
    default 2: the law's ends to stage 2, then every E at once); a flag overrides the config, even one given at
    plan.py's own default value."""
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"total_tokens": 4_000_000}))
    for extra in ([], ["--grow_after=0"]):
        plan.main([f"--config={config}", "--world_size=1", "--json"] + extra)
        printed = [s["end"] // 2048 for s in json.loads(capsys.readouterr().out)["stages"]]
        s, model, _ = train.parse([f"--config={config}"] + extra)
        experts, fractions = train.parse_stages(s)
        stages = train.plan_schedule(s, emo.Config(**model, n_experts=experts[0]), 2048, experts, fractions)
        assert printed == [st.end for st in stages]
        assert printed == ([76, 162, 163, 164, 1953] if not extra else [76, 162, 380, 890, 1953])  # README's steps
    plan.main([f"--config={config}", "--world_size=1"])
    assert "the law's ends to stage 2, then every E at once (--grow_after=2)" in capsys.readouterr().out


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
    refit = emo.plan_stages(1e6, 2_000_000, [2, 4, 8, 16, 32], 2, law=flags.read_law(tmp_path / "law.json"),
                            batch_tokens=1000)
    assert refit[-1]["start"] < table3[-1]["start"]  # the measured law grows to E_max sooner
    s, model, _ = train.parse([f"--law={tmp_path / 'law.json'}", "--grow_after=0", "--total_tokens=2000000"])
    n_law = emo.law_active_params(emo.Config(**model, n_experts=32))
    expected = emo.plan_stages(n_law, 2_000_000, [2, 4, 8, 16, 32], 2, law=flags.read_law(tmp_path / "law.json"),
                               batch_tokens=1000)
    stages = train.plan_schedule(s, emo.Config(**model, n_experts=2), 1000, [2, 4, 8, 16, 32], None,
                                 flags.read_law(s.law))
    assert [st.end for st in stages] == [p["end"] // 1000 for p in expected]  # train.py plans with the saved law


def test_plan_py_fit_prints_what_it_measured_when_the_refit_law_plans_no_stages(tmp_path, capsys):
    """A larger pool worth so much that every growth belongs in the run's first steps: no split to print, but
    the fit itself (each coefficient with its range) and why there is no plan."""
    true = emo.ScalingLaw(delta=-1.0)
    pilots = [write_fixed_run(tmp_path / f"fixed-{E}", true, 1e6, E, 200) for E in (2, 32)]
    args = [f"--fit={pilots[0]},{pilots[1]}", "--fit_params=delta", "--experts=2,4,8,16,32", "--top_k=2",
            "--n_active=1e6", "--total_tokens=2e6", "--batch_tokens=1000"]
    plan.main(args)
    out = capsys.readouterr().out
    assert "split, refit: none: the refit law gives no usable stages" in out and "E=2 to 0.01%" in out
    assert re.search(r"refit .* -1\.0?\d* ", out) and "10-90 %" in out and "split, Table 3: E=2:" in out
    plan.main(args + ["--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["no_split"] and result["fit"]["values"]["delta"] == pytest.approx(-1.0, abs=0.05)


def test_plan_py_fit_frees_what_fixed_runs_determine_and_prints_each_with_its_range(tmp_path, capsys):
    true = emo.ScalingLaw(delta=-0.5)
    pilots = [write_fixed_run(tmp_path / f"fixed-{E}", true, 1e6, E, 200) for E in (2, 32)]
    args = [f"--fit={pilots[0]},{pilots[1]}", "--experts=2,4,8,16,32", "--top_k=2", "--n_active=1e6",
            "--total_tokens=2e6", "--batch_tokens=1000"]
    plan.main(args)
    out = capsys.readouterr().out
    assert "10-90 %" in out and "stage ends, refit 10-90 %: E=2:" in out
    held = re.search(r"held \(([^)]*)\)", out).group(1).split(", ")
    assert {"alpha", "gamma", "c"} <= set(held)  # one model size cannot tell them from a
    plan.main(args + ["--json"])
    fit = json.loads(capsys.readouterr().out)["fit"]
    assert "delta" in fit["free"] and fit["ranges"]["delta"][0] <= fit["ranges"]["delta"][1]
    assert fit["values"]["delta"] == pytest.approx(-0.5, abs=0.05)


def test_plan_py_prints_per_gpu_memory_under_ddp_and_fsdp2(capsys):
    plan.main(["--config=configs/paper-modular.json", "--world_size=8", "--json"])
    out = json.loads(capsys.readouterr().out)
    memory, params = out["memory_per_gpu"], out["stages"][-1]["params_total"]
    ddp, fsdp = memory["ddp_parts"], memory["fsdp_parts"]
    assert ddp["states"] == 16 * params and fsdp["states"] == ddp["states"] / 8 == pytest.approx(26.7e9, rel=0.01)
    assert ddp["activations"] == fsdp["activations"] > 0 and ddp["copies"] == 2 * params > fsdp["copies"]
    assert memory["ddp"] == sum(ddp.values()) > 80e9 > memory["fsdp"] == sum(fsdp.values())  # the recipe fits sharded
    assert out["fixed"]["tokens"] == pytest.approx(130e9, rel=1e-4) and [s["experts"] for s in out["stages"]] == [128]
    plan.main(["--config=configs/paper-modular.json", "--world_size=16"])
    out = capsys.readouterr().out
    assert re.search(r"DDP [\d.]+ GB \(does not fit 80 GB\), FSDP2 over 16 GPUs [\d.]+ GB \(fits;", out)
    assert "a checkpoint (weights and moments) 160.3 GB, 31 of them at one every 1,000 steps: 4.97 TB" in out
    assert "/ 13.4 GB (FSDP2)" in out
    plan.main(["--config=configs/paper-modular.json", "--world_size=8", "--batch_size=8"])  # 4x the activations
    assert "FSDP2 over 8 GPUs" in (out := capsys.readouterr().out) and "(does not fit; train.py --shard=fsdp)" in out
    plan.main(["--config=configs/modular.json", "--world_size=1", "--json"])  # train.py fills in the rest
    out = json.loads(capsys.readouterr().out)
    assert [s["experts"] for s in out["stages"]] == [2, 4, 8, 16, 32] and out["fixed"]["tokens"] == 1953 * 2048


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
    (["--fit={tmp}/twostage.jsonl", "--fit_params=a,a"], "--fit_params='a,a' is not allowed: must be auto, or names of coefficients, each once"),
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
    assert runs.finite_or_null({"d": [1.0, math.inf, {"x": math.nan}], "n": 2}) == {"d": [1.0, None, {"x": None}], "n": 2}


def test_plan_py_fits_the_step_time_exponent_to_bench_step_output(tmp_path, capsys):
    measured = {"rows": [{"experts": 8, "step_seconds": 1.0}, {"experts": 128, "step_seconds": 1.08}]}
    (tmp_path / "step.json").write_text(json.dumps(measured))
    for given in (str(tmp_path / "step.json"), "8:1.0,128:1.08"):
        plan.main(["--experts=8,128", f"--step_times={given}", "--json"])
        stages = json.loads(capsys.readouterr().out)["stages"]
        assert stages[0]["step_time"] == pytest.approx(1 / 1.08)  # the paper's Fig. 1 ratio, read back
    with pytest.raises(SystemExit, match="--step_times=8:1.0: needs positive step times at two or more"):
        plan.main(["--step_times=8:1.0"])


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
