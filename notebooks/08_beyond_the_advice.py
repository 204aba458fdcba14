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
# # 08 · Beyond the advice: all of BGE-M3 at 8,192 tokens on one T4
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/08_beyond_the_advice.ipynb)
#
# The common advice stops at 392-token passages, groups of 6 and, often, a frozen encoder. BGE-M3 reads
# 8,192 tokens. This lesson reaches for the whole thing on one T4: **every parameter trained** (word
# embeddings included; dense, sparse and ColBERT heads; self-distillation on), passages of 8,192 tokens,
# queries of 512, groups of 8, and not a close call (the series' margin, lesson 01).
# Five levers, each one flag, each traced by the predictor. Three are m3lab's own; two are options
# FlagEmbedding's command already passes on to HF's Trainer and DeepSpeed (lesson 07's path already uses
# 8-bit AdamW):
#
# | lever | whose | flag (`m3lab predict`) | TrainConfig field |
# |---|---|---|---|
# | memory-efficient sparse head, O(batch × vocab) | m3lab | `--efficient-sparse-head` | `efficient_sparse_head=True` |
# | frozen word embeddings (256M parameters) | m3lab | `--freeze-word-embeddings` | `freeze_word_embeddings=True` |
# | gradient caching of the M3 loss | m3lab | `--grad-cache-chunk-size N` | `grad_cache_chunk_size=N` |
# | 8-bit AdamW (bitsandbytes) | HF Trainer | `--optim adamw_bnb_8bit` | `optim="adamw_bnb_8bit"` |
# | optimizer state moved to the CPU's RAM (offload) | DeepSpeed | `--offload-optimizer` | `offload_optimizer=True` |
#
# Training runs with any of m3lab's three go through `torchrun -m m3lab.run_m3`, which is
# FlagEmbedding's M3 runner and trainer with the model subclassed (same arguments, plus these).
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
# ## Context: each lever alone, from where the path left off
#
# Lesson 07 left the run at FlagEmbedding's own knobs: no DeepSpeed, 8-bit AdamW, queries of 64 and
# passages of 768 tokens, groups of 6, batch 1, checkpointing (`m3lab.plan.ledger.before("08")`). Each of
# m3lab's levers alone from there. Offload needs DeepSpeed: that bar is ZeRO-1 with its own AdamW
# offloaded to the CPU, in place of 8-bit AdamW.

# %%
from m3lab.plan import ledger

start = ledger.before("08")
levers = {"where 07 left off": start,
          "+ efficient sparse head": start.replace(efficient_sparse_head=True),
          "+ frozen word embeddings": start.replace(freeze_word_embeddings=True),
          "+ grad cache (chunks of 1)": start.replace(grad_cache_chunk_size=1),
          "ZeRO-1 + optimizer offload": start.replace(deepspeed_stage=1, offload_optimizer=True, optim="adamw_torch")}
lever_reports = lessons.predict_all(levers)

# %%
# NBVAL_CHECK_OUTPUT

print(lessons.prediction_table(lever_reports))
for label, report in lever_reports.items():
    print(f"{label:28} peak in {report.peak_phase:9} activations {report.breakdown['activations'] / GIB:5.2f} GiB, "
          f"optimizer states {report.breakdown['optimizer_states'] / GIB:5.2f} GiB, host RAM {report.host.total_bytes / GIB:5.2f} GiB")

# %%
plots.breakdown_bars(lever_reports, title="Each lever alone, from where lesson 07 left the run (64/768, group 6)");

# %% [markdown]
# ## Context: toward the goal, 8,192-token passages, 512-token queries, groups of 8
#
# The same run at the goal's lengths, then the levers added one after the other; the last bar is the
# path's last step (`ledger.after("08")`). Each lever removes what the previous bar's peak is made of.

# %%
at_goal = start.replace(query_max_len=512, passage_max_len=8192, train_group_size=8)
path = {"07's run at 8192/512, group 8": at_goal,
        "+ efficient sparse head": at_goal.replace(efficient_sparse_head=True),
        "+ grad cache (the goal)": ledger.after("08")}
assert path["+ grad cache (the goal)"] == at_goal.replace(efficient_sparse_head=True, grad_cache_chunk_size=1)
path_reports = lessons.predict_all(path)

