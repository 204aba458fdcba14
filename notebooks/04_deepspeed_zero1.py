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
# # 04 · DeepSpeed ZeRO-1 instead of ZeRO-0
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/04_deepspeed_zero1.ipynb)
#
# The advice says: switch FlagEmbedding's `ds_stage0.json` for `ds_stage1.json`. ZeRO-1 partitions
# the optimizer states (fp32 master weights and the two Adam moments, 12 bytes per parameter)
# across GPUs. What does it do on **one** T4?
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

# %%
advice = TrainConfig.common_t4_advice()
configs = {"1 x T4, no DeepSpeed, torch AdamW": advice.replace(deepspeed_stage=None, optim="adamw_torch"),
           "1 x T4, no DeepSpeed, fused AdamW": advice.replace(deepspeed_stage=None, optim="adamw_torch_fused"),
           "1 x T4, ZeRO-0, FusedAdam": advice.replace(deepspeed_stage=0, torch_adam=False),
           "1 x T4, ZeRO-0": advice.replace(deepspeed_stage=0),
           "1 x T4, ZeRO-1": advice,
           "1 x T4, ZeRO-2 (no ckpt)": advice.replace(deepspeed_stage=2, gradient_checkpointing=False),
           "1 x T4, ZeRO-1 + offload": advice.replace(offload_optimizer=True),
           "1 x T4, ZeRO-1 + offload (CPUAdam)": advice.replace(offload_optimizer=True, torch_adam=False),
           "2 x T4, no DeepSpeed, fused AdamW": advice.replace(deepspeed_stage=None, optim="adamw_torch_fused",
                                                              num_processes=2),
           "2 x T4, ZeRO-0": advice.replace(deepspeed_stage=0, num_processes=2),
           "2 x T4, ZeRO-1": advice.replace(num_processes=2),
           "2 x T4, ZeRO-2 (no ckpt)": advice.replace(deepspeed_stage=2, gradient_checkpointing=False, num_processes=2)}
reports = lessons.predict_all(configs)

# %%
# NBVAL_CHECK_OUTPUT

print(lessons.prediction_table(reports))
print()
for label, report in reports.items():
    states = [r.model_state_bytes.optimizer_states / GIB for r in report.per_rank]
    print(f"{label:34} optimizer states per GPU: {', '.join(f'{s:.2f}' for s in states)} GiB; "
          f"host RAM needed {report.host.total_bytes / GIB:.2f} GiB"
          + (f" (the offloaded optimizer: {report.host_peak_bytes / GIB:.2f} GiB)" if report.host_peak_bytes else ""))
print("host RAM: fp32 weights as loaded counted, offloaded optimizer traced, processes estimated (m3lab.predict.host)")
from m3lab.plan.platforms import GB, PLATFORMS

print("; ".join(f"{p.name} has {p.host_ram_bytes / GB:.1f} GB = {p.host_ram_bytes / GIB:.2f} GiB of host RAM"
                for p in PLATFORMS.values()))

# %%
# NBVAL_CHECK_OUTPUT
# Where each one-T4 run peaks, and what is alive there (GiB)
for label, report in reports.items():
    if label.startswith("1 x T4") and "offload" not in label:
        print(f"{label:34} {report.peak_phase} at {report.peak_in_words:30} "
              + ", ".join(f"{k} {v / GIB:.2f}" for k, v in report.breakdown.items() if v >= 0.005 * GIB))

# %%
plots.breakdown_bars(reports, title="ZeRO stages on one and two T4s (common advice)", **lessons.gpu_measurements(configs));

# %%
# Every configuration above as the flags to change in your copy of the command (--deepspeed
# names the JSON that config.deepspeed_json() prints, written beside the command)
lessons.print_commands(configs, "04")

# %% [markdown]
# ## Measured: the optimizer state each rank really holds
#
# Real DeepSpeed on this machine (CPU, gloo, the tiny stand-in): one step each of ZeRO-0 and ZeRO-1
# on one process and on two, then the bytes of AdamW state tensors (and fp32 masters) that
# DeepSpeed's optimizer object holds on rank 0. On a GPU the same runs measure BGE-M3.

# %%
from m3lab.train.launch import train

small = env.sized(TrainConfig(max_steps=1, train_group_size=2, query_max_len=32, passage_max_len=128,
                               per_device_train_batch_size=1, reduce_bucket_size=1_000_000, fp16=True))
runs = {"ZeRO-0, 1 proc": small.replace(deepspeed_stage=0),
        "ZeRO-1, 1 proc": small.replace(deepspeed_stage=1),
        "ZeRO-1, 2 procs": small.replace(deepspeed_stage=1, num_processes=2)}
# two processes need two GPUs (Kaggle); a CPU runs both as gloo processes
measured = {label: train(config) for label, config in runs.items() if config.num_processes <= env.max_processes}

# %%
# NBVAL_CHECK_OUTPUT

print(f"bytes per rank, {next(iter(measured.values())).provenance}")
for label, result in measured.items():
    moments = [result.optimizer_state_bytes(rank) for rank in range(len(result.ranks))]
    masters = [result.ranks[rank].steps[-1].fp32_master_bytes for rank in range(len(result.ranks))]
    print(f"{label:16} Adam moments: {', '.join(f'{b:,}' for b in moments):>22}   "
          f"fp32 master copies: {', '.join(f'{b:,}' for b in masters)}")

# %%
plots.memory_bars(list(measured), [r.optimizer_state_bytes(0) for r in measured.values()],
                  next(iter(measured.values())).provenance, title="Adam moments held by rank 0 (real DeepSpeed)",
                  ylabel="Adam state on rank 0 (GiB)");

