"""Write an emo model as a Hugging Face folder that stock transformers classes load with the same logits:
config.json, model.safetensors, generation_config.json and a GPT-2 tokenizer. No emo code is needed to use it.

How emo maps onto stock classes (weight renaming and config settings only, fp32 weights):
- sigmoid router -> Glm4MoeForCausalLM. DeepSeek-V3 routing is Glm4Moe's: chosen by sigmoid score + a bias
  (e_score_correction_bias = emo's balancing bias + silent growth's ramp), gates = the chosen scores
  renormalised (norm_topk_prob), with one expert group (n_group = topk_group = 1) and no scaling.
- softmax router -> Qwen2MoeForCausalLM with norm_topk_prob off (OLMoE's gates: top-k of the softmax). Its
  shared expert is scaled by sigmoid(shared_expert_gate . x); a zero gate makes that exactly 0.5, and the
  shared expert's down projection is written doubled to cancel it. Its attention always has q/k/v biases
  (vLLM builds them whatever the config says): they are written as zeros.
- The LM head is written as its own tensor (tie_word_embeddings false; vLLM's Glm4Moe never ties it), and
  partial_rotary_factor = 1.0 also at the top level of config.json (llama.cpp's converter reads it there).
- The tokenizer: emo's compact vocabulary is GPT-2's first V - 1 ranks plus <|endoftext|>; a byte-level BPE
  with GPT-2's pattern over those tokens and the merges among them encodes exactly as emo does.

What no stock class represents is refused: routing inside document pools, a restriction that hides experts
without removing them (prune instead), and a sigmoid-router model with one expert (Glm4Moe's router takes the
top two scores of its expert group). Attention kept inside documents (doc_attention) is not carried: the
exported model sees its whole input as one text, which equals emo on any input of one document, as
generation and lm-eval feed it.

python eval.py --checkpoint=runs/default --export=hf/default             # the whole model
python eval.py --checkpoint=runs/modular --keep=0.25 --export=hf/modular  # and each domain's quarter
"""

import copy
import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

import emo
import folders
from data.corpus import gpt2_files
from emo import SettingError, require


def hf_config(cfg, eot_id, kept=None):
    """config.json's fields for the emo Config: Glm4Moe (sigmoid router) or Qwen2Moe (softmax router).
    kept: each layer's kept expert ids of the original model (a pruned export), recorded in emo_kept_experts."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0}
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                  num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, head_dim=cfg.d_model // cfg.n_head,
                  hidden_act="silu", max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps,
                  rope_parameters=rope, moe_intermediate_size=cfg.d_expert,
                  num_experts_per_tok=cfg.top_k, tie_word_embeddings=False, bos_token_id=eot_id,
                  eos_token_id=eot_id, torch_dtype="float32")
    if cfg.router == "sigmoid":
        arch = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", n_routed_experts=cfg.n_experts,
                    n_shared_experts=cfg.n_shared, intermediate_size=cfg.d_expert * max(cfg.n_shared, 1),
                    first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
                    routed_scaling_factor=1.0, use_qk_norm=False, attention_bias=False, num_nextn_predict_layers=0)
    else:
        arch = dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=cfg.n_experts,
                    shared_expert_intermediate_size=cfg.d_expert * cfg.n_shared,
                    intermediate_size=cfg.d_expert * max(cfg.n_shared, 1), norm_topk_prob=False,
                    decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, use_sliding_window=False)
    extra = {"emo_kept_experts": [ids.tolist() for ids in kept]} if kept is not None else {}
    return {**common, **arch, **extra}


def check_exportable(model):
    """One line for what no stock class represents."""
    cfg = model.config
    require(not cfg.pools, "pool_size", cfg.pool_size or cfg.pool_size_range, "None to export (document pools "
            "route each document among experts chosen from all its tokens; no stock class does that: load the "
            "model with pool_size=None, as eval.py does)")
    require(all(moe.expert_mask is None for moe in model.moe_layers()), "expert restriction", "set",
            "none to export (a restriction hides experts without removing them: prune them with emo.prune_experts)")
    require(cfg.n_experts >= min_experts(cfg.router), "n_experts", cfg.n_experts, "at least 2 to export a "
            "sigmoid-router model (Glm4Moe's router takes the top two scores of its expert group): keep more experts")


def min_experts(router):
    """The fewest experts a stock class routes among: Glm4Moe's router (sigmoid) takes its group's top two."""
    return 2 if router == "sigmoid" else 1


@torch.no_grad()
def hf_state_dict(model):
    """emo's weights under the stock class's names and layouts, fp32, every tensor its own copy."""
    cfg, sigmoid = model.config, model.config.router == "sigmoid"
    d, H = cfg.d_model, cfg.d_expert * cfg.n_shared
    out = {"model.embed_tokens.weight": model.wte.weight, "lm_head.weight": model.wte.weight,
           "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        pre, moe = f"model.layers.{i}.", block.moe
        q, k, v = block.attn.qkv.weight.split(d)  # rows: all heads' q, then k, then v
        out.update({pre + "input_layernorm.weight": block.norm1.weight,
                    pre + "post_attention_layernorm.weight": block.norm2.weight,
                    pre + "self_attn.q_proj.weight": q, pre + "self_attn.k_proj.weight": k,
                    pre + "self_attn.v_proj.weight": v, pre + "self_attn.o_proj.weight": block.attn.proj.weight,
                    pre + "mlp.gate.weight": moe.router.weight,
                    pre + "mlp.experts.gate_up_proj": moe.w_in.transpose(1, 2),  # [E, 2h, d]: gate rows, then up
                    pre + "mlp.experts.down_proj": moe.w_out.transpose(1, 2)})  # [E, d, h]
        shared_w_in = moe.shared.w_in.weight if moe.shared else torch.zeros(0, d)
        shared_w_out = moe.shared.w_out.weight if moe.shared else torch.zeros(d, 0)
        name = "mlp.shared_experts." if sigmoid else "mlp.shared_expert."
        out.update({pre + name + "gate_proj.weight": shared_w_in[:H], pre + name + "up_proj.weight": shared_w_in[H:],
                    # Qwen2Moe halves its shared expert (sigmoid of a zero gate): write it doubled
                    pre + name + "down_proj.weight": shared_w_out * (1 if sigmoid else 2)})
        if sigmoid:
            out[pre + "mlp.gate.e_score_correction_bias"] = moe.router.bias + moe.router.ramp
        else:
            out[pre + "mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[pre + f"self_attn.{proj}.bias"] = torch.zeros(d)
    return {name: t.detach().float().cpu().clone().contiguous() for name, t in out.items()}


def write_tokenizer(out_dir, n_vocab):
    """GPT-2's byte-level BPE cut to its first n_vocab - 1 ranks plus <|endoftext|> (the whole of it when
    n_vocab = 50257): GPT-2's token i is rank i, and merge j makes token 256 + j, so the cut keeps the first
    n_vocab - 257 merges. Written as tokenizer.json (built with the tokenizers package, which transformers
    requires) beside GPT-2's own vocab.json / merges.txt form, so any loader finds what it reads."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    encoder_json, vocab_bpe = gpt2_files()
    encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    vocab = {token: i for token, i in encoder.items() if i < n_vocab - 1}
    vocab["<|endoftext|>"] = n_vocab - 1
    merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:n_vocab - 256]  # line 0: "#version"
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's pattern, then bytes
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    bpe.save(str(out_dir / "tokenizer.json"))
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    eot = "<|endoftext|>"
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="GPT2Tokenizer", bos_token=eot, eos_token=eot, unk_token=eot, add_prefix_space=False,
        model_max_length=1_000_000), indent=1))