# %%
# NBVAL_CHECK_OUTPUT

print(lessons.prediction_table(path_reports))
for label, report in path_reports.items():
    print(f"{label:30} peak in {report.peak_phase:9} at {report.peak_in_words}")

# %%
plots.breakdown_bars(path_reports, title="From 07's run to the goal (8,192/512 tokens, group 8, all trained)");

# %% [markdown]
# ## Context: the gradient cache, memory that does not grow with the group
#
# Without the cache, every passage of the group keeps its activations until backward. With it, the
# encoder sees one chunk at a time; only the representations themselves grow with the group (for
# ColBERT one 1,024-wide vector per token: 32 MiB per 8,192-token passage in fp32).

# %%
from m3lab.predict import predict

lean = at_goal.replace(efficient_sparse_head=True)
groups = [2, 4, 8, 16]
cached = [predict(lean.replace(grad_cache_chunk_size=1, train_group_size=g), "t4") for g in groups]
uncached = [predict(lean.replace(train_group_size=g), "t4") for g in groups]
plots.memory_curve(groups, cached, "train_group_size", label="grad cache", compare={"no grad cache": uncached},
                   title="8,192-token passages, all trained, 8-bit AdamW: with and without the cache");

# %%
# NBVAL_CHECK_OUTPUT

for g, with_cache, without in zip(groups, cached, uncached):
    print(f"group {g:2}: with the cache {with_cache.peak_allocated_bytes / GIB:6.2f} GiB ({with_cache.short_verdict}); "
          f"without {without.peak_allocated_bytes / GIB:6.2f} GiB ({without.short_verdict})")

# %% [markdown]
# Is it the same computation? One step of FlagEmbedding's own M3 model and one with the cache, on the
# same batch from the data (two queries, groups of 2 and of 8), with dropout off so that both see the
# same network. This runs the stand-in on the CPU on every machine: the equality does not depend on
# the model's size. Beside the loss and the gradients, what each step adds at its peak to the live
# tensors (activations, gradients, temporaries), measured.

# %%
from m3lab.data.jsonl import REPO_ROOT, load_jsonl
from m3lab.evidence.side_by_side import grad_cache_side_by_side
from m3lab.standin import STANDIN, resolve_model

two_queries = load_jsonl(REPO_ROOT / "data" / "train.jsonl")[:2]
side_by_side = {g: grad_cache_side_by_side(resolve_model(STANDIN), two_queries, group=g) for g in (2, 8)}
for g, result in side_by_side.items():
    print(f"group {g}:\n{result.describe()}")

# %%
# NBVAL_CHECK_OUTPUT
for g, result in side_by_side.items():
    same_loss = abs(result.cached.loss - result.plain.loss) <= 1e-6 * abs(result.plain.loss)
    print(f"group {g}: same loss (within 1e-6) {same_loss}, same gradients (within 1e-5) "
          f"{result.gradient_difference < 1e-5}; the step's peak above the weights {result.plain.peak_bytes / 2**20:.1f} "
          f"MiB without the cache, {result.cached.peak_bytes / 2**20:.1f} MiB with it (measured on CPU, live tensors)")

# %% [markdown]
# ## Context: the goal
#
# Its prediction in full, what its step costs in compute, then the flags it changes from the path's
# run. The same check from the shell: `m3lab predict -- <command>` takes any M3 training command as
# you would type it.

# %%
goal = path["+ grad cache (the goal)"]
goal_report = path_reports["+ grad cache (the goal)"]

# %%
# NBVAL_CHECK_OUTPUT

