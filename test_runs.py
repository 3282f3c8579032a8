"""runs.py: flags and --help for every command, run folders and their one owner, atomic checkpoints and the
checks they pass on load, metrics.jsonl, and what a run measures of itself (memory, MFU, the loss plot)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench
import emo
import eval as evaluate
import flags
import plan
import report
import runs
import train
from data.corpus import DataError
from data.prepare import main as prepare_main
from conftest import (tiny, seeded_model, tiny_run, stopped, records, train_process, wait_for_steps,
                      assert_one_line, write_checkpoint)


def test_flags_override_a_config_files_stage_list_whichever_form_each_gives(tmp_path):
    (tmp_path / "c.json").write_text('{"experts": "2,4,8"}')
    s, _, _ = train.parse([f"--config={tmp_path / 'c.json'}", "--stages=4:0.5,8:0.5"])
    assert train.parse_stages(s) == ([4, 8], [0.5, 0.5])


def test_a_run_folder_deleted_under_a_running_process_is_not_a_second_error(tmp_path):
    with pytest.raises(RuntimeError, match="the run's own error"):
        with runs.Run(tmp_path / "run", "cpu", 1, new=True, keep_latest=1):
            shutil.rmtree(tmp_path / "run")
            raise RuntimeError("the run's own error")  # reported as is, not as FileNotFoundError from cleanup


@pytest.mark.parametrize("name,flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2250e12),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_flops_follow_the_device_name_and_unknown_devices_have_none(name, flops):
    assert report.peak_flops_of(name) == flops
    assert report.peak_flops("cpu") is None and report.mfu(1e6, tiny(), "cpu") is None  # shown as '-'


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
    summary = report.step_summary(idle, loads, 2, s.collapse_steps)
    assert report.collapse_warnings(summary, s, check_cv=False) == ["layer 0: experts [1] got no token for 3 steps"]
    assert "layer 0: expert load CV 1.52 > --max_load_cv=1.0" == report.collapse_warnings(summary, s, check_cv=True)[1]
    assert summary["new_share"] == pytest.approx(4 / 15) and summary["load_cv"] == pytest.approx(1.52 / 2, abs=0.01)


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
    (lambda p, m: write_checkpoint(p, lambda s: s.update(model=None, optimizer=None, shards="2-0123abcd")),
     "its weights and moments are in .*shards/2-0123abcd, which is missing \\(a sharded checkpoint is its file and "
     "that folder: copy or move both\\)"),
    (lambda p, m: write_checkpoint(p, lambda s: s.update(shards="../../etc")), "the checkpoint's 'shards' is not"),
    (lambda p, m: write_checkpoint(p, lambda s: s.update(shards="2-0123abcd")), "the checkpoint's 'model' is not"),
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


def test_only_shard_folders_no_checkpoint_names_are_dropped_and_none_when_a_checkpoint_is_unreadable(tmp_path):
    """Sharded saves write shards/.NAME.tmp and rename it NAME; a save killed midway, or one no checkpoint file
    names any more, is removed after the next save; a user's folder there, or anything while some checkpoint in
    the run folder cannot be read (it might name any of them), is kept."""
    shards = tmp_path / "shards"
    names = ["12-0123abcd", "8-00000000", ".16-1111aaaa.tmp", "mine", "24-2222bbbb"]
    for name in names:
        (shards / name).mkdir(parents=True)
    torch.save({"shards": "12-0123abcd"}, tmp_path / "stage1.pt")
    torch.save({"shards": "24-2222bbbb"}, tmp_path / "latest.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    runs.drop_unnamed_shards(tmp_path)
    assert sorted(p.name for p in shards.iterdir()) == sorted(names)
    (tmp_path / "broken.pt").unlink()
    runs.drop_unnamed_shards(tmp_path)
    assert sorted(p.name for p in shards.iterdir()) == ["12-0123abcd", "24-2222bbbb", "mine"]


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

    monkeypatch.setattr(flags.ArgumentParser, "parse_args", record)
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


def test_a_peak_memory_window_sees_a_big_allocation_and_forgets_it_after_a_reset():
    cpu = torch.device("cpu")
    if not report.reset_peak_memory(cpu):
        pytest.skip("no resettable peak RSS on this OS")
    base = report.peak_memory(cpu)
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert report.peak_memory(cpu) >= base + 60 * 2**20
    del big
    report.reset_peak_memory(cpu)
    assert report.peak_memory(cpu) < base + 32 * 2**20


def write_metrics(folder, evals, growth_steps=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"kind": "step", "step": s, "tokens": 100 * s} for s in range(1, 11)]
    lines += [{"kind": "eval", "step": s, "val_loss": v} for s, v in evals]
    lines += [{"kind": "growth", "step": s, "val_loss": 5.0} for s in growth_steps]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_the_loss_plot_is_optional_and_says_so_without_matplotlib(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run", [(5, 6.0), (10, 5.0)], growth_steps=[5])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    message = report.plot_losses({"run": tmp_path / "run"}, tmp_path / "loss.png")
    assert "matplotlib is not installed" in message and not (tmp_path / "loss.png").exists()


def test_the_loss_plot_is_a_png_with_every_run(tmp_path):
    pytest.importorskip("matplotlib")  # optional: skipped where it is not installed
    write_metrics(tmp_path / "a", [(5, 6.0), (10, 5.0)], growth_steps=[5])
    write_metrics(tmp_path / "b", [(5, 6.5), (10, 5.5)])
    write_metrics(tmp_path / "c", [(5, 6.1), (10, 5.2)])
    folders = {"a": tmp_path / "a", "b and c": [tmp_path / "b", tmp_path / "c"]}  # seeds: thin lines and a mean
    assert report.plot_losses(folders, tmp_path / "loss.png").startswith("wrote")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def test_a_runs_own_config_json_starts_a_run_like_it(corpus, tmp_path):
    train.main(tiny_run(corpus, tmp_path / "a", "--lr=2e-3", "--pool_size_range=none"))
    s, cfg, stages, _, _, _ = train.setup([f"--config={tmp_path / 'a' / 'config.json'}",
                                           f"--out_dir={tmp_path / 'b'}"])
    assert (s.lr, s.data, s.stages, cfg.d_model, cfg.n_experts) == (2e-3, str(corpus), "2:0.5,4:0.5", 64, 2)
    with pytest.raises(SystemExit) as err:  # its own folder holds the run: continue it or start elsewhere
        train.main([f"--config={tmp_path / 'a' / 'config.json'}"])
    assert_one_line(err, "already holds a run: continue it with --resume")


RELIABILITY_BAD = [
    ("train", ["--replan_params=delta,delta"], "--replan_params='delta,delta' is not allowed: must be auto, or names of the "
                                               "law's coefficients, each once"),
    ("train", ["--d_model=1048576", "--n_head=4"], "the model=.*parameters at E=4.* is not allowed: must be one whose "
                                                   "weights, gradients, Adam moments and activations"),
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
