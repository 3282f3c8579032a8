"""emo: progressive Mixture-of-Experts training, the method in one file.

Read top to bottom, in the order the papers meet the ideas:
  1. Config            every model setting, validated on construction
  2. Attention         RMSNorm, rotary position embeddings, causal self-attention, the SwiGLU feed-forward
  3. Router            which experts a token uses: sigmoid + selection-only bias, or softmax + balancing loss
  4. MoE layer         dropless grouped dispatch: sort (token, slot) pairs by expert, one grouped matmul each
  5. Document pools    EMO-modular: every token of a document routes inside the document's pool of experts
  6. Transformer       the decoder and its loss (chunked, so the logits never fill memory), sampling, accounting
  7. Load balancing    the bias update the trainer calls after every optimizer step
  8. Expert growth     EMO-progressive's stage transition: grow_experts, grow_optimizer
  9. Scaling law       the joint MoE law, the stage-budget rule plan_stages, a run's Stages
 10. Closed loop       the law refit to a run's own evals, only what they identify; replan moves later stage ends
 11. Expert subsets    EMO-modular's selective use: select, restrict and prune experts; specialization
 12. Reference         reference_moe: each token routed alone, its experts run one by one (what tests compare to)

EMO-progressive (arXiv 2605.13247) grows the expert pool E in stages at fixed top-k; EMO-modular (arXiv
2605.06663) routes each document inside a pool of experts. Equations are cited by the numbers their papers print.

Shapes, written [dims] throughout:
  B batch (sequences)   T tokens per sequence   N = B*T tokens   d d_model   H heads   V vocabulary
  E experts in a layer  k top_k (slots per token)   h d_expert   S documents in a batch   n rows of a chunk
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# 1. Config --------------------------------------------------------------------------------------------------

ROUTERS = ("sigmoid", "softmax")


@dataclass(frozen=True)
class Config:
    """Every model setting. Frozen: growth and pruning give the model a new Config (dataclasses.replace)."""
    vocab_size: int = 8192  # the default corpus's compact GPT-2 vocabulary (train.py takes the corpus's)
    seq_len: int = 128  # tokens per training window (and the longest context)
    n_layer: int = 4  # transformer blocks, each attention + an MoE layer
    n_head: int = 4  # attention heads (d_model / n_head must be even: RoPE)
    d_model: int = 64  # width of the residual stream
    n_experts: int = 8  # E: routed experts per MoE layer (this is what grows)
    top_k: int = 2  # k: routed experts per token (never changes, so compute per token is fixed)
    d_expert: int = 64  # hidden size of one SwiGLU expert
    n_shared: int = 1  # always-on shared experts
    router: str = "sigmoid"  # "sigmoid" (DeepSeek-V3, EMO-progressive) or "softmax" (OLMoE, EMO-modular)
    bias_rate: float = 1e-3  # sigmoid router: gamma, the balancing bias step per optimizer step
    lb_coef: float = 0.01  # softmax router: weight of the load-balancing loss
    lb_window: int = 1  # softmax router: optimizer steps whose expert loads the balancing loss counts
    # (1: this micro-batch alone; more: the loads of the last lb_window - 1 steps too, a global-batch estimate)
    z_coef: float = 1e-3  # softmax router: weight of the router z-loss
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 2.0**-23  # RMSNorm epsilon: fp32's machine epsilon, torch's default (Llama: 1e-6)
    phase_in_steps: int = 20  # silent growth: steps for a new expert's offset to climb one unit of score
    # (20 measured better than 100 at 1M and 4M tokens: RESULTS.md, the default run)
    # EMO-modular document pools (off by default): each document routes inside its own pool of experts
    pool_size: int | float | None = None  # experts per pool: an int counts, a float in (0, 1] a share of E
    pool_size_range: tuple | None = None  # (lo, hi): training draws P per document and layer from [lo, hi]
    eot_id: int = 8191  # the token that ends a document (<|endoftext|>; train.py takes the corpus's)
    doc_attention: bool = False  # also keep attention inside each document
    pool_causal: bool = False  # each token's pool from its document's tokens so far, not the whole document
    # (the whole document's pool lets a token's routing see later tokens: fine for routing, not for a fair loss)

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model", "n_experts", "top_k",
                     "d_expert", "phase_in_steps", "lb_window"):
            self.check(name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "a positive integer")
        self.check("n_shared", _is_int(self.n_shared) and self.n_shared >= 0, "an integer >= 0")
        self.check("router", self.router in ROUTERS, f"one of {', '.join(ROUTERS)}")
        for name in ("bias_rate", "lb_coef", "z_coef"):
            self.check(name, _is_number(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
        for name in ("rope_theta", "norm_eps"):
            self.check(name, _is_number(getattr(self, name)) and getattr(self, name) > 0, "a number > 0")
        self.check("top_k", self.top_k <= self.n_experts, f"at most n_experts={self.n_experts}")
        self.check("d_model", self.d_model % self.n_head == 0, f"a multiple of n_head={self.n_head}")
        self.check("d_model", (self.d_model // self.n_head) % 2 == 0,
                   "such that the head size d_model/n_head is even (RoPE rotates pairs)")
        self.check("eot_id", _is_int(self.eot_id) and (0 <= self.eot_id < self.vocab_size or not self.documents),
                   f"a token id below vocab_size={self.vocab_size} (it delimits documents)")
        for name in ("doc_attention", "pool_causal"):
            self.check(name, isinstance(getattr(self, name), bool), "true or false")
        if self.pool_size_range is not None:
            self.check("pool_size_range", isinstance(self.pool_size_range, (tuple, list))
                       and len(self.pool_size_range) == 2, "a pair (lo, hi)")
            object.__setattr__(self, "pool_size_range", tuple(self.pool_size_range))
            self.check("pool_size_range", pool_count(self.pool_size_range[0], self)
                       <= pool_count(self.pool_size_range[1], self), "a pair (lo, hi) with lo <= hi")
        pools = [("pool_size", self.pool_size)] + [("pool_size_range", v) for v in self.pool_size_range or ()]
        for name, value in pools:
            self.check(name, value is None or pool_count(value, self) >= self.top_k,
                       f"an int >= top_k={self.top_k} (experts per pool) or a float in (0, 1] (a share of E)")

    @property
    def pools(self):
        return self.pool_size is not None or self.pool_size_range is not None

    @property
    def documents(self):  # does the model need document boundaries?
        return self.pools or self.doc_attention

    def check(self, name, ok, allowed):
        require(ok, f"Config.{name}", getattr(self, name), allowed)


class SettingError(ValueError):
    """A setting outside what is allowed: the scripts print it as one line, before any heavy work."""


def require(ok, name, value, allowed):
    """The one validation idiom of emo: fail with one line naming the setting, its value and what is allowed."""
    if not ok:
        raise SettingError(f"{name}={value!r} is not allowed: must be {allowed}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pool_count(value, cfg):
    """Experts in a document pool: an int is a count (capped at E); a float is a share of E, so it scales
    with growth, and never below top_k (early stages have few experts). 0 for a value of the wrong kind,
    which validation then rejects."""
    if _is_int(value):
        return min(value, cfg.n_experts)
    if _is_number(value) and 0 < value <= 1:
        return max(round(value * cfg.n_experts), cfg.top_k)
    return 0


# 2. Attention and the feed-forward --------------------------------------------------------------------------


def rope_tables(seq_len, head_dim, theta):
    """cos/sin of the angle t * theta_i, theta_i = theta^(-2i/head_dim) (RoFormer eq. 15), for every
    position t and pair i."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angle = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs of x [B, H, T, head_dim] by their position's angle (RoFormer eq. 34). Pairs are
    (x_i, x_{i + head_dim/2}), the rotate-half layout of GPT-NeoX and Llama, not RoFormer's interleaved
    (x_2i, x_2i+1): the same rotations on permuted dimensions, which the learned projections absorb."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask=None):
        """x [B, T, d]; mask: None for plain causal attention, else [B, 1, T, T] bool (True = may attend)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """A dense SwiGLU feed-forward, W_out(silu(W_gate x) * W_up x); gate and up fused in one matmul."""

    def __init__(self, d_model, hidden):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


# 3. Router --------------------------------------------------------------------------------------------------


def count_tokens(idx, n_experts):
    """Tokens per expert; scatter_add_ rather than bincount, which breaks torch.compile graphs."""
    flat = idx.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


def all_reduce_sum(t):
    """Sum t over data-parallel ranks (no-op when not distributed): balancing must see the global batch."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