print(goal_report.summary())
print("breakdown: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in goal_report.breakdown.items()))
# what the gradient cache costs in compute: the step's FLOPs, counted in the traces, and the time they take
from m3lab.predict import steptime

for label in ("+ efficient sparse head", "+ grad cache (the goal)"):
    print(f"{label:24} {steptime.describe(path_reports[label])}")

# %%
# the goal, as the flags it changes from the path's run (the answer for your data, to copy, is at the end)
from m3lab.plan.choice import changes

print("\n".join(changes(start, goal)))

# %% [markdown]
# ## Context: a real run with the levers
#
# Four runs of a few steps, one lever added per run: FlagEmbedding's own step without DeepSpeed (torch
# AdamW), then the efficient sparse head, then the gradient cache, then 8-bit AdamW (the goal). On a T4 that is the
# real BGE-M3 at the goal's lengths (a bigger GPU is capped to a T4's memory), where FlagEmbedding's
# step runs out of memory as predicted; on a CPU the stand-in, with passages of 512 tokens, in full
# precision. Then the goal's measured peak is drawn over its prediction for this machine.

# %%
from m3lab.train.launch import train

plain = goal.replace(efficient_sparse_head=False, grad_cache_chunk_size=0, optim="adamw_torch")
cpu_sizes = dict(query_max_len=64, passage_max_len=512, per_device_train_batch_size=2, learning_rate=1e-4)
head = plain.replace(efficient_sparse_head=True)
sized = {"FlagEmbedding's step": env.sized(plain.replace(max_steps=4), **cpu_sizes),
         "+ efficient sparse head": env.sized(head.replace(max_steps=4), **cpu_sizes),
         "+ grad cache": env.sized(head.replace(grad_cache_chunk_size=1, max_steps=4), **cpu_sizes),
         "with the levers": env.sized(goal.replace(max_steps=4), **cpu_sizes)}
runs = {label: train(config, memory_limit_bytes=env.memory_limit_bytes) for label, config in sized.items()}
for label, run in runs.items():
    print(f"{label:24} {run.summary()}")

# %%
finished = {label: run for label, run in runs.items() if run.status == "ok"}  # an OOM has no peak to draw
provenance = next(iter(runs.values())).provenance
plots.memory_bars(list(finished), [run.peak_allocated_bytes for run in finished.values()], provenance,
                  title="Peak memory of one step, measured");
plots.breakdown_bars({"the goal": lessons.predict_run(sized["with the levers"], env)},
                     title=f"The goal on this machine ({env.model})",
                     measured={"the goal": runs["with the levers"].peak_allocated_bytes}, measured_provenance=provenance);

# %% [markdown]
# **Verdict.**
#
# - **From where lesson 07 left the run** (no DeepSpeed, 8-bit AdamW, 64/768 tokens, group 6) the
#   peak is in the forward pass: 5.35 GiB of activations, most of them FlagEmbedding's (passages x
#   tokens x vocabulary) sparse-head tensor. The efficient sparse head alone takes the peak from 10.02
#   to 7.73 GiB, the gradient cache alone to 8.16. Frozen word embeddings shrink the optimizer states
#   (2.55 to 0.64 GiB) but not the activations (5.37 GiB), and the embeddings stop training. Offload
#   (ZeRO-1 with DeepSpeed's CPU Adam) leaves 6.10 GiB on the GPU and needs 12.51 GiB of host RAM,
#   more than free Colab's 11.83 GiB.
# - **At BGE-M3's real lengths** (8,192-token passages, 512-token queries, group 8) the same run's
#   peak is 73.20 GiB. The efficient sparse head takes the sparse tensor away (14.77 GiB: out of
#   memory, short by 1.34 GiB), the gradient cache takes the activations away, and the backward pass
#   through the last layer is the peak. **The goal**, every parameter trained: 8.59 GiB peak, and
#   9.05 GiB needed of the card with the allocator's gaps and the CUDA context: 5.69 GiB to spare,
#   predicted for a T4 from a full trace.
#   No shorter lengths, no smaller group, no frozen encoder, no offload. The common advice to cut
#   lengths and groups works around two things FlagEmbedding's trainer does, not a limit of the card.
# - **The gradient cache** keeps the encoder's memory flat: from group 2 to 16 the peak grows from
#   8.39 to 8.85 GiB (the cached representations); without it group 8 is out of memory, short by 1.34
#   GiB, and group 16 by 11.73. In the CPU runs above, one lever added at a time, the cut in the
#   stand-in's measured peak comes with the gradient cache. The efficient sparse head alone changes
#   nothing there, because the stand-in's vocabulary is a few thousand entries, not BGE-M3's quarter of a million, so its
#   sparse tensor is small (the full-size effect is the prediction above). In those runs the losses
#   differ from the plain run's because chunks draw their dropout masks in another order, exactly as
#   FlagEmbedding's own `sub_batch_size` does; with dropout off, side by side on one batch, the cached
#   step gives FlagEmbedding's loss and gradients, and what the stand-in's step adds to the weights
#   stays at 8.8 to 9.4 MiB from group 2 to 8 where FlagEmbedding's grows from 21.2 to 82.6 MiB
#   (measured).
# - **What they cost**, counted: the cache encodes every text twice (once without a graph, once
#   with it) on top of checkpointing's recompute, so the goal's step is 490.6 TFLOP against 397.8
#   without the cache: 31.6 to 57.8 s against 25.6 to 46.9 s a step on a T4 with every text at full
#   length (estimated at 13% to 24% of the datasheet's peak, as lesson 07 sets out). 8-bit AdamW keeps Adam's
#   moments block-quantised to 8 bits (HF keeps the word embeddings' in 32 bits); Dettmers et al.
#   (2022, "8-bit Optimizers via Block-wise Quantization") report fine-tuning results on par with
#   32-bit Adam.
# - **The answer with the levers**, at the end of this lesson, for your data: on this series' sample,
#   2,704-token passages (the length `m3lab fit` takes: `--coverage 0.95` of its tokens) and groups of 11 (the data's ten negatives per line) on
#   both platforms, no DeepSpeed and fused AdamW, m3lab's sparse head on, no cache needed at that
#   length: 10.93 GiB peak, 2.98 GiB to spare. FlagEmbedding as it is holds groups of 2 there
#   (lesson 07).


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

so_far = ledger.predict_path("08")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("08")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("08")));