# %% [markdown]
# **Verdict.** On one T4, ZeRO-1 partitions nothing: there is one partition, and the optimizer
# states are the same 6.36 GiB as ZeRO-0's (the real DeepSpeed runs above hold the same Adam bytes on
# one process, to a few bytes of padding). Its step peaks lower than ZeRO-0's (11.66 against 12.71
# GiB); both peak in the optimizer step, and the table of what is alive there says where the
# difference is: the step's temporaries (3.18 against 4.24 GiB). Yet ZeRO-1 needs more of the card
# (14.18 against 13.20 GiB): its allocator's gaps are wider, and it fits with 0.56 GiB to spare where
# ZeRO-0 has 1.54. Upstream's own ds_stage0.json (DeepSpeed's FusedAdam instead of `torch_adam`) peaks
# at the same 12.71 GiB and has 0.52 to spare. Lesson 01's measurements put the advice with ZeRO-1
# under a T4's limit: it ran.
#
# **On one T4, drop DeepSpeed.** HF Trainer's own fp16 (autocast) with torch's AdamW peaks at 10.58
# GiB and fits with 2.57 GiB to spare; with HF's default `--optim adamw_torch_fused`, 9.42 GiB and
# 3.59 GiB to spare (the plot marks what the H200 measured for both). It keeps fp32 weights (2.12
# GiB) and no fp16 copy, where DeepSpeed's fp16 keeps fp16 weights and fp32 masters.
#
# **On two T4s, ZeRO-1.** On Kaggle's 2 x T4 ZeRO-1 halves the states per GPU, 3.18 GiB each
# (predicted; the halving itself is measured above on two processes of the stand-in, each rank
# holding exactly half the Adam bytes), which is the saving the advice promises: 6.70 GiB peak and
# 6.86 GiB to spare. Without DeepSpeed each GPU holds everything, as on one (9.42 GiB); ZeRO-2, which
# with FlagEmbedding's M3 model needs checkpointing off (lesson 05), partitions the gradients too and,
# without checkpointing, peaks at 8.46 GiB. So ZeRO-1 is memory in reserve on two T4s, not a must: the
# planner in lesson 07 tries each run without DeepSpeed first (one program fewer between you and the
# trainer, and no extra traffic between the GPUs for the split optimizer state; that it is faster is an
# assumption, not a measurement) and takes ZeRO-1 only where that does not fit, which is why the answers
# for Kaggle in lessons 07 and 08 run without it. One more measured detail: in full precision (the CPU
# runs), ZeRO-1 keeps an fp32 master copy that ZeRO-0 does not need; with fp16 on a GPU both keep one.
#
# **Offload** takes states and update off the GPU entirely (4.50 GiB peak, 9.61 to spare), at the
# price of host RAM. With `torch_adam` (torch's AdamW on the CPU) the run needs 16.75 GiB of it (the
# offloaded optimizer traced at 14.25 GiB, the process and launcher estimated); with DeepSpeed's own
# CPU Adam (upstream's JSON, no `torch_adam`) 12.51 GiB (10.01 GiB traced). Both are more than free
# Colab's 11.83 GiB; Kaggle's 27.01 GiB hold either.
#
# ## FlagEmbedding's own ds_stage1.json, as master ships it
#
# The advice says to switch to `ds_stage1.json`, and the file in FlagEmbedding's repository today
# (master, 7ed43d6; `data/upstream/`) does not start: it keeps fp16's loss-scale keys under `"bf16"`
# as well, and DeepSpeed 0.17.1 and later refuse them there, in fp16 too, before the first step
# (FlagEmbedding issue #1487). m3lab reads the file as DeepSpeed would:

# %%
# NBVAL_CHECK_OUTPUT
import json

from m3lab import deepspeed_json
from m3lab.config import ConfigError
from m3lab.data.jsonl import REPO_ROOT

upstream_json = REPO_ROOT / "data" / "upstream" / "ds_stage1.json"
try:
    deepspeed_json.read(upstream_json)
except ConfigError as error:
    print(error.problems[0].replace(str(REPO_ROOT) + os.sep, ""))
# the fix: keep only what DeepSpeed accepts under "bf16"
settings = json.loads(upstream_json.read_text())
settings["bf16"] = {key: value for key, value in settings["bf16"].items() if key == "enabled"}
print('mended "bf16":', json.dumps(settings["bf16"]), "; fp16 keeps", sorted(settings["fp16"]))

# %% [markdown]
# Write the mended file beside your command (or use the JSON m3lab prints with it), and `m3lab
# predict --gpu t4 -- <your command>` names the same keys if a file has them.


# %% [markdown]
# ## The path so far
#
# The series' ledger (`m3lab.plan.ledger`): FlagEmbedding's example on one T4, then each lesson's knob,
# taken from where the lesson before left the run, all predicted for a T4: each bar is the peak of
# live tensors after the step, coloured by the verdict, and the mark above it what the step needs
# of the card. This lesson's steps and the flags they change in the command, then the whole path
# so far:

# %%
from m3lab.plan import ledger

so_far = ledger.predict_path("04")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("04")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("04")));

# %% [markdown]
# **In one line.** On one T4, drop DeepSpeed: 9.42 GiB peak and 3.59 GiB to spare with fused AdamW;
# on two T4s ZeRO-1 saves the most (6.70 GiB per GPU, 6.86 to spare), memory to spend only where a run
# does not fit without DeepSpeed, all predicted.