class Router(nn.Module):
    """Which k experts each token uses, and their gate weights. Owns its weight (one row per expert), the
    sigmoid router's balancing bias, silent growth's ramp, and the tokens each expert got since the last
    balancing update. Eval-mode forwards keep their decision (last_idx, last_scores) for analysis;
    training forwards keep nothing (a side effect in a compiled training graph can drop the gradient)."""

    def __init__(self, cfg, weight):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(weight)  # [E, d]
        # sigmoid router: the balancing bias decides which experts are chosen, never their weight
        self.register_buffer("bias", torch.zeros(len(weight)))
        # silent growth: a non-positive selection offset that keeps new experts unchosen until it reaches 0
        self.register_buffer("ramp", torch.zeros(len(weight)))
        self.register_buffer("expert_counts", torch.zeros(len(weight), dtype=torch.int64))
        if cfg.router == "softmax" and cfg.lb_window > 1:
            # the global loads [lb_window - 1, E] of the last steps, oldest first (update_router_bias keeps it)
            self.register_buffer("load_history", torch.zeros(cfg.lb_window - 1, len(weight)))
        self.last_idx = self.last_scores = None

    def logits(self, x):
        """x [N, d] -> [N, E], in fp32 even under bf16 autocast: bf16 scores tie often and make top-k arbitrary."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def scores(self, logits):
        return logits.sigmoid() if self.cfg.router == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, logits, allowed, k):
        """Top-k among the allowed experts (bool [N, E], or None for all). Returns indices [N, k], gates [N, k],
        tokens per expert [E] (counted once: dispatch, balancing and the loss share it), and (lb, z)."""
        scores = self.scores(logits)
        if self.cfg.router == "sigmoid":
            # DeepSeek-V3 eqs. 13-16: s = sigmoid(z); chosen by s + b; gates = s / sum of the chosen s
            select = scores + self.bias + self.ramp
            if allowed is not None:
                select = select.masked_fill(~allowed, float("-inf"))
            idx = select.topk(k, dim=-1).indices
            gates = scores.gather(1, idx)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        else:
            # OLMoE: p = softmax over the allowed experts (-inf elsewhere, so no gradient reaches them);
            # gates = top-k of p, not renormalised
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
                scores = logits.softmax(dim=-1)
            gates, idx = scores.topk(k, dim=-1)
        counts = count_tokens(idx, len(self.weight))
        if self.cfg.router == "softmax":  # router z-loss (ST-MoE eq. 5) on the logits it routed with
            aux = (self.balance_loss(counts, scores), torch.logsumexp(logits, dim=-1).square().mean())
        else:
            aux = (logits.new_zeros(()), logits.new_zeros(()))
        if self.training:  # eval forwards must not move the balancing bias
            self.expert_counts += counts
        else:
            self.last_idx, self.last_scores = idx, scores.detach()
        return idx, gates, counts, aux

    def balance_loss(self, counts, probs):
        """Switch load-balancing loss E * sum_i f_i * P_i (Fedus et al. 2022, eq. 4); = 1 at uniform routing.
        f_i: share of the (token, slot) assignments that go to expert i, counted over the global batch and,
        with lb_window > 1, the last lb_window - 1 steps' batches too: a few documents confined to their pools
        make one batch's load lumpy, which a balancing loss then fights (global-batch balancing, Qiu et al.
        2025); P_i: mean router probability of expert i on this rank (the part that carries the gradient)."""
        counts = all_reduce_sum(counts).float()
        if hasattr(self, "load_history"):
            counts = counts + self.load_history.sum(dim=0)
        f = counts / counts.sum()
        return len(self.weight) * (f * probs.mean(dim=0)).sum()


# 4. The MoE layer: dropless grouped dispatch ----------------------------------------------------------------


def grouped_mm_supported(x):
    """Where torch._grouped_mm runs: CPU (fp32, bf16) and CUDA bf16 on sm80+, but only bf16 under
    torch.compile (its fake-tensor rule rejects fp32); elsewhere we loop over experts."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def expert_matmul(x, w, counts, grouped):
    """Row block e of x (counts[e] rows, sorted by expert) times expert e's weight w[e] [d_in, d_out]."""
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)  # end offset of each expert's rows
        return torch._grouped_mm(x, w, offs=offs)
    # fallback: one matmul per expert on its contiguous slice (the host needs the counts to split)
    return torch.cat([xe @ we for xe, we in zip(x.split(counts.tolist()), w)])


class MoE(nn.Module):
    """n_experts routed SwiGLU experts (stacked 3-D weights), their router, and n_shared always-on experts."""

    def __init__(self, cfg, seed=0):
        super().__init__()
        self.cfg = cfg
        w_in, w_out, router = self.fresh_experts(cfg.n_experts, torch.Generator().manual_seed(seed))
        # stored [E, d_in, d_out] so tokens multiply them as x @ w[e], with no transpose in the hot path
        # (transformers stores [E, d_out, d_in]; export.py transposes)
        self.w_in = nn.Parameter(w_in)  # [E, d_model, 2*d_expert]: gate and up projections, fused
        self.w_out = nn.Parameter(w_out)  # [E, d_expert, d_model]
        self.router = Router(cfg, router)
        # n shared experts, all on with weight 1, are exactly one SwiGLU of n times the hidden size
        self.shared = SwiGLU(cfg.d_model, cfg.n_shared * cfg.d_expert) if cfg.n_shared else None
        self.use_grouped_mm = True  # tests and benchmarks switch it off to compare with the loop
        self.expert_mask = None  # bool [E]: route only among these experts (restrict_experts)

    @property
    def n_experts(self):
        return self.w_in.shape[0]  # from the weights, so growth and pruning cannot leave it stale

    def fresh_experts(self, n, generator=None):
        """Weights for n experts and their router rows in the model's normal init (Transformer.init_weights),
        drawn expert by expert: from the layer's own generator at construction, so expert i starts the same
        whatever E (runs of one seed share their initial weights), from torch's RNG at growth (checkpointed)."""
        cfg, out_std = self.cfg, 0.02 / math.sqrt(2 * self.cfg.n_layer)
        draws = [(torch.randn(cfg.d_model, 2 * cfg.d_expert, generator=generator) * 0.02,
                  torch.randn(cfg.d_expert, cfg.d_model, generator=generator) * out_std,
                  torch.randn(cfg.d_model, generator=generator) * 0.02) for _ in range(n)]
        return tuple(torch.stack(parts) for parts in zip(*draws))

    def forward(self, x, seg=None):
        """x [B, T, d], seg [B*T] each token's document (pools on) -> output [B, T, d], router losses (lb, z)."""
        B, T, d = x.shape
        x = x.reshape(B * T, d)  # [N, d]
        idx, gates, counts, aux = self.route(x, seg)  # [N, k], [N, k], [E]
        y = self.dispatch(x, idx, gates, counts)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, d), aux

    def route(self, x, seg=None):
        """The router's choice for each token of x [N, d] among the experts it may use (its document's pool,
        this layer's restriction): (indices [N, k], gates [N, k], tokens per expert [E], (lb, z))."""
        logits = self.router.logits(x)  # [N, E]
        allowed = self.allowed_experts(logits, seg)  # None, or bool [N, E]
        k = self.cfg.top_k if self.expert_mask is None else min(self.cfg.top_k, int(self.expert_mask.sum()))
        return self.router(logits, allowed, k)

    def allowed_experts(self, logits, seg):
        """Which experts each token may use: its document's pool (EMO-modular, section 5) within this layer's
        restriction (expert_mask, section 10). The pool is chosen by the router's own scores, without
        gradient through the choice."""
        sizes = pool_sizes(self.cfg, len(logits), self.training, logits.device) if seg is not None else None
        if sizes is None:
            return None if self.expert_mask is None else self.expert_mask.expand(len(logits), -1)
        ranked = self.router.scores(logits).detach()
        pools = document_pools(ranked if self.expert_mask is None else ranked * self.expert_mask, seg, sizes,
                               self.cfg.pool_causal)
        return pools if self.expert_mask is None else pools & self.expert_mask

    def dispatch(self, x, idx, gates, counts):
        """Dropless grouped MoE: every (token, slot) pair is computed, none dropped, no capacity factor.
        The grouped matmuls always get N*k >= 1 rows in all (every token takes k >= 1 slots, also under a
        restriction, which lowers k to what is allowed): a call with zero rows in total, which inductor
        rejects, cannot happen. Single experts may get zero rows; their weights then get zero gradient."""
        N, k = idx.shape
        order = idx.flatten().argsort(stable=True)  # (N*k,): (token, slot) pairs grouped by expert
        token = order // k  # which token each sorted pair came from
        # grouped_mm is not autocast-aware: cast activations and weights to the autocast dtype ourselves
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = x.index_select(0, token).to(dtype)  # (N*k, d); backward is index_add_, cheaper than x[token]'s
        grouped = self.use_grouped_mm and grouped_mm_supported(xs)
        h = expert_matmul(xs, self.w_in.to(dtype), counts, grouped)  # (N*k, 2*d_expert)
        gate, up = h.chunk(2, dim=-1)
        ys = expert_matmul(F.silu(gate) * up, self.w_out.to(dtype), counts, grouped)  # (N*k, d)
        ys = ys * gates.flatten()[order].unsqueeze(-1).to(ys.dtype)
        # scatter-add back in the residual's dtype: a token's k expert outputs are summed in full precision
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