# %% [markdown]
# ## Your data
#
# As in lesson 07: name your training file as this notebook's folder sees it (Colab: `/content/...` or
# `/content/drive/MyDrive/...`; Kaggle: `/kaggle/input/<dataset>/<file>.jsonl`). Left as it is, the
# series' sample is used. To judge the fine-tune at the end, some queries must stay out of training:
# name your own held-out file (`query` and `pos`, as the training file) and, if you have one, the
# corpus to retrieve from (`{"text": ...}` a line; without it, every passage of your files). Left as
# `None`, a tenth of your file is held out (the series' sample has its own held-out split), and the
# answer trains on the rest.

# %%
MY_DATA = "data/train.jsonl"  # your FlagEmbedding JSONL file, e.g. "/content/my_train.jsonl"
MY_EVAL = None  # your held-out queries, e.g. "/content/my_eval.jsonl"; None: a tenth of MY_DATA
MY_CORPUS = None  # the passages they are retrieved from; None: every passage of your files

# %%
from m3lab.data import held_out

judged = held_out.prepare(MY_DATA, MY_EVAL, MY_CORPUS)
print(judged.describe())
TRAIN_DATA = judged.train  # what the answer trains on

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.data.jsonl import load_jsonl

my_records = load_jsonl(TRAIN_DATA)  # every bad line, as file:line: what is wrong; what to do
print(f"{len(my_records)} training lines, all valid; the fewest negatives on a line: "
      f"{min(len(r['neg']) for r in my_records)}")

# %% [markdown]
# ## The answer, with m3lab's levers
#
# Lesson 07's answer with m3lab's levers joining FlagEmbedding's knobs (`m3lab fit --platform colab-t4
# --data FILE`, without `--stock`): the lengths that keep most of your data's tokens (`--coverage 0.95`), the largest group
# the most frugal setting holds, then the fastest setting that holds the same group; the encoder
# always trains. The commands run `-m m3lab.run_m3`, FlagEmbedding's own runner with the levers
# added. GPU and host figures are predicted; the times are estimated, as a range.

# %%
from m3lab.plan import recipes

lever_answers = {platform: recipes.answer_for(platform, stock=False, data=TRAIN_DATA)
                 for platform in ("colab-t4", "kaggle-t4x2")}

# %%
# NBVAL_CHECK_OUTPUT
for answer in lever_answers.values():
    print(f"## {answer.title}")
    print("\n".join(answer.figures()), end="\n\n")

# %% [markdown]
# The same answers predicted with each platform's own packages (transformers 5 on Colab and Kaggle;
# lesson 07 says why they can differ):

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.evidence import platform_stack

