"""eval.py: expert subsets per domain, finetuning them, its report, and its bad flags."""

import json
from pathlib import Path

import pytest

import eval as evaluate
import train
from data.corpus import GPT2_VOCAB, prepare
from conftest import tiny_run, stopped, assert_one_line


def test_eval_py_prunes_per_domain_and_reports_size_and_specialization(corpus, tmp_path, capsys):
    train.main(tiny_run(corpus, tmp_path, "--pool_size_range=0.25,1.0", "--stages=4:1.0", "--total_tokens=2048"))
    capsys.readouterr()
    evaluate.main([f"--checkpoint={tmp_path}", "--keep=1,0.5,0.25", "--calib_rows=2", "--eval_rows=4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert set(out["domains"]) == {"code", "prose"}
    assert all(set(row) == {"1.0", "0.5", "0.25"} for row in out["domains"].values())
    assert all(set(r) == {"loss", "bpb"} for row in out["domains"].values() for r in row.values())
    assert out["params"]["1.0"] > out["params"]["0.5"] > out["params"]["0.25"]
    for labels in ("domain", "surface"):  # per layer: how much the chosen experts reveal each
        assert len(out["specialization"][labels]) == 2 and 0 <= out["specialization"][labels][0]["nmi"] <= 1


@pytest.mark.parametrize("text,name", [(" ", "whitespace"), ("\n\n", "whitespace"), (" (", "punctuation"),
                                       ("):", "punctuation"), (" 42", "digits"), (" return", "keyword"),
                                       (" the", "keyword"), (" cat", "word"), ("_init", "word"), ("\ufffd", "other"),
                                       ("<|endoftext|>", "other")])
def test_each_token_has_one_surface_class(text, name):
    assert evaluate.token_class(text) == name


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