# 5. Document pools (EMO-modular) ----------------------------------------------------------------------------


def pool_sizes(cfg, n_segments, training, device):
    """Pool size P of each document segment: drawn from pool_size_range while training (per document and
    per layer, as the paper), else pool_size; None when pools are off (evaluation routes over all experts
    unless pool_size is set, as the paper's inference does)."""
    if training and cfg.pool_size_range is not None:
        lo, hi = (pool_count(v, cfg) for v in cfg.pool_size_range)
        return torch.randint(lo, hi + 1, (n_segments,), device=device)
    if cfg.pool_size is None:
        return None
    return torch.full((n_segments,), pool_count(cfg.pool_size, cfg), device=device)


def document_segments(idx, eot_id):
    """Each token's document segment in the flattened batch [B*T]. A document starts at a row's first token
    and after every <|endoftext|>, which belongs to the document it ends. Ids are b*T + (EOTs before t in
    row b), so they are unique per row and below B*T (a static size: no graph break under compile)."""
    B, T = idx.shape
    starts = F.pad(idx[:, :-1] == eot_id, (1, 0))  # token t opens a document if token t-1 was an EOT
    local = starts.long().cumsum(dim=1)
    return (local + torch.arange(B, device=idx.device)[:, None] * T).flatten()


def document_attention_mask(seg):
    """[B, 1, T, T] bool: causal attention that stays inside each document."""
    T = seg.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def document_pools(scores, seg, sizes, causal=False):
    """EMO-modular's pools: a_d = sum of the router scores of document d's tokens; d's pool is its top-P_d
    experts by a_d. scores [N, E], seg [N] in [0, S), sizes [S] -> [N, E] bool pool membership. causal: token
    t's pool from a_d summed over d's tokens up to t only (a document's tokens are contiguous in N)."""
    if causal:
        total = scores.cumsum(dim=0)  # [N, E]
        first = torch.full_like(seg, len(seg)).scatter_reduce_(0, seg, torch.arange(len(seg), device=seg.device),
                                                               "amin")  # [S]: each document's first token
        start = first[seg]  # [N]
        before = torch.where((start > 0)[:, None], total[(start - 1).clamp(min=0)], torch.zeros_like(total))
        rank = (total - before).argsort(dim=1, descending=True).argsort(dim=1)
        return rank < sizes[seg][:, None]
    doc_score = scores.new_zeros(len(sizes), scores.shape[1]).index_add_(0, seg, scores)
    rank = doc_score.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = the document's favourite expert
    return (rank < sizes[:, None])[seg]


# 6. Transformer ---------------------------------------------------------------------------------------------

LOSS_CHUNK = 2**25  # logits per chunk of the loss: 128 MB in fp32 whatever the batch (bench.py step: memory)


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of the LM head's logits h @ W^T a chunk of rows at a time, so no [N, V] logits outlive a
    chunk (at V = 50K they were most of a small model's memory). dL/dlogits = softmax - onehot is known in the
    forward, so each chunk's share of dL/dh and dL/dW is computed there, nothing is recomputed (Liger-Kernel's
    fused linear cross-entropy), and backward only scales them. Returns the summed loss and each row's [N]."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype, grad_enabled):
        # h [N, d], weight [V, d], targets [N]; matmuls in `dtype`, logits and softmax in fp32
        want_h, want_w = (grad_enabled and want for want in ctx.needs_input_grad[:2])  # none in evaluation
        hc, wc = h.to(dtype), weight.to(dtype)
        losses = torch.empty(len(h), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        for start in range(0, len(h), chunk):
            rows = slice(start, start + chunk)
            logits = (hc[rows] @ wc.T).float()  # [n, V]: the only logits alive
            lse = logits.logsumexp(dim=-1)  # (n,)
            target = targets[rows, None]  # [n, 1]
            losses[rows] = lse - logits.gather(1, target).squeeze(1)
            if want_h or want_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad = grad.scatter_add_(1, target, -torch.ones_like(lse[:, None])).to(dtype)  # - onehot
                if want_h:
                    grad_h[rows] = grad @ wc  # [n, d]
                if want_w:
                    grad_w += grad.T @ hc[rows]  # [V, d], summed in fp32
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, _):
        scaled = [None if g is None else g * grad_sum.to(g.dtype) for g in ctx.saved_tensors]  # the loss's scale
        return *scaled, None, None, None, None


def linear_cross_entropy(h, weight, targets):
    """(summed loss, per-row losses [N]) of the logits h [N, d] @ weight^T against targets [N], in chunks
    of LOSS_CHUNK logits. Under autocast the matmuls run in its dtype, as F.linear's would."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    chunk = max(1, LOSS_CHUNK // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(h, weight, targets, chunk, dtype, torch.is_grad_enabled())


class Block(nn.Module):
    def __init__(self, cfg, seed=0):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = MoE(cfg, seed)

    def forward(self, x, cos, sin, seg=None, mask=None):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        y, aux = self.moe(self.norm2(x), seg)
        return x + y, aux


class Transformer(nn.Module):
    """GPT-style decoder with an MoE feed-forward in every layer; input embedding tied to the LM head.
    Causal: position t never sees tokens after t, except through document pools, which (as in the paper)
    choose each document's experts from all of its tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # the routed experts' own streams (drawn on the CPU also where the model is built as shapes only, on meta)
        expert_seeds = torch.randint(2**62, (cfg.n_layer,), device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(cfg, seed) for seed in expert_seeds)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        cos, sin = rope_tables(cfg.seq_len, cfg.d_model // cfg.n_head, cfg.rope_theta)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.config = cfg
        self.init_weights()

    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, cfg):
        """Growth and pruning give the model a new Config; every layer reads this one."""
        self._config = cfg
        for block in getattr(self, "blocks", []):
            block.moe.cfg = block.moe.router.cfg = cfg

    def init_weights(self):
        # GPT-2 init: every matrix N(0, 0.02); projections that write into the residual stream (attention
        # out, expert and shared down) get 0.02/sqrt(2*n_layer) so the residual's variance stays O(1) with
        # depth. Routed experts were drawn in MoE.fresh_experts with the same rule (growth reuses it).
        out_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = out_std if name.endswith(("attn.proj", "shared.w_out")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def moe_layers(self):
        return [block.moe for block in self.blocks]

    def forward(self, idx, targets=None, reduction="mean"):
        """idx [B, T] token ids. Without targets: the logits [B, T, V]. With targets [B, T]: a dict of losses,
        returned rather than stored on the module (a side effect inside a compiled graph can drop the
        loss's gradient): "loss" = ce + lb_coef * lb + z_coef * z, what to backpropagate; "ce" the
        cross-entropy, its mean, or per token [B, T] with reduction="none"; "lb", "z" the router's
        auxiliary losses averaged over layers (zero for the sigmoid router)."""
        B, T = idx.shape
        cfg = self.config
        if T > cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds Config.seq_len={cfg.seq_len}")
        x = self.wte(idx)
        cos, sin = self.cos[:T], self.sin[:T]
        seg = document_segments(idx, cfg.eot_id) if cfg.documents else None
        mask = document_attention_mask(seg.view(B, T)) if cfg.doc_attention else None
        lb = z = 0.0
        for block in self.blocks:
            x, (layer_lb, layer_z) = block(x, cos, sin, seg if cfg.pools else None, mask)
            lb, z = lb + layer_lb, z + layer_z
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h)
        ce_sum, ce_tokens = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        ce = ce_sum / ce_tokens.numel()
        lb, z = lb / cfg.n_layer, z / cfg.n_layer  # averaged over layers
        return {"loss": ce + cfg.lb_coef * lb + cfg.z_coef * z, "ce": ce_tokens.view(B, T) if reduction == "none"
                else ce, "lb": lb, "z": z}

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx [B, T]; temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.seq_len:])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def num_params(self, active=False):
        """Total parameters, or active ones: all but the (E - k) routed experts a token does not use."""
        return count_params(self.config)[1 if active else 0]