for platform, answer in lever_answers.items():
    print("\n".join(platform_stack.load(platform).beside(answer)), end="\n\n")

# %% [markdown]
# On both platforms' packages the levers' answer keeps far more than the planner's margin to spare: the
# same run is the answer there.

# %% [markdown]
# ## Context: every text at its full length, per-length batches
#
# Lesson 07 ended with per-length batches, the way BGE-M3's authors trained: the data split by length
# into files, each batched at the largest size the card holds (`--same_dataset_within_batch True`,
# each line carrying its `batch_size`). With m3lab's sparse head the card holds much longer passages,
# and with the gradient cache the encoder reads each batch a chunk at a time: about 8,192 tokens a
# chunk (`--grad_cache_chunk_tokens 8192`: one text at BGE-M3's longest, 32 texts at 256 tokens), its
# outputs kept and the loss's gradients passed back through each chunk in turn, so that the longest
# buckets are no longer held to what one pass over their whole batch keeps.
# For each platform (`m3lab fit --buckets DIR --platform PLATFORM --data FILE`, DIR the folder the files
# are written to): the buckets and their batches (per process), one epoch against the common advice's
# truncation and against one batch size at full length for every line, and the files written into this
# folder; the command that trains on them comes with the answer below. Memory predicted, times estimated.

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.plan import buckets

bucket_plans = {platform: buckets.plan(TRAIN_DATA, platform) for platform in ("colab-t4", "kaggle-t4x2")}
bucket_costs = {platform: buckets.epoch_costs(plan) for platform, plan in bucket_plans.items()}
for platform, plan in bucket_plans.items():
    print(plan.table())
    print()
    print(buckets.cost_table(bucket_costs[platform]), end="\n\n")

# %%
answer_cost = buckets.answer_cost("this lesson's answer (levers, one length)", lever_answers["colab-t4"],
                                  bucket_plans["colab-t4"].lengths)
plots.epoch_costs(bucket_costs["colab-t4"] + [answer_cost], title="One epoch on your data, free Colab");

# %%
# Each platform's files, written into their own folder here (the batches differ)
for platform, plan in bucket_plans.items():
    written = plan.write(f"buckets-{platform}")
    print(f"buckets-{platform}: {', '.join(path.name for path in written)}")

# %% [markdown]
# **What per-length batches buy.** With m3lab's sparse head and the encoder read in chunks, a T4 holds
# every passage of this data whole: six buckets, groups of 8, batches per process from 33 for the
# shortest passages down to 2 for the longest on free Colab (16 down to 2 on each of Kaggle's two T4s).
# One epoch trains on 100% of the passages' tokens in 48 steps on free Colab, where the common advice
# (64/392 tokens) trains on 58% of them. Its estimated time is shorter than one batch of 2 for every line
# at full length (26 to 48 min against 32 to 58 an epoch on free Colab): the estimate counts the work at
# the lengths each batch pads to, a batch pads every text to its longest, and per-length batches put
# texts of like length together. What the batches change beyond that is how busy the card is, which a
# count of the work does not see. Against this lesson's answer (groups of 11 at 2,704 tokens, the last
# bar) the choice is a larger group or every
# text whole; FlagEmbedding as it is cannot make it (lesson 07). The next section makes it, by a rule.

# %% [markdown]
# ### What the token chunks buy, and what they cost
#
# The same plan for free Colab without the gradient cache (`--grad-cache-chunk-tokens 0`), beside the
# plan above, bucket by bucket: the batch per process, and the text trained a second (estimated, at
# the lengths each bucket's batches pad to; padding not counted).

# %%
# NBVAL_CHECK_OUTPUT
plain_plan = buckets.plan(TRAIN_DATA, "colab-t4", chunk_tokens=0, log=lambda line: None)
print(buckets.before_after(plain_plan, bucket_plans["colab-t4"]))

