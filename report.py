"""What a run reports of itself, kept out of train.py so that it reads as the loop, and out of runs.py, which keeps
run folders and checkpoints: the step records, router-collapse warnings and progress line (Meter), each stage's
cost, MFU and memory, the one line for a non-finite step, and the loss plot. bench.py uses the measures too."""

import shlex
import time
from pathlib import Path

import torch

import emo
import runs



def non_finite_advice(err, s, step, stage):
    """A non-finite step as one line: where it happened, and a command the program accepts."""
    last = Path(s.out_dir) / "latest.pt"
    command = f"python train.py --resume={shlex.quote(s.out_dir)} --lr={s.lr / 4:g}"
    where = f"resume it with a lower learning rate: {command}" \
        if last.exists() else "start again with a lower --lr"
    return runs.TrainingError(f"non-finite loss or gradient at step {step + 1} (stage {stage.index}, "
                              f"E={stage.experts}; {err}); the step was not taken. Last checkpoint: "
                              f"{last if last.exists() else 'none yet'}; {where}")


# ---------------------------------------------------------------------------------------------
# What a run measures of itself: MFU, memory, the loss plot
# ---------------------------------------------------------------------------------------------


# Dense bf16 peak FLOP/s by CUDA device name, most specific first (the vendors' data sheets, without sparsity)
PEAK_BF16_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H200 NVL", 835e12),
                   ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12))