def count_params(cfg):
    """(total, active) parameters of Transformer(cfg), from the shapes alone (so plan.py can size 10B models)."""
    d, h, E, k = cfg.d_model, cfg.d_expert, cfg.n_experts, cfg.top_k
    expert = 3 * d * h  # one SwiGLU expert: gate, up, down
    per_layer = 4 * d * d + 2 * d + cfg.n_shared * expert + E * d  # attention, 2 norms, shared, router
    total = cfg.vocab_size * d + d + cfg.n_layer * (per_layer + E * expert)  # tied embedding, final norm
    active = total - cfg.n_layer * (E - k) * expert
    return total, active


def law_active_params(cfg):
    """The joint MoE law's N: active parameters with the embedding and the unembedding counted apart, as
    Ludziejewski et al. count them, also when the two are one tied matrix (which count_params counts once)."""
    return count_params(cfg)[1] + cfg.vocab_size * cfg.d_model


BYTES_PER_PARAM = 16  # fp32 weights 4 + gradients 4 + Adam moments 8 (bf16 autocast keeps fp32 masters)


def activation_bytes(cfg, windows, bf16=False):
    """Bytes autograd keeps for the backward of one micro-batch of `windows` windows of seq_len, run eagerly (a
    compiled graph may recompute some and keep less). Per token and layer: the residual stream, the norms and
    attention's q, k, v and output (~12 d-vectors in fp32), the routed slots' and the shared experts' inputs
    and hidden activations (bf16 under bf16), the router's scores [E]; document attention's [T, T] mask; at the
    head, the loss's precomputed dL/dh and dL/dW (LinearCrossEntropy). Not counted: the weights' bf16 copies
    (train.memory_need). The coefficients are least squares over the bytes autograd saves on a CPU at ten
    shapes; test_emo checks the estimate against those bytes at other shapes, within 15 %."""
    d, h, k, s, E, V = cfg.d_model, cfg.d_expert, cfg.top_k, cfg.n_shared, cfg.n_experts, cfg.vocab_size
    if bf16:
        per_layer, head, loss_grad = 37 * d + 9 * k * d + 5 * k * h + 9 * s * h + 10 * E, 10 * d, 8 * V * d
    else:
        per_layer, head, loss_grad = 48 * d + 12 * k * d + 16 * k * h + 16 * s * h + 4 * E, 12 * d, 4 * V * d
    mask = cfg.seq_len if cfg.doc_attention else 0  # one bool [T, T] per window, shared by the layers
    return windows * cfg.seq_len * (cfg.n_layer * per_layer + head + mask) + loss_grad


def flops_per_token(cfg):
    """Training FLOPs per token: 6 * N_active (Kaplan et al. 2020) + attention scores 12 * n_layer * d * T."""
    return 6 * count_params(cfg)[1] + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len