# %% [markdown]
# **The token chunks buy a larger group and twice the batch from 513 tokens up, for about twice the
# time an epoch.** Without the gradient cache the longest bucket holds groups of 6 and one line a step;
# with chunks of about 8,192 tokens it holds groups of 8 (the group BGE-M3's authors fine-tuned with) and
# 2 lines. From 513 tokens up the batches now stop at the plan's cap on a step's text (two lines of
# group 8 at 8,192 tokens, or as many lines as make the same tokens at shorter lengths), not at what
# memory holds: the peak stays between 8.54 and 8.96 GiB in every bucket (the table above). The cap is
# there because memory no longer stops the batch: without it a step would take a bucket's every line,
# leaving an epoch a handful of optimizer steps, each longer at 8,192 tokens than the half hour between
# checkpoints. The two shortest buckets take one step each either way. The price, three ways. Fewer tokens a
# second in every bucket (1,970 to 3,602 against 2,446 to 4,472 up to 256 tokens): the cache runs each
# chunk's forward pass twice, once for the outputs without keeping activations and once more, keeping
# them, to pass the gradients back, and larger batches and groups pad more texts to their longest. More
# text an epoch: each line trains 8 passages instead of 6. And half the optimizer steps, 48 an epoch
# instead of 94, each one larger. An epoch takes 26 to 48 min instead of 12 to 23 (estimated). Whether
# the larger group and batches train a better model on your data is not measured here; for the faster
# plan, add `--grad-cache-chunk-tokens 0` to `m3lab fit --buckets` (m3lab's option; the training command
# it prints then leaves out `--grad_cache_chunk_tokens 8192`).
#
# A few steps of the plan with token chunks, through the same code: on a T4 the real BGE-M3 at the
# plan's sizes; on a CPU the offline stand-in with passages cut at 128 tokens, in full precision, only to
# show that the files, their batches and the chunked pass run.

# %%
per_length_steps = env.sized(bucket_plans["colab-t4"].config("buckets-colab-t4").replace(
    max_steps=4, save_steps=None, save_total_limit=None, warmup_steps=0),
    query_max_len=32, passage_max_len=128, optim="adamw_torch")  # 8-bit AdamW runs on a GPU only
per_length_result = train(per_length_steps, memory_limit_bytes=env.memory_limit_bytes)
print(per_length_result.summary())

# %%
# NBVAL_CHECK_OUTPUT
took_them = per_length_result.status == "ok" and len(per_length_result.steps) == 4
print(f"the per-length run with token chunks took its 4 steps: {took_them}")

# %% [markdown]
# **How busy, measured.** A real epoch of the stand-in through FlagEmbedding's trainer, on this
# project's CPU, on free Colab's buckets up to 1,024 tokens as planned without the gradient cache (the
# plan it measured): once at the per-length batches,
# once with one batch for every line (`python -m m3lab.evidence.bench_buckets`, its committed result;
# its tokens a second count every passage at the length its batch pads it to):

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.evidence import bench_buckets

print("\n".join(bench_buckets.load().describe()))

# %% [markdown]
# On this CPU the per-length batches were *slower*: 0.56x the lines a second of one line at a time.
# A batch pads every text to its longest, and one line alone pads only to its own longest passage, so
# the batches carry more padding; and a CPU is as busy with one text as with thirty-two, so the larger
# batches win nothing back. What this does not tell you is a T4's side: a GPU given one short text at
# a time leaves most of its cores idle, which is the whole case for batching short texts together, and
# no T4 has measured it here. So the per-length plan's gain on a T4 is unmeasured: the time estimates
# above count each way's padded work, not how busy the card is, and on this machine batching cost time.

# %% [markdown]
# ## The answer, one per platform
#
# The series found three runs for your data on each platform: lesson 07's (FlagEmbedding as it is),
# this lesson's (m3lab's levers), and every text whole in per-length batches. One of them is the
# answer, chosen by this rule, in this order (`m3lab.plan.choice`):

# %%
from m3lab.plan import choice

print("\n".join(choice.RULE))
print(choice.QUALITY_NOTE)

# %% [markdown]
# Each platform's three candidates by the figures the rule reads (memory predicted, times estimated),
# then the answer in full, to copy, and each other candidate as the flags it changes against the
# answer. The command is the same in every session: it goes on from the newest checkpoint (on Kaggle
# also in the last version's output, added as input), or starts from the beginning when there is none.

# %%
# NBVAL_CHECK_OUTPUT
stock_answers = {platform: recipes.answer_for(platform, stock=True, data=TRAIN_DATA)
                 for platform in ("colab-t4", "kaggle-t4x2")}
