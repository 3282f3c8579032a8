"""export.py: an emo model in stock transformers classes with the same logits, routing and tokens; what eval.py
--export may write and replace. Skipped without the optional transformers package."""

import copy
import dataclasses
import importlib.util
import json

import pytest
import torch

import emo
import eval as evaluate
import export
import runs
import train
from data.corpus import GPT2_VOCAB, Corpus, gpt2_encoding
from conftest import seeded_model, tiny_run, assert_one_line, a_users_run


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
