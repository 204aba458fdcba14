# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Gradient checkpointing
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/05_gradient_checkpointing.ipynb)
#
# Checkpointing keeps only each layer's input during forward and recomputes the rest in backward:
# activations shrink from every intermediate of 24 layers to 24 layer inputs, at the cost of one
# more forward pass. When does that matter for BGE-M3, and what does it cost in time?
#
# *Every memory figure below says where it comes from: **measured on &lt;device&gt;** or **predicted for &lt;GPU&gt;**. On a CPU (and in CI) full-size figures are predicted by `m3lab.predict`, which runs FlagEmbedding's real training step on placeholder tensors (shapes and sizes, no numbers in them), and real runs use `tiny-bge-m3`, an offline stand-in with BGE-M3's architecture at toy size. On a Colab or Kaggle GPU the same cells measure the real `BAAI/bge-m3`. In the tables, *peak alloc* is the most memory the step's tensors hold at one moment. *needs* is what the step takes of the card, which is more: PyTorch keeps the memory of freed tensors in a cache to reuse it, and the cache ends up cut into pieces too small for some later, larger tensor, so the card must hold the tensors and those unusable pieces at once; *needs* is that sum at the step's tightest moment, plus the memory CUDA itself takes on the card (an estimate). The verdict's *spare* is the card's usable memory minus *needs*; lesson 01 says how the verdict is made and how far the measurements back it.*

# %%
# Colab / Kaggle: fetch m3lab (code and data) and install it on top of the runtime. m3lab asks for
# ranges that hold the versions Colab and Kaggle ship (torch, transformers, numpy, protobuf, ...), so
# pip only adds what is missing (FlagEmbedding, without its [finetune] extra, which builds flash-attn
# and fails there; DeepSpeed, bitsandbytes and a few small packages) and changes nothing already
# installed: no restart needed. Where m3lab is installed (make test), this does nothing.
import importlib.util, os, socket, subprocess, sys
REPOSITORY = "https://github.com/m3lab/m3lab"
if importlib.util.find_spec("m3lab") is None:
    source = os.environ.get("M3LAB_SOURCE", REPOSITORY)  # the Colab lane (make test-colab) clones a local copy
    if source.startswith("https://"):
        try:
            socket.create_connection(("github.com", 443), timeout=5).close()
        except OSError:
            raise SystemExit("No internet. On Kaggle, open Settings in the notebook's side bar, switch "
                             "Internet on (it needs a verified phone number), then run this cell again.")
    if not os.path.isdir("m3lab-repo"):
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", source, "m3lab-repo"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e", "m3lab-repo"], check=True)
    sys.path.insert(0, os.path.abspath("m3lab-repo"))

# %%
import matplotlib
matplotlib.rcParams["figure.dpi"] = 80
from m3lab import lessons
from m3lab.config import TrainConfig
from m3lab.gpus import GIB
from m3lab.lessons import plots

env = lessons.environment()
print(env.describe())
print(", ".join(f"{name} {version}" for name, version in lessons.versions().items()))

# %% [markdown]
# Where the path stands after lesson 04 (`m3lab.plan.ledger`): FlagEmbedding's example at 64/392 tokens,
# group 6, batch 1, without DeepSpeed (HF fp16, fused AdamW), checkpointing on as the example has it.
# Off and on, at the path's 392 passage tokens and longer:

# %%
from m3lab.plan import ledger

start = ledger.before("05")
lengths = [392, 1024, 2048]
configs = {}
for p in lengths:
    configs[f"passage {p}, checkpointing"] = start.replace(passage_max_len=p)
    configs[f"passage {p}, no checkpointing"] = start.replace(passage_max_len=p, gradient_checkpointing=False)
reports = lessons.predict_all(configs)

# %%
# NBVAL_CHECK_OUTPUT

print(lessons.prediction_table(reports))
for label, report in reports.items():
    print(f"{label:32} activations at the peak {report.breakdown['activations'] / GIB:5.2f} GiB, peak in {report.peak_phase}")

# %%
# NBVAL_CHECK_OUTPUT
# what checkpointing costs in compute: the step's floating-point operations, counted in the traces
from m3lab.predict import steptime