def unwrap(model):
    """The Transformer inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    # `is not None`, never `or`: a module's truth value calls len(), which a compiled Transformer lacks
    while (inner := getattr(model, "module", getattr(model, "_orig_mod", None))) is not None:
        model = inner
    return model


# 7. Load balancing: one call after every optimizer step -----------------------------------------------------


@torch.no_grad()
def update_router_bias(model):
    """Aux-loss-free balancing (DeepSeek-V3 sec. 2.1.2): b_i += gamma * sign(mean load - load_i).

    Loads are the tokens each expert got since the last call, summed over micro-batches and all ranks
    (one all-reduce for all layers). Also advances silent growth's ramp. Returns the loads [n_layer, E].
    """
    routers = [moe.router for moe in unwrap(model).moe_layers()]
    loads = all_reduce_sum(torch.stack([r.expert_counts for r in routers])).float()
    for router, load in zip(routers, loads):
        if router.cfg.router == "sigmoid":
            # experts still held out by silent growth's ramp are not balanced yet: their bias would climb
            # every step they get nothing, and they would enter above every old expert and take all tokens.
            # Masked arithmetic, not indexing by the mask: a boolean index waits for the device every step
            on = (router.ramp >= 0).to(router.bias.dtype)  # [E]: 1 for the experts being balanced
            n_on = on.sum().clamp(min=1)
            router.bias += on * router.cfg.bias_rate * torch.sign((load * on).sum() / n_on - load)
            router.bias -= on * ((router.bias * on).sum() / n_on)  # re-centre: only differences matter
            router.ramp.add_(1.0 / router.cfg.phase_in_steps).clamp_(max=0.0)
        if hasattr(router, "load_history"):  # the balancing window moves on by one step
            router.load_history.copy_(torch.cat([router.load_history[1:], load[None]]))
        router.expert_counts.zero_()
    return loads


# 8. Expert growth (EMO-progressive): E -> n_experts in every MoE layer, top_k fixed -------------------------

GROWTH_INITS = ("gaussian", "copy", "silent", "upcycle")
COPY_NOISE = 0.1  # "copy" init: noise std relative to the init std, so copies do not stay twins
PHASED_INITS = ("silent", "upcycle")  # inits that leave the output unchanged: sigmoid router only
UPCYCLE_DROP = 0.5  # "upcycle" init: share of a copy's hidden units drawn afresh (Drop-Upcycling's r = 0.5)


@torch.no_grad()
def grow_experts(model, n_experts, init="gaussian"):
    """Grow every MoE layer from E to n_experts experts, in place; old weights are kept bit for bit.

    gaussian: new experts and router rows get the normal init; the balancing bias is reset to 0 (the paper).
    copy:     new expert j copies old expert j mod E (and its router row) plus small noise (paper ablation).
    silent:   function-preserving (ours). New experts get a selection offset below every old expert's, so no
              token picks them and the output is unchanged; the offset climbs to 0 over ~phase_in_steps
              optimizer steps and the bias balancing phases them in.
    upcycle:  silent's phase-in, but new expert j starts as trained expert j mod E with a random half of its
              hidden units drawn afresh (Drop-Upcycling, Nakamura et al., ICLR 2025), so it arrives with
              learned features yet does not stay its source's twin; its router row is fresh.
    Parameters stay the same objects (their .data grows), so an optimizer keeps pointing at them; call
    grow_optimizer next, and re-wrap DDP / re-compile once. Returns the unwrapped model.
    """
    model = unwrap(model)
    cfg = model.config
    require(_is_int(n_experts) and n_experts > cfg.n_experts, "grow_experts: n_experts", n_experts,
            f"an integer > the current {cfg.n_experts}")
    check_growth_init(init, cfg.router)
    model.config = replace(cfg, n_experts=n_experts)  # validated before any weight changes
    for moe in model.moe_layers():
        grow_layer(moe, n_experts - moe.n_experts, init)
    return model


def check_growth_init(init, router, name="grow_experts: init"):
    """An init grow_experts knows, and a function-preserving one only with the sigmoid router: softmax gates are
    normalised over all experts, so any new expert changes every output. name: the setting, as the caller says it
    (train.py refuses --growth_init with this before any work)."""
    require(init in GROWTH_INITS, name, init, f"one of {', '.join(GROWTH_INITS)}")
    require(init not in PHASED_INITS or router == "sigmoid", name, init, "gaussian or copy with router='softmax' "
            "(its gates are normalised over all experts, so any new expert changes every output)")


def grow_layer(moe, n_new, init):
    """Append n_new experts (and router rows) to one MoE layer (see grow_experts)."""
    old, router = moe.n_experts, moe.router
    fresh = moe.fresh_experts(n_new)
    params = (moe.w_in, moe.w_out, router.weight)
    src = torch.arange(n_new) % old  # copy and upcycle: new expert j starts from old expert j mod E
    if init == "copy":
        fresh = tuple(p.data[src].cpu() + COPY_NOISE * f for p, f in zip(params, fresh))
    if init == "upcycle":
        fresh = (*upcycled(moe, src, *fresh[:2]), fresh[2])
    for p, f in zip(params, fresh):
        set_param_data(p, torch.cat([p.data, f.to(p.device, p.dtype)]))
    if init in PHASED_INITS:
        # new experts start at the mean bias; their offset puts s + b + ramp below every old expert's
        # s + b whatever the scores (sigmoid scores lie in (0, 1)), so no token picks them yet
        new_bias = router.bias.mean()
        start = router.bias.min() - new_bias - 1.0 - 1e-3
        router.bias = torch.cat([router.bias, new_bias.repeat(n_new)])
        router.ramp = torch.cat([router.ramp, start.repeat(n_new)])
    else:
        router.bias = router.bias.new_zeros(old + n_new)  # the paper resets the bias at every expansion
        router.ramp = router.ramp.new_zeros(old + n_new)
    router.expert_counts = torch.cat([router.expert_counts, router.expert_counts.new_zeros(n_new)])
    if hasattr(router, "load_history"):  # the balancing window starts afresh on the grown pool
        router.load_history = router.load_history.new_zeros(len(router.load_history), old + n_new)
    if moe.expert_mask is not None:  # a restriction covers the old experts only; new ones are allowed
        moe.expert_mask = torch.cat([moe.expert_mask, moe.expert_mask.new_ones(n_new)])


def upcycled(moe, src, fresh_in, fresh_out):
    """Drop-Upcycling: copies of experts src [n] whose hidden units in a random UPCYCLE_DROP share (the same
    units in the gate, up and down projections) take fresh weights. Returns (w_in [n, d, 2h], w_out [n, h, d])."""
    w_in, w_out = moe.w_in.data[src].cpu(), moe.w_out.data[src].cpu()
    hidden = w_out.shape[1]
    drop = torch.rand(len(src), hidden).argsort(dim=1) < round(UPCYCLE_DROP * hidden)  # [n, h], exactly r*h each
    w_in = torch.where(drop.repeat(1, 2)[:, None, :], fresh_in, w_in)  # gate and up halves drop the same units
    w_out = torch.where(drop[:, :, None], fresh_out, w_out)
    return w_in, w_out


def set_param_data(p, data):
    """Give parameter p new data of another shape, keeping p itself (optimizers and DDP point at it)."""
    p.grad = None
    # A live autograd graph (the last step's loss, say) keeps p's gradient accumulator, which remembers p's
    # old shape and would reject the new gradient. set_data drops that accumulator only when the dtype
    # changes, so hop through another dtype on the way.
    p.data = data.to(torch.float64 if data.dtype != torch.float64 else torch.float32)
    p.data = data


OPTIMIZER_MODES = ("reset", "keep")


def grow_optimizer(optimizer, mode="reset"):
    """Fit optimizer state to grown parameters. reset: drop all state (the paper's choice).
    keep: old slices keep their Adam moments, new experts' slices start at zero."""
    require(mode in OPTIMIZER_MODES, "grow_optimizer: mode", mode, f"one of {', '.join(OPTIMIZER_MODES)}")
    if mode == "reset":
        optimizer.state.clear()
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    state[key] = zero_padded(value, p.shape)


def zero_padded(value, shape):
    """An old moment grown to `shape`: its values where the old experts are (they come first), zeros after."""
    padded = value.new_zeros(shape)
    padded[tuple(slice(0, n) for n in value.shape)] = value
    return padded


# 9. Scaling law and stage budgets (EMO-progressive sec. 3): how many tokens each stage gets -----------------

LAW_COEFFICIENTS = ("a", "alpha", "delta", "gamma", "b", "beta", "omega", "zeta", "c")


@dataclass
class ScalingLaw:
    """Joint MoE scaling law (Ludziejewski et al. 2025, arXiv 2502.05172, eq. 6; defaults from their Table 3):

        L(N, D, e) = m(e) * N^mu(e) + n(e) * D^nu(e) + c
        m = a * E^delta,  mu = alpha + gamma * ln E,  n = b * E^omega,  nu = beta + zeta * ln E

    N: active parameters (embeddings included), D: training tokens, E: the saturated expansion e_hat(e).
    The law was fitted with top-1 experts, where e is total/active expert parameters; with top-k of E
    experts we use e = E / k (= 1 / (1 - sparsity)), which is what reproduces EMO-progressive's reported
    split (plan_stages). Fit range: N <= 2.7B, e in 1..32, D 0.5B..80B. Coefficients may be floats or
    tensors (for fit).
    """
    a: float = 35.91
    alpha: float = -0.1889
    delta: float = -0.2285
    gamma: float = 0.0098
    b: float = 35.98
    beta: float = -0.1775
    omega: float = 0.5529
    zeta: float = -0.0259
    c: float = 1.3637
    e_start: float = 2.0732
    e_max: float = 290.4521

    def e_hat(self, e):
        """Clark et al. 2022's saturating transform, as the law uses it:
        1/E = 1/(e - 1 + (1/e_start - 1/e_max)^-1) + 1/e_max."""
        return 1.0 / (1.0 / (e - 1.0 + 1.0 / (1.0 / self.e_start - 1.0 / self.e_max)) + 1.0 / self.e_max)

    def terms(self, e):
        """(m, mu, n, nu) at expansion e: the law's Table 4 columns."""
        e = torch.as_tensor(e, dtype=torch.float64)
        log_e = self.e_hat(e).log()
        return (self.a * log_e.mul(self.delta).exp(), self.alpha + self.gamma * log_e,
                self.b * log_e.mul(self.omega).exp(), self.beta + self.zeta * log_e)

    def predict(self, n_active, tokens, e):
        """Predicted loss (eq. 6) as a float64 tensor; arguments broadcast."""
        m, mu, n, nu = self.terms(e)
        N, D = (torch.as_tensor(v, dtype=torch.float64) for v in (n_active, tokens))
        return m * N.log().mul(mu).exp() + n * D.log().mul(nu).exp() + self.c

    def loss(self, n_active, tokens, e):
        return self.predict(n_active, tokens, e).item()

    def optimal_tokens(self, n_active, e):
        """D*(e | N): the token count at which N active parameters are compute-optimal at expansion e.
        Minimising L at fixed F = 6ND gives mu * m * N^mu = nu * n * D^nu (the law's eq. 7), so
        D* = (mu * m * N^mu / (nu * n))^(1/nu)."""
        m, mu, n, nu = self.terms(e)
        return ((mu * m * float(n_active) ** mu / (nu * n)) ** (1.0 / nu)).item()

    def tokens_to_reach(self, loss, n_active, e):
        """The D at which the law reaches `loss` at expansion e (inf if never): continues the curve across a
        growth as if growth preserved the loss (the larger model starts where the smaller one ended)."""
        m, mu, n, nu = self.terms(e)
        data_term = loss - self.c - m * float(n_active) ** mu
        return math.inf if data_term <= 0 else ((data_term / n) ** (1.0 / nu)).item()


def plan_stages(n_active, total_tokens, experts, top_k, law=None, batch_tokens=None, grow_after=0):
    """EMO-progressive's stage budgets: for each stage its E, token range, budget and predicted loss.

    The paper states the goal (stage budgets from a sparsity-aware law) but not the rule; this is our
    reconstruction, and it reproduces the paper's reported split within a point per stage (plan.py
    --preset=paper). At fixed active size N, the model with expansion e = E/k is compute-optimal up to
    D*(e) tokens (ScalingLaw.optimal_tokens); past it the pool is too small for the data seen, so grow.
    D* rises with e, so stage s ends at the cumulative share D*(e_s) / D*(e_last) of the run:
        end_s = total_tokens * D*(e_s) / D*(e_last),   tokens_s = end_s - end_{s-1}.
    A smaller N saturates a small pool sooner: it grows earlier. With batch_tokens, boundaries are rounded
    to whole optimizer steps; budgets always sum to the total. The predicted loss continues each stage from
    where the last ended (ScalingLaw.tokens_to_reach). Costs (time, memory) are priced by plan.py.
    grow_after > 0 (emo's own, train.py's default 2): keep the rule's ends up to the end of that stage, then
    bring every later E at once, one step (batch) apart; a small model's larger pool pays sooner than Table 3,
    fitted at 100M+ parameters, says (README, RESULTS.md).
    """
    law = law or ScalingLaw()
    _check_plan(n_active, total_tokens, experts, top_k, batch_tokens, grow_after)
    unit = batch_tokens or 1
    steps = total_tokens // unit
    optimal = [law.optimal_tokens(n_active, E / top_k) for E in experts]
    ends = [round(steps * d / optimal[-1]) * unit for d in optimal[:-1]] + [total_tokens]
    if 0 < grow_after < len(ends) - 1:
        ends[grow_after:-1] = [ends[grow_after - 1] + i * unit for i in range(1, len(ends) - grow_after)]
    stages, start, loss = [], 0, None
    for i, (E, end) in enumerate(zip(experts, ends)):
        tokens, e = end - start, E / top_k
        require(tokens > 0, "experts", experts, f"stages that each get tokens: stage {i + 1} (E={E}) gets none "
                f"after rounding to batch_tokens={batch_tokens}; give more total_tokens or fewer stages")
        already = 0 if loss is None else law.tokens_to_reach(loss, n_active, e)
        loss = law.loss(n_active, already + tokens, e) if math.isfinite(already) else loss
        stages.append(dict(stage=i + 1, experts=E, e=e, start=start, end=end, tokens=tokens,
                           fraction=tokens / total_tokens, steps=tokens // unit if batch_tokens else None,
                           loss=loss, in_fit_range=e <= 32))
        start = end
    return stages


def _check_plan(n_active, total_tokens, experts, top_k, batch_tokens, grow_after):
    require(_is_number(n_active) and n_active > 0, "n_active", n_active, "a positive number of active parameters")
    require(_is_int(total_tokens) and total_tokens > 0, "total_tokens", total_tokens, "a positive integer")
    require(experts and all(_is_int(E) and E > 0 for E in experts) and all(b > a for a, b in zip(experts, experts[1:])),
            "experts", experts, "positive integers, strictly increasing (the pool only grows)")
    require(_is_int(top_k) and 1 <= top_k <= experts[0], "top_k", top_k,
            f"an integer from 1 to the first stage's E={experts[0]}")
    if batch_tokens is not None:
        require(_is_int(batch_tokens) and batch_tokens > 0, "batch_tokens", batch_tokens, "a positive integer")
        require(total_tokens % batch_tokens == 0, "total_tokens", total_tokens, f"a whole number of batches of "
                f"batch_tokens={batch_tokens} (e.g. {max(total_tokens // batch_tokens, 1) * batch_tokens})")
    require(_is_int(grow_after) and grow_after >= 0, "grow_after", grow_after, "an integer >= 0")


@dataclass(frozen=True)
class Stage:
    """One stage of a run as train.py trains it and the closed loop re-plans it, in optimizer steps."""
    index: int  # 1, 2, ...
    experts: int  # E during the stage
    start: int  # first optimizer step
    end: int  # the step after its last


def stages_at(experts, ends):
    """The stages of these E, ending at these steps: each starts where the one before ended
    (plan_stages' token ends divided by the batch, or replan's)."""
    return [Stage(i + 1, E, b, e) for i, (E, b, e) in enumerate(zip(experts, [0] + ends[:-1], ends))]


# 10. The closed loop (emo's addition to EMO-progressive): the law refit to a run's own evals ---------------
# The paper plans every stage once, from Table 3, before training. emo can re-plan at each stage end from the
# run's own validation evals (replan_run; train.py does for the law's own split): refit the coefficients the evals
# identify (identified, fit_law), re-solve the later ends with plan_stages' rule (replanned_ends), and move them
# only when bootstrap refits agree (bootstrap_fits, replan). plan.py --fit does the same fit on whole runs.

FIT_KEYS = ("law_n_active", "tokens", "experts", "top_k", "val_loss")


def law_text(law):
    """The coefficients in one line, for messages."""
    return ", ".join(f"{k}={getattr(law, k):.3g}" for k in LAW_COEFFICIENTS)


# What runs of one model size can determine. A small model's loss first falls far faster than any power law of
# tokens (a transient that Table 3, fitted from 0.5B tokens on, never saw): the fit carries it as
# t_size * exp(-D / t_tokens), the same for every E, so that neither the token term nor what a larger pool is
# worth has to absorb it. At one N the parameter term m(e) * N^mu(e) and the floor c are one level per E, so
# a, alpha, gamma and c move together; each curve gives its token term (b, beta); curves at two or more E give
# how the level and the token term change with E (delta, omega, zeta). FIT_ORDER is the order in which
# identified() frees them; IDENTIFIED the share of a coefficient's effect on the fit that must be its own.
TRANSIENT = ("t_size", "t_tokens")
FIT_ORDER = ("b", "beta") + TRANSIENT + ("delta", "omega", "zeta", "a", "c", "alpha", "gamma")
E_TERMS = ("delta", "gamma", "omega", "zeta")  # what a larger pool is worth
LOG_SCALE = ("a", "b", "c") + TRANSIENT  # fitted as logarithms: positive, and on the scale of their effect
IDENTIFIED = 0.01
BOOTSTRAP_ROUNDS = 24


def fit_columns(records):
    """The fit's data as float64 columns, one per FIT_KEYS entry, a value per (run, stage) record."""
    return {key: torch.tensor([float(r[key]) for r in records], dtype=torch.float64) for key in FIT_KEYS}


def fit_start(law, records):
    """The fit's starting values: law's coefficients, and a transient of 0.1 nats that fades over the records'
    median tokens (it is added only when its two values are fitted)."""
    tokens = sorted(float(r["tokens"]) for r in records)
    return {**{k: getattr(law, k) for k in LAW_COEFFICIENTS}, "t_size": 0.1, "t_tokens": tokens[len(tokens) // 2]}


def fitted_values(start, free, theta):
    """The law's coefficients with the free ones read from theta (the optimiser's vector; exp of the log-scaled)."""
    return {**start, **{k: (v.exp() if k in LOG_SCALE else v) for k, v in zip(free, theta)}}


def log_predictions(law, start, free, theta, cols):
    """log of the law's loss at each record, plus the transient when it is fitted; law supplies e_start, e_max."""
    values = fitted_values(start, free, theta)
    loss = replace(law, **{k: values[k] for k in LAW_COEFFICIENTS}).predict(
        cols["law_n_active"], cols["tokens"], cols["experts"] / cols["top_k"])
    if "t_size" in free:
        loss = loss + values["t_size"] * torch.exp(-cols["tokens"] / values["t_tokens"])
    return loss.log()


def theta_of(start, free):
    """The optimiser's vector for the free coefficients at their start values (logs of the log-scaled ones)."""
    return torch.tensor([math.log(start[k]) if k in LOG_SCALE else start[k] for k in free], dtype=torch.float64)


def identified(law, records, candidates):
    """Which of `candidates` (and the transient, always a candidate) the records determine, in FIT_ORDER: a
    coefficient is freed when its effect on the predicted log-losses (its Jacobian column at law's values)
    keeps at least IDENTIFIED of its size after the effects of those already freed are projected out
    (Gram-Schmidt), while fewer are freed than records minus one. The transient's two values go together. What
    the records cannot separate stays at law's value: a statement about the data, not about the law."""
    order = [k for k in FIT_ORDER if k in candidates or k in TRANSIENT]
    start, cols = fit_start(law, records), fit_columns(records)
    J = torch.autograd.functional.jacobian(lambda t: log_predictions(law, start, order, t, cols),
                                           theta_of(start, order))
    free, basis = [], []
    for k, v in zip(order, J.T):  # v [records]: how the predictions move with coefficient k
        own = v - sum(((q @ v) * q for q in basis), torch.zeros_like(v))
        if len(free) < len(records) - 1 and v.norm() > 0 and own.norm() >= IDENTIFIED * v.norm():
            free.append(k)
            basis.append(own / own.norm())
    return free if "t_tokens" in free else [k for k in free if k not in TRANSIENT]


def fit_law(law, records, free=LAW_COEFFICIENTS, huber_delta=1e-2, inits=6, seed=0, start=None):
    """Refit the coefficients of ScalingLaw named in `free` (and the transient, when free names t_size and
    t_tokens) to measured runs, as the law's authors did: Huber loss on log L, LBFGS, a/b/c optimised in log
    space, several starts; e_start and e_max stay fixed. records: dicts with law_n_active (the law's N:
    law_active_params), tokens, experts, top_k and val_loss, as train.py's stage records carry them.
    start: the values to start from (default fit_start). Returns (a new ScalingLaw, all fitted values)."""
    require(set(free) <= set(FIT_ORDER) and len(set(free)) == len(free), "--fit_params", ",".join(free),
            f"names of coefficients, each once: {', '.join(LAW_COEFFICIENTS)}")
    require(len(records) > len(free), "--fit", f"{len(records)} records",
            f"more than the {len(free)} free coefficients: give more runs or free fewer (--fit_params)")
    cols, given, start = fit_columns(records), start, start or fit_start(law, records)
    origin = theta_of(start, free)
    generator = torch.Generator().manual_seed(seed)
    starts = [origin + (0 if i == 0 else 0.05 * torch.randn(len(free), generator=generator, dtype=torch.float64))
              for i in range(inits)]
    if "t_size" in free and not given:  # the transient's fit has local minima: start from a grid of its values
        tokens = cols["tokens"].sort().values
        for size, fade in ((s, tokens[round(q * (len(tokens) - 1))].item()) for s in (0.3, 1.0) for q in (0, 0.5, 1)):
            starts.append(theta_of({**start, "t_size": size, "t_tokens": fade}, free))

    def objective(theta):
        return F.huber_loss(log_predictions(law, start, free, theta, cols), cols["val_loss"].log(),
                            delta=huber_delta, reduction="sum")

    best_theta, best_obj = origin, objective(origin).item()
    for theta in starts:
        theta = theta.clone().requires_grad_()
        optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                      history_size=50, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            obj = objective(theta)
            obj.backward()
            return obj

        optimizer.step(closure)
        obj = objective(theta.detach()).item()
        if math.isfinite(obj) and obj < best_obj:
            best_theta, best_obj = theta.detach(), obj
    if not math.isfinite(best_obj):
        raise SettingError(f"--fit: the law gives no finite loss at these records from any start ({len(records)} "
                           f"records, refitting {','.join(free)}): nothing to fit")
    values = {k: float(v) for k, v in fitted_values(start, free, best_theta).items()}
    return replace(law, **{k: values[k] for k in LAW_COEFFICIENTS}), values


def bootstrap_fits(law, values, records, free, rounds=BOOTSTRAP_ROUNDS, seed=0):
    """The uncertainty of a fit: refits from the fit itself (law, values) to `rounds` resamplings of the
    records, drawn with replacement within each E so every pool size keeps its evals. Returns the (law, values)
    of each refit that gives a usable law."""
    generator, groups = torch.Generator().manual_seed(seed), {}
    for r in records:
        groups.setdefault(r["experts"], []).append(r)
    fits = []
    for _ in range(rounds):
        sample = [group[i] for group in groups.values()
                  for i in torch.randint(len(group), (len(group),), generator=generator).tolist()]
        try:
            refit = fit_law(law, sample, free, inits=1, start=values)
        except SettingError:
            continue
        if not law_problem({k: getattr(refit[0], k) for k in LAW_COEFFICIENTS}):
            fits.append(refit)
    return fits


def quantile(values, q):
    return torch.tensor(values, dtype=torch.float64).quantile(q).item()


# What makes a law a law: loss falls with parameters and tokens toward a floor c >= 0 (Table 3: a 35.9,
# alpha -0.19, b 36.0, beta -0.18, c 1.36); the E-terms (delta, gamma, omega, zeta) may take either sign.
LAW_RANGES = {"a": (lambda v: v > 0, "> 0"), "b": (lambda v: v > 0, "> 0"), "c": (lambda v: v >= 0, ">= 0"),
              "alpha": (lambda v: v < 0, "< 0"), "beta": (lambda v: v < 0, "< 0")}


def law_problem(values):
    """Why a dict of coefficients is not a usable law (one clause), or None: exactly the law's coefficients,
    each a finite number (not a bool or text) in its range."""
    if not isinstance(values, dict):
        return f"expected a JSON object of the coefficients {', '.join(LAW_COEFFICIENTS)}"
    unknown = sorted(set(values) - set(LAW_COEFFICIENTS))
    missing = [k for k in LAW_COEFFICIENTS if k not in values]
    if unknown or missing:
        return (f"unknown key {unknown[0]!r}" if unknown else f"no {missing[0]!r}") + \
            f": it holds exactly {', '.join(LAW_COEFFICIENTS)}"
    for k in LAW_COEFFICIENTS:
        v = values[k]
        if not _is_number(v):
            return f"{k} = {v!r}: expected a finite number"
        ok, allowed = LAW_RANGES.get(k, (lambda v: True, ""))
        if not ok(v):
            return f"{k} = {v!r}: must be {allowed}"
    return None


def replanned_ends(law, experts, ends, done, n_law, top_k):
    """plan_stages' rule under `law` for the stages after `done`: stage s ends at D*(e_s) / D*(e_last) of the run.
    Ends already reached stay, every stage to come keeps at least one step; None when the law gives no split."""
    optimal = [law.optimal_tokens(n_law, E / top_k) for E in experts]
    shares = [d / optimal[-1] for d in optimal]
    if not all(math.isfinite(x) and 0 < x <= 1 for x in shares):
        return None
    new = ends[:done]
    for i in range(done, len(experts) - 1):  # keep room for one step in each later stage
        new.append(min(max(round(ends[-1] * shares[i]), new[-1] + 1), ends[-1] - (len(experts) - 1 - i)))
    return new + ends[-1:]


def replan(experts, ends, done, records, law, free, n_law, top_k, rounds=BOOTSTRAP_ROUNDS):
    """The closed loop: at the end of stage `done` (1-based), refit to the run's evals so far (records as
    read_fit_records gives them) the coefficients `free` names, or with free="auto" those the evals determine
    (identified) beside an early transient: the same early fall for every E, so that the fall of the loss with
    tokens is not taken for the value of a larger pool. Then re-solve the run's stage budgets with that law and
    move the ends of the stages still to come, but only when the data can tell: when the next end, re-solved
    under bootstrap resamplings of the evals, lies clear of the planned one in 80 % of them. experts, ends: the
    run's stages (E, last step + 1 of each). Returns (ends, law, why not or None, detail): detail names the freed
    coefficients, the fitted transient and the next end's range."""
    detail = dict(free=[], transient={}, next_end=None)
    if len({r["experts"] for r in records}) < 2:
        return ends, law, "the evals so far span one E: nothing yet measures what a larger pool is worth", detail
    auto, free = free == "auto", identified(law, records, LAW_COEFFICIENTS) if free == "auto" else free
    detail["free"] = free
    if auto and "t_tokens" not in free:
        return ends, law, (f"{len(records)} evals cannot separate the early fall of the loss from what a larger pool "
                           f"is worth (they determine {','.join(free) or 'no coefficient'}, not the transient)"), detail
    if not set(free) & set(E_TERMS):
        return ends, law, (f"the {len(records)} evals determine {','.join(free) or 'no coefficient'} but not what a "
                           f"larger pool is worth (none of {','.join(E_TERMS)})"), detail
    try:
        refit, values = fit_law(law, records, free=free)
    except SettingError as err:
        return ends, law, str(err), detail
    detail["transient"] = {k: values[k] for k in TRANSIENT if k in free}
    why = law_problem({k: getattr(refit, k) for k in LAW_COEFFICIENTS})
    new = None if why else replanned_ends(refit, experts, ends, done, n_law, top_k)
    if new is None:
        return ends, law, f"the refit law ({law_text(refit)}) gives no split{f' ({why})' if why else ''}", detail
    nexts = [e[done] for e in (replanned_ends(b, experts, ends, done, n_law, top_k)
                               for b, _ in bootstrap_fits(refit, values, records, free, rounds)) if e]
    if len(nexts) < rounds // 2:
        return ends, law, f"only {len(nexts)} of {rounds} bootstrap refits give a split: the evals cannot tell", detail
    lo, hi = round(quantile(nexts, 0.1)), round(quantile(nexts, 0.9))
    detail["next_end"] = dict(fit=new[done], lo=lo, hi=hi, planned=ends[done])
    if lo <= ends[done] <= hi:
        return ends, law, (f"the evals cannot tell: the next stage could end anywhere in steps {lo}..{hi} (80 % of "
                           f"{len(nexts)} bootstrap refits), the planned {ends[done]} among them"), detail
    return new, refit, None, detail


def replan_run(evals, law, replan_params, stages, done, cfg, batch_tokens, settle):
    """train.py --replan at the end of stage `done`: replan on the run's validation evals so far (evals: dicts
    of step, experts and val_loss, as its checkpoints carry them), each at the tokens seen when it was made,
    starting from law (the run's --law, or Table 3) with the candidates replan_params ("auto": every coefficient).
    Left out: an eval whose loss is not a finite positive number, and the evals of the first settle[0] steps
    (warmup) and of the settle[1] steps after each growth (re-warm, phase-in), which measure the settling of the
    optimizer or the new experts, not the curve. Returns (the new stage ends, the "replan" record)."""
    n_law = law_active_params(replace(cfg, n_experts=stages[-1].experts))
    starts = {st.experts: (0 if i == 0 else stages[i - 1].end) for i, st in enumerate(stages)}
    wait = {st.experts: settle[0] if i == 0 else settle[1] for i, st in enumerate(stages)}
    records = [dict(law_n_active=n_law, tokens=r["step"] * batch_tokens, experts=r["experts"], top_k=cfg.top_k,
                    val_loss=r["val_loss"]) for r in evals if math.isfinite(r["val_loss"]) and r["val_loss"] > 0
               and r["step"] - starts[r["experts"]] > wait[r["experts"]]]
    before = [st.end for st in stages]
    free = "auto" if replan_params == "auto" else replan_params.split(",")
    ends, refit, why, detail = replan([st.experts for st in stages], before, done, records, law, free,
                                      n_law, cfg.top_k)
    return ends, dict(stage=done, evals=len(records), ends_before=before, ends=ends, unchanged_because=why,
                      **detail, law={k: float(getattr(refit, k)) for k in LAW_COEFFICIENTS})


# 11. Expert subsets (EMO-modular): select, restrict and prune experts; how specialised routing is -----------


def restrict_experts(model, chosen):
    """Route every layer only among its chosen experts (one index tensor per layer), without copying or
    pruning; None lifts the restriction. prune_experts makes the same model physically smaller."""
    layers = unwrap(model).moe_layers()
    for moe, keep in zip(layers, chosen or [None] * len(layers)):
        moe.expert_mask = None
        if keep is not None:
            moe.expert_mask = torch.zeros(moe.n_experts, dtype=torch.bool, device=moe.w_in.device)
            moe.expert_mask[keep] = True


@torch.no_grad()
def select_experts(model, batches, keep):
    """EMO-modular's selective expert use: for one domain, keep the `keep` experts of each layer with the
    highest mean router score on a few example batches, chosen greedily layer by layer (layer l is scored
    with the layers before it already restricted to their choice). Returns one sorted index tensor per layer."""
    model = unwrap(model)
    training = model.training
    model.eval()
    layers, chosen = model.moe_layers(), []
    for layer in layers:
        restrict_experts(model, chosen + [None] * (len(layers) - len(chosen)))
        mean_score = 0
        for x in batches:
            model(x)
            mean_score = mean_score + layer.router.last_scores.mean(dim=0)
        chosen.append(mean_score.topk(keep).indices.sort().values)
    restrict_experts(model, None)
    model.train(training)
    return chosen


@torch.no_grad()
def prune_experts(model, chosen):
    """Physically keep only each layer's chosen experts and their router rows, so memory really shrinks;
    top_k becomes min(top_k, kept). Routing in the pruned model equals restrict_experts on the full one."""
    model = unwrap(model)
    cfg = model.config
    n = len(chosen[0])
    require(1 <= n <= cfg.n_experts and all(len(keep) == n for keep in chosen), "prune_experts: chosen",
            [len(keep) for keep in chosen], f"the same number of experts (1..{cfg.n_experts}) in every layer")
    model.config = replace(cfg, n_experts=n, top_k=min(cfg.top_k, n))
    for moe, keep in zip(model.moe_layers(), chosen):
        keep, router = keep.to(moe.w_in.device), moe.router
        for p in (moe.w_in, moe.w_out, router.weight):
            set_param_data(p, p.data[keep])
        router.bias, router.ramp, router.expert_counts = router.bias[keep], router.ramp[keep], router.expert_counts[keep]
        if hasattr(router, "load_history"):
            router.load_history = router.load_history[:, keep]
        moe.expert_mask = None
    return model


@torch.no_grad()
def specialization(model, batches):
    """How much the chosen experts reveal a label of each token (its domain, its surface form): one
    routing_report per layer. batches: pairs of token ids [B, T] and each token's label id [B, T]."""
    model = unwrap(model)
    training = model.training
    model.eval()
    n_labels = 1 + max(int(d.max()) for _, d in batches)
    usage = [torch.zeros(n_labels, m.n_experts, dtype=torch.float64) for m in model.moe_layers()]
    for x, domain in batches:
        model(x)
        for counts, moe in zip(usage, model.moe_layers()):
            idx = moe.router.last_idx.view(*x.shape, -1).cpu()  # [B, T, k]
            counts.index_put_((domain[..., None].expand_as(idx).flatten(), idx.flatten()),
                              torch.ones(idx.numel(), dtype=torch.float64), accumulate=True)
    model.train(training)
    return [routing_report(counts) for counts in usage]


def routing_report(counts):
    """From a [labels, experts] table of (token, slot) counts (a label: a domain, a token class): nmi =
    I(label; expert) / H(label), the share of a token's label that its chosen expert reveals (0: none, 1:
    experts identify labels); entropy = each label's expert-usage entropy / log E (1: uses all experts
    evenly); top = each label's three most used experts; share = each label's usage of each expert."""
    def entropy(p):
        p = p[p > 0]
        return -(p * p.log()).sum()

    counts = counts.double()
    joint = counts / counts.sum()
    p_domain, p_expert = joint.sum(dim=1), joint.sum(dim=0)
    mutual = entropy(p_domain) + entropy(p_expert) - entropy(joint.flatten())
    within = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    return dict(nmi=(mutual / entropy(p_domain).clamp(min=1e-12)).item(),
                entropy=[(entropy(row) / math.log(counts.shape[1])).item() for row in within],
                top=[row.topk(min(3, len(row))).indices.tolist() for row in counts], share=within.tolist())


# 12. The slow reference: what the fast MoE path is tested against ----------------------------------------


def reference_moe(moe, x, allowed=None):
    """The MoE layer written the slow way, the spec its grouped dispatch is checked against (test_emo.py,
    bench.py gpu): each token of x [N, d] routed alone, its k experts run one by one. allowed: per token,
    the set of experts it may use (default: all). Returns the output [N, d] and the losses (lb, z)."""
    cfg, E, k = moe.cfg, moe.n_experts, moe.cfg.top_k
    outputs, probs, chosen_all, lse = [], [], [], []
    for t in range(x.shape[0]):
        logits = moe.router.weight @ x[t]
        outside = torch.tensor([allowed is not None and e not in allowed[t] for e in range(E)], device=x.device)
        if cfg.router == "sigmoid":
            scores = logits.sigmoid()
            chosen = (scores + moe.router.bias + moe.router.ramp).masked_fill(outside, float("-inf")).topk(k).indices
            gates = scores[chosen] / scores[chosen].sum()
        else:
            logits = logits.masked_fill(outside, float("-inf"))
            p = logits.softmax(-1)
            gates, chosen = p.topk(k)
            probs.append(p)
            lse.append(torch.logsumexp(logits, -1))
        y = torch.zeros_like(x[t])
        for gate, e in zip(gates, chosen):
            g, u = (x[t] @ moe.w_in[e]).chunk(2)
            y = y + gate * ((F.silu(g) * u) @ moe.w_out[e])
        if moe.shared is not None:
            y = y + moe.shared(x[t])
        outputs.append(y)
        chosen_all.extend(chosen.tolist())
    if cfg.router == "sigmoid":
        return torch.stack(outputs), (0.0, 0.0)
    f = torch.tensor([chosen_all.count(e) for e in range(E)], dtype=torch.float32, device=x.device) / len(chosen_all)
    lb = E * sum(f[e] * torch.stack(probs)[:, e].mean() for e in range(E))
    z = torch.stack(lse).square().mean()
    return torch.stack(outputs), (lb, z)