def transformers_or_refuse():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SettingError("--export needs the transformers package (pip install transformers)") from None


def export_problem(out_dir):
    """Why out_dir cannot take an export, or None: it may be missing, empty, or an export emo wrote (its
    emo_export.json lists every file) holding nothing else; never a run or corpus folder, nor inside one."""
    out_dir = Path(out_dir)
    why = folders.replace_problem(out_dir, "export")
    if why:
        return why
    parent = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be written: {parent} is not writable"
    return None


def export(model, out_dir, n_vocab, kept=None, source=None):
    """Write model (an emo Transformer, unwrapped) to out_dir as a Hugging Face folder; n_vocab: the size of
    the corpus's tokenizer (the model's vocab_size may be padded past it); source: what it came from, for
    emo_export.json. The folder is written beside out_dir and swapped in whole, so a failed export leaves
    the old one; an old one is replaced only where export_problem allows. Returns out_dir."""
    transformers_or_refuse()
    from transformers import AutoConfig, AutoModelForCausalLM

    model = emo.unwrap(model)
    check_exportable(model)
    fields = hf_config(model.config, n_vocab - 1, kept)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.load_state_dict(hf_state_dict(model), strict=True, assign=True)
    hf.generation_config.update(bos_token_id=n_vocab - 1, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1)
    out_dir = Path(out_dir)
    why = export_problem(out_dir)
    require(not why, "--export", out_dir, f"a folder an export may be written to; it {why}")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(tmp)
        # transformers keeps partial_rotary_factor inside rope_parameters; llama.cpp's converter reads it at the top
        config_file = tmp / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "partial_rotary_factor": 1.0},
                                          indent=2))
        write_tokenizer(tmp, n_vocab)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / folders.MARKERS["export"]).write_text(json.dumps({"made_by": "eval.py --export", "source": source,
                                                                  "files": files}, indent=1))
        aside = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-old"
        if out_dir.exists():
            os.replace(out_dir, aside)
        os.replace(tmp, out_dir)
        folders.clear(aside)
    except OSError as err:  # /proc, a read-only file system, a full disk: the old folder stays as it was
        raise SettingError(f"--export: cannot write {out_dir}: {err.strerror or type(err).__name__}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@torch.no_grad()
def logits_difference(model, folder, x):
    """Load the folder with transformers and run it and model on token windows x [B, T]. Returns the largest
    |logits difference| in fp32 ("fp32"); emo's own fp32 rounding error there, its fp32 logits against its
    float64 ones ("emo_fp32_rounding"), the scale any fp32 comparison is bounded by; and the difference with
    both models in float64 ("float64"), where rounding no longer hides a wrong mapping. Attention inside
    documents is not exported, so model runs without it here."""
    from transformers import AutoModelForCausalLM

    plain = copy.deepcopy(emo.unwrap(model)).eval()
    plain.config = replace(plain.config, doc_attention=False)
    ours = plain(x)
    ours64 = plain.double()(x)  # the same model, converted in place
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    # transformers' grouped experts kernel takes no float64: its plain per-expert loop does
    hf64 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, experts_implementation="eager").eval()
    diff = {"fp32": (hf(x).logits - ours).abs().max().item(),
            "emo_fp32_rounding": (ours.double() - ours64).abs().max().item(),
            "float64": (hf64(x).logits - ours64).abs().max().item()}
    require(all(math.isfinite(v) for v in diff.values()) and ours.isfinite().all(), "exported model", folder,
            f"finite logits to be checked (its logits differences: {diff}): the model's weights hold NaN or inf, or "
            f"overflow")
    return diff