for p in lengths:
    on, off = (steptime.step_flops(reports[f"passage {p}, {kind}"]) for kind in ("checkpointing", "no checkpointing"))
    print(f"passage {p}: {on / 1e12:6.1f} TFLOP a step with checkpointing, {off / 1e12:6.1f} without "
          f"({on / off - 1:+.0%}, counted)")

# %%
plots.breakdown_bars(reports, title="Gradient checkpointing on and off (the path after lesson 04)",
                     **lessons.gpu_measurements(configs));

# %%
# Every configuration above as the flags to change in your copy of the command (--deepspeed
# names the JSON that config.deepspeed_json() prints, written beside the command)
lessons.print_commands(configs, "05")

# %% [markdown]
# ## Measured: memory and step time
#
# Two real runs with the same settings, checkpointing off and on (on a CPU: the stand-in, whose
# layers are tiny, so the time cost shows less than on BGE-M3).

# %%
from m3lab.train.launch import train

small = env.sized(TrainConfig(max_steps=4, train_group_size=4, query_max_len=64, passage_max_len=256,
                               per_device_train_batch_size=2, deepspeed_stage=1, reduce_bucket_size=1_000_000,
                               fp16=True, use_self_distill=True))
runs = {"no checkpointing": train(small),
        "checkpointing": train(small.replace(gradient_checkpointing=True))}

# %%
import statistics
for label, result in runs.items():
    seconds = statistics.median(s.step_time_s for s in result.steps[1:])
    print(f"{label:18} peak {result.peak_allocated_bytes / 2**20:7.1f} MiB, median step {seconds:.2f} s ({result.provenance})")
plots.memory_bars(list(runs), [r.peak_allocated_bytes for r in runs.values()], next(iter(runs.values())).provenance,
                  title="Peak memory of one step, checkpointing off and on");

# %% [markdown]
# ## With DeepSpeed ZeRO-2, checkpointing has to go
#
# FlagEmbedding's M3 model encodes queries and passages in two passes, and reentrant checkpointing
# then fires DeepSpeed's gradient hooks twice for the same parameters. ZeRO-2, which partitions the
# gradients as they arrive, stops at the first step with DeepSpeed 0.19.8's own assertion, "Gradient
# computed twice for this partition" (a real run of the stand-in fails the same way). m3lab refuses
# the pair before launch; lesson 04's ZeRO-2 rows run without checkpointing for that reason:

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.config import ConfigError

try:
    start.replace(deepspeed_stage=2, optim="adamw_torch").check()
except ConfigError as error:
    print(error)

# %% [markdown]
# **Verdict.** Keep checkpointing on. Where the path stands, turning it off raises the peak from
# 9.42 to 11.59 GiB: autograd then keeps every layer's intermediates (3.04 GiB of activations at the
# peak, against none with it). At 392 tokens both fit (3.59 and 2.57 GiB to spare); as texts grow it
# decides how far out of memory a run is: at 1,024 passage tokens short by 0.61 GiB with it and by
# 6.12 without. It costs one more forward pass of the encoder per step: counted in the traces, +33%
# FLOPs a step at 392 tokens (6.3 against 4.7 TFLOP). The stand-in's step times above are timed on
# whatever CPU runs the lesson, where a tiny model's steps are mostly overhead: they show the
# direction of the memory, not the cost in time.


# %% [markdown]
# ## The path so far
#
# The series' ledger (`m3lab.plan.ledger`): FlagEmbedding's example on one T4, then each lesson's knob,
# taken from where the lesson before left the run, all predicted for a T4: each bar is the peak of
# live tensors after the step, coloured by the verdict, and the mark above it what the step needs
# of the card. This lesson's steps and the flags they change in the command, then the whole path
# so far:

# %%
so_far = ledger.predict_path("05")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("05")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("05")));

# %% [markdown]
# **In one line.** Keep gradient checkpointing on: where the path stands, off raises the peak from
# 9.42 to 11.59 GiB, predicted for a T4, and on costs one more forward pass (+33% FLOPs a step,
# counted).