def peak_flops(device):
    """Dense bf16 peak FLOP/s of a CUDA device, or None where we do not know it (CPU, other GPUs)."""
    device = torch.device(device)
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(name):
    """Dense bf16 peak FLOP/s for a CUDA device name such as 'NVIDIA H100 PCIe'; None for names not listed."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_second, cfg, device):
    """Model FLOPs utilisation from active parameters, or None on devices without a known peak."""
    peak = peak_flops(device)
    return None if peak is None else tokens_per_second * emo.flops_per_token(cfg) / peak


def reset_peak_memory(device):
    """Start a peak-memory window: CUDA's allocator peak, or on Linux the process's peak resident set
    (writing 5 to /proc/self/clear_refs resets VmHWM). Returns False where neither can be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    libc = runs.glibc()
    if libc:
        libc.malloc_trim(0)  # give back what keep_freed_memory kept, else the window starts at that heap
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(device):
    """Bytes since reset_peak_memory: peak allocated tensors on CUDA; peak RSS of the whole process on CPU
    (the Python and torch runtime included, so compare CPU values as differences)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024  # reported in kB


def state_memory(raw, optimizer):
    """Bytes of weights + their gradients + optimizer moments: the memory growth adds to. Gradients are
    counted at their size during the step (zero_grad frees them between steps)."""
    params = [p for p in raw.parameters() if p.requires_grad]
    moments = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    return sum(2 * p.numel() * p.element_size() for p in params) + sum(v.numel() * v.element_size() for v in moments)


def pyplot():
    """matplotlib.pyplot for writing PNGs, or None: matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(arms, png, title="validation bits per byte (dotted: expert growth)"):
    """Validation bits per byte (validation loss for runs that did not record it) against tokens: the whole
    run, and beside it the last 40 % zoomed in, where the arms part. arms: {label: run folder, or a list of
    them (seeds: thin lines and their mean in bold)}; a dotted line at each growth of a label's first run.
    matplotlib is optional: without it this writes nothing and says so."""
    plt = pyplot()
    if plt is None:
        return f"no {png}: matplotlib is not installed (optional: pip install matplotlib)"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lines, bpb = [], True  # (color, x, y, width, label) for both panels; did every run record bits per byte
    for i, (label, folders) in enumerate(arms.items()):
        color, curves = f"C{i % 10}", []
        for n, folder in enumerate(folders if isinstance(folders, list) else [folders]):
            records = runs.read_metrics(folder)
            # tokens per step from any step record: a log that lost its early lines still plots
            per_step = next((r["tokens"] // r["step"] for r in records if r["kind"] == "step" and r["step"]), 0)
            evals = [r for r in records if r["kind"] == "eval"]
            bpb = bpb and all("val_bpb" in r for r in evals)
            curves.append({r["step"] * per_step: r.get("val_bpb", r["val_loss"]) for r in evals})
            for growth in (r for r in records if r["kind"] == "growth" and n == 0):
                for ax in axes:
                    ax.axvline(growth["step"] * per_step, color=color, linestyle=":", linewidth=1)
        common = sorted(set.intersection(*map(set, curves)))
        if len(curves) > 1:
            lines += [(color, list(c), list(c.values()), 0.6, None) for c in curves]
        lines.append((color, common, [sum(c[t] for c in curves) / len(curves) for t in common], 1.8,
                      label + (f" ({len(curves)} seeds)" if len(curves) > 1 else "")))
    end = max(max(x) for _, x, _, _, _ in lines)
    late = [v for _, x, y, _, _ in lines for t, v in zip(x, y) if t >= 0.6 * end]
    for ax in axes:
        for color, x, y, width, label in lines:
            ax.plot(x, y, color=color, linewidth=width, alpha=1.0 if label else 0.5, label=label)
        ax.set(xlabel="tokens", ylabel="validation " + ("bits per byte" if bpb else "loss (bits per byte where recorded)"))
    low = min(y for _, _, ys, _, label in lines if label for y in ys)
    axes[0].set_ylim(low - 0.05, low + 1.2)  # the first evals would flatten the rest
    axes[0].set_title(title, fontsize=10)
    axes[1].set_xlim(0.6 * end, end * 1.01)
    axes[1].set_ylim(min(late) - 0.01, max(late) + 0.01)
    axes[1].set_title("the last 40 % of tokens", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.savefig(png, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"wrote {png}"


# ---------------------------------------------------------------------------------------------
# What the training loop reports of each step and stage
# ---------------------------------------------------------------------------------------------


def step_summary(idle, loads, new_from, collapse_steps):
    """What a step's record and warnings need of the loads, in one transfer from the device (each .item()
    would wait for it): the mean load CV over layers, the share of tokens the newest experts (new_from on)
    got, each layer's load CV, and each layer's experts idle for exactly collapse_steps steps."""
    cv = loads.std(dim=1) / loads.mean(dim=1)  # [n_layer]
    dead = idle == collapse_steps  # [n_layer, E]
    values = torch.cat([cv.mean().reshape(1), (loads[:, new_from:].sum() / loads.sum()).reshape(1), cv,
                        dead.flatten().to(cv.dtype)]).tolist()
    n_layer, E = dead.shape
    flags = values[2 + n_layer:]
    return dict(load_cv=values[0], new_share=values[1], layer_cv=values[2:2 + n_layer],
                dead=[[e for e in range(E) if flags[layer * E + e]] for layer in range(n_layer)])


def collapse_warnings(summary, s, check_cv):
    """Router collapse, per layer: experts that got no token for collapse_steps steps (said once, when
    they reach it), or (when check_cv, at log steps) a load CV above max_load_cv. summary: step_summary's."""
    warnings = []
    for layer, (dead, cv) in enumerate(zip(summary["dead"], summary["layer_cv"])):
        if dead:
            warnings.append(f"layer {layer}: experts {dead} got no token for {s.collapse_steps} steps")
        if check_cv and cv > s.max_load_cv:
            warnings.append(f"layer {layer}: expert load CV {cv:.2f} > --max_load_cv={s.max_load_cv}")
    return warnings


class Meter:
    """The step records, router-collapse warnings and progress line (tokens/s, MFU, ETA) of a run, and each
    stage's cost in this process (training seconds, tokens, peak memory): what train.py's loop reports."""

    def __init__(self, run, s, stages, step, batch_tokens):
        self.run, self.s, self.stages, self.batch_tokens = run, s, stages, batch_tokens
        self.total_steps = stages[-1].end
        self.idle = torch.zeros(0)  # per layer and expert: steps since it last got a token
        self.cost = None  # this stage's training time, tokens and peak memory (since a resume)
        self.clock = dict(start=time.time(), start_step=step, last=time.time(), tokens=0)

    def start_stage(self, stage, device):
        self.cost = dict(stage=stage.index, seconds=0.0, tokens=0, tracked=reset_peak_memory(device))

    def timed(self, take_step):
        """take_step() (one optimizer step), its time and tokens counted toward the stage's cost."""
        t0 = time.time()
        result = take_step()
        self.cost["seconds"] += time.time() - t0  # a step ends on .item(): the GPU work is done
        self.cost["tokens"] += self.batch_tokens
        self.clock["tokens"] += self.batch_tokens
        return result

    def log_step(self, stage, step, loss, ce, lr, grad_norm, loads, cfg, device):
        """The step's record, router-collapse warnings, and the progress line every log_interval steps."""
        s, run, total = self.s, self.run, self.total_steps
        self.idle = (self.idle + 1) * (loads == 0) if self.idle.shape == loads.shape else (loads == 0).long()
        new_from = self.stages[stage.index - 2].experts if stage.index > 1 else stage.experts
        summary = step_summary(self.idle, loads, new_from, s.collapse_steps)
        for warning in collapse_warnings(summary, s, check_cv=step % s.log_interval == 0):
            run.log(f"step {step}: warning: {warning}")
            run.record("warning", step=step, message=warning)
        run.record("step", step=step, stage=stage.index, experts=stage.experts, loss=loss, ce=ce, lr=lr,
                   grad_norm=grad_norm, tokens=step * self.batch_tokens, load_cv=summary["load_cv"],
                   new_share=summary["new_share"])
        if step % s.log_interval == 0 or step == total:
            clock, now = self.clock, time.time()
            tps = clock["tokens"] / (now - clock["last"])
            util = mfu(tps / run.world, cfg, device)
            eta = (now - clock["start"]) / (step - clock["start_step"]) * (total - step)
            run.log(f"step {step}/{total} | stage {stage.index}/{len(self.stages)} E={stage.experts} | loss "
                    f"{loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | mfu {'-' if util is None else f'{util:.1%}'} | "
                    f"eta {eta / 60:.1f} min")
            clock["last"], clock["tokens"] = time.time(), 0

    def log_eval(self, val, stage, step, batches=None):
        """An evaluation's line and record; returns val. batches: a shorter eval's batches (the closed loop's)."""
        self.run.log(f"step {step}: val loss {val['loss']:.4f}, {val['bpb']:.4f} bits per byte | "
                     + " ".join(f"{d} {v:.3f}" for d, v in val["bpb_per_domain"].items())
                     + (f" (closed loop: {batches} batches)" if batches else ""))
        self.run.record("eval", step=step, stage=stage.index, experts=stage.experts, val_loss=val["loss"],
                        val_bpb=val["bpb"], val_loss_per_domain=val["loss_per_domain"],
                        val_bpb_per_domain=val["bpb_per_domain"], **({"batches": batches} if batches else {}))
        return val

    def end_stage(self, stage, step, val, raw, optimizer, device):
        """The stage's summary record: what plan.py --fit reads, and what the stage cost."""
        cost = self.cost
        self.run.record("stage", step=step, stage=stage.index, experts=stage.experts, top_k=raw.config.top_k,
                        n_active=raw.num_params(active=True), law_n_active=emo.law_active_params(raw.config),
                        params_total=raw.num_params(), tokens=step * self.batch_tokens, val_loss=val["loss"],
                        val_bpb=val["bpb"], seconds=time.time() - self.clock["start"], train_seconds=cost["seconds"],
                        tokens_per_second=cost["tokens"] / cost["seconds"],
                        peak_memory=peak_memory(device) if cost["tracked"] else None,
                        state_memory=state_memory(raw, optimizer))