choices = {}
for platform, plan in bucket_plans.items():
    candidates = [choice.from_answer("FlagEmbedding as it is (07)", stock_answers[platform], plan.lengths,
                                     len(my_records)),
                  choice.from_answer("m3lab's levers (08)", lever_answers[platform], plan.lengths, len(my_records)),
                  choice.from_buckets("every text whole, per-length batches (08)", plan, f"buckets-{platform}",
                                      bucket_costs[platform])]
    choices[platform] = choice.choose(plan.platform, candidates)
    print(choices[platform].table(), end="\n\n")

# %%
# The answers to copy, one per platform: run it from this notebook's folder (in a cell, after !, or in a
# terminal). A DeepSpeed JSON the command names is written here, beside it.
for platform, chosen in choices.items():
    chosen.chosen.write_deepspeed_json(".")
    print(chosen.card(), end="\n\n")
    print(chosen.others(), end="\n\n")

# %% [markdown]
# The series' ledger, through to the answer: the path's steps as before, then the answer for free
# Colab on your data, its tightest step.

# %%
answer_on_colab = choices["colab-t4"].chosen
plots.ledger({**so_far, f"your answer, free Colab: {answer_on_colab.name}": answer_on_colab.report},
             title="From FlagEmbedding's example to the answer", **lessons.gpu_measurements(ledger.path("08")));

# %% [markdown]
# ## Run it
#
# The answer for the platform this notebook runs on, run from here. A new session (the first one too)
# runs the install cell at the top, then `MY_DATA` above, then the cells from "The answer, one per
# platform" on, and the checklist below says whether each step is done: m3lab installed, the run's
# folder kept (Google Drive mounted on Colab; `/kaggle/working` on Kaggle, saved as a version's
# output), your data valid, and where the run goes on from (the newest checkpoint it finds, on Kaggle
# also in the last version's output added as input, or the beginning). The stop button stops the run;
# running its cell again goes on. On a machine without a GPU the same cells train the offline stand-in
# for a few steps, only to show that they run.

# %%
from m3lab.lessons import your_run

here = your_run.platform_here()
print(your_run.keep_outputs(here))

# %%
answer = choices[here or "colab-t4"]
mine = your_run.your_run(answer.chosen, env)
print(mine.what)
print(mine.command)

# %%
# A new session's checklist: each item checked here, now
for check in your_run.checklist(mine, TRAIN_DATA, here, answer.platform.previous_output_dirs):
    print(check.line())

# %%
finished = your_run.run(mine.command)
print(f"the run ended with exit status {finished}; its folder: {mine.output_dir}")

# %% [markdown]
# ## Did it help?
#
# The model before the run and the model it saved at its end, scored on your held-out queries with
# each of BGE-M3's three scores and their weighted sum (the evaluation of lesson 07), and a verdict.
# On a T4 this is BGE-M3 before and after your fine-tune. On a machine without a GPU it is the offline
# stand-in before and after its few steps: random weights, so the figures say only that the cells
# run. A run stopped before its end has saved no model yet: run the run cell again, then this one.

# %%
from m3lab.use.evaluate import evaluate_retrieval, verdict

tuned = mine.finished_model()
if tuned is None:
    print(f"no finished model in {mine.output_dir} yet: the run has not reached its end")
else:
    base_scores = evaluate_retrieval(mine.model, judged.eval, judged.corpus)
    tuned_scores = evaluate_retrieval(tuned, judged.eval, judged.corpus)
    label = your_run.scores_label(env)
    print(f"before: {mine.model}; after: {tuned}; {label}")
    print(base_scores.table(tuned_scores))
    print(*verdict(base_scores, tuned_scores), sep="\n")
    plots.retrieval_before_after(base_scores, tuned_scores, label, title="Your held-out queries, before and after");

# %% [markdown]
# **In one line.** The answer on your data, on free Colab and on Kaggle alike: m3lab's levers, groups of
# 11 at 2,704-token passages, no DeepSpeed, fused AdamW: 10.93 GiB peak and 2.98 GiB to spare on a T4
# (predicted); two epochs in 32 to 59 min on free Colab, 16 to 31 min on Kaggle (estimated). The other
# two candidates are shown as the flags they change.
