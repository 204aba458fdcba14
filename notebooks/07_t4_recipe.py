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
# # 07 · The T4 recipe
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/07_t4_recipe.ipynb)
#
# Everything so far, put together, ending with **one command per platform** (free Colab's one T4,
# Kaggle's two) for **your** data, with FlagEmbedding as it is: what it needs of the card and the
# host, how long it takes, how many sessions, how to resume, and the model you get at the end. The
# sections before the answer are context: the candidates for one T4, the path's own recipe, a trap,
# and a real run with its model used.
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
# ## Context: the candidates for one T4

# %%
advice = TrainConfig.common_t4_advice()
candidates = {"common advice (ZeRO-1)": advice,
              "common advice, ZeRO-0": advice.replace(deepspeed_stage=0),
              "common advice, no DeepSpeed": advice.replace(deepspeed_stage=None),
              "advice + offload, 64/392": advice.replace(offload_optimizer=True),
              "advice + offload, 128/512, group 8": advice.replace(offload_optimizer=True, query_max_len=128,
                                                                  passage_max_len=512, train_group_size=8),
              "advice + fix_encoder": advice.replace(fix_encoder=True)}
reports = lessons.predict_all(candidates)

# %%
# NBVAL_CHECK_OUTPUT

print(lessons.prediction_table(reports))
print("host RAM each needs (fp32 weights as loaded counted, offloaded optimizer traced, processes estimated):")
for label, report in reports.items():
    print(f"  {label:36} {report.host.total_bytes / GIB:5.2f} GiB"
          + (f" (the offloaded optimizer: {report.host_peak_bytes / GIB:.2f} GiB)" if report.host_peak_bytes else ""))
print("free Colab has 12.7 GB = 11.83 GiB; Kaggle 29 GB = 27.01 GiB")

# %%
plots.breakdown_bars(reports, title="Candidates for one T4", **lessons.gpu_measurements(candidates));

# %% [markdown]
# **The recipe.** Read the verdicts above, each from the allocator simulated under a T4's limit.
# On one GPU DeepSpeed partitions nothing and costs memory: the same advice **without DeepSpeed**
# (HF Trainer's own fp16 and torch AdamW) needs less of the card than with it, and needs no more host
# RAM than loading the model. `fix_encoder` fits easily but does not fine-tune the encoder (lesson
# 06). Offloading the optimizer to the CPU keeps every parameter trainable and leaves room on the
# GPU, enough to go back to 128/512 tokens and a group of 8, at the price of the host RAM printed
# above (Kaggle's is enough; free Colab's is not) and slower steps. `m3lab fit --platform colab-t4
# --stock` (or `kaggle-t4x2`) makes the same search on your own data and never proposes what the
# platform's host RAM cannot hold.
#
# The path (`m3lab.plan.ledger`, drawn at the end) spends free Colab's room on text, with FlagEmbedding
# as it is: no DeepSpeed, 8-bit AdamW (`--optim adamw_bnb_8bit`: an option of HF's Trainer that
# FlagEmbedding's command passes on; it needs the bitsandbytes package) and longer passages than the
# advice's 392, every parameter trained; its figures are in the ledger below. How long: 1,024-token
# passages run out of memory in the second step (the sparse head's request finds the allocator's
# cache cut into gaps too small for it), so the path takes 768. The path's run, as the flags it changes
# from FlagEmbedding's example (the series' thread; the answer for your data, per platform, to copy,
# comes at the end of lesson 08):

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.plan import ledger

recipe = ledger.after("07")
lengths = lessons.predict_all({"the path at 1,024-token passages": recipe.replace(passage_max_len=1024),
                               "the path at 768 (its recipe)": recipe})
print(lessons.prediction_table(lengths))
print(f"1,024: {lengths['the path at 1,024-token passages'].verdict}")

# %%
from m3lab.plan.choice import changes

print("\n".join(changes(ledger.baseline(), recipe)))

# %% [markdown]
# ## Context: FlagEmbedding's `--sub_batch_size` on real data
#
# Lesson 02 showed `--sub_batch_size 1` holding the sparse head's tensor down on paper. With unified
# fine-tuning (dense, sparse and ColBERT) FlagEmbedding 1.4.2 concatenates the chunks' ColBERT
# vectors, and chunks padded to different lengths cannot be concatenated. A real run of the path's
# recipe with it, on this series' data (on a CPU the stand-in, at small sizes):

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.train.launch import TrainingFailed, train

small = dict(train_group_size=4, query_max_len=64, passage_max_len=256, per_device_train_batch_size=2)
try:
    train(env.sized(recipe.replace(max_steps=2, sub_batch_size=1), **small))
    print("it ran")
except TrainingFailed as failure:
    print(failure.result.error().split(". Expected")[0])

# %% [markdown]
# So the path and the answers below leave `--sub_batch_size` out; lesson 08's efficient sparse head
# does its job inside one batch, without chunks.

# %% [markdown]
# ## Context: a real fine-tuning run, and the model it leaves
#
# On a T4 this trains the real BGE-M3 with the path's recipe for 60 steps (drop `max_steps` to train
# the recipe's two epochs). On a CPU the same code trains the stand-in (smaller lengths and group, 40
# steps at a higher learning rate, full precision) and measures it. Training runs in a child process,
# as scoring does, so no model stays on the GPU in this kernel.

# %%
from m3lab.use.evaluate import evaluate_retrieval

run_config = env.sized(recipe.replace(max_steps=60), train_group_size=4, query_max_len=64, passage_max_len=256,
                       per_device_train_batch_size=2, max_steps=40, learning_rate=2e-4)
before = evaluate_retrieval(run_config.model)
run = train(run_config)
print(run.summary())
after = evaluate_retrieval(run.run_dir / "model")
plots.loss_curve(run, title=f"Fine-tuning {env.model} with FlagEmbedding's M3 trainer");

# %% [markdown]
# **The model at the end.** FlagEmbedding's runner saves the fine-tuned encoder with its tokenizer,
# and the two heads it adds beside it: `colbert_linear.pt` (ColBERT's projection) and
# `sparse_linear.pt` (the weight of each token). FlagEmbedding's `BGEM3FlagModel` loads the folder as
# it loads BGE-M3 itself. A query and two passages, scored with each head and with the weighted sum
# BGE-M3's authors use (`dense 0.4, sparse 0.2, colbert 0.4`):

# %%
# NBVAL_CHECK_OUTPUT
from m3lab import use

model_dir = run.run_dir / "model"
print("the run's folder:", ", ".join(f.name for f in use.model_files(model_dir)))

# %% [markdown]
# **Two traps in the saved folder.** FlagEmbedding 1.4.2 writes no sentence-transformers module files,
# and `SentenceTransformer(folder)` then loads the encoder without a word, with mean pooling and no
# normalisation: vectors that are not BGE-M3's. m3lab's runner, which ran this, writes them
# (`modules.json`, `1_Pooling/`, `2_Normalize/`), so sentence-transformers gives BGE-M3's dense vectors
# too; after FlagEmbedding's own runner, `python -m m3lab.train.saved_model FOLDER` writes them. And with
# FlagEmbedding's default `--unified_finetuning False` the folder has no `colbert_linear.pt` or
# `sparse_linear.pt`: `BGEM3FlagModel` then makes both heads up at random on every load, saying so only
# in its log. Every command in this series trains them (`--unified_finetuning True`).

# %%
query = "How does Python bind a name to an object?"
passages = ["Assignment statements bind names to objects; the name refers to the object, it does not hold it.",
            "A decorator wraps a function and returns another function."]
for row in use.score(model_dir, query, passages):
    print(f"dense {row.dense:6.3f}  sparse {row.sparse:6.3f}  ColBERT {row.colbert:6.3f}  "
          f"combined {row.combined:6.3f}  {row.passage[:60]}")
print(f"(scored by {run_config.model} after {len(run.steps)} steps; with the stand-in's random weights these say "
      "the model loads and scores, not how well)")
# To share it: log in once (`hf auth login`, a token with write access), name your repository, upload.
# The folder goes with its card (README.md, the hub's model page): the base model, your data, the command,
# how to load it, and the held-out scores before and after (below), saying where they were measured.
from m3lab.data.jsonl import resolve_data_path
from m3lab.use.card import TrainingRecord, write_model_card

card = write_model_card(model_dir, TrainingRecord(run_config.model, resolve_data_path(run_config.train_data[0]), run.command,
                                                  before, after, run.provenance.removeprefix("measured on ")))
print(f"the model card: {card.name}, {len(card.read_text().splitlines())} lines")
repository = "your-name/bge-m3-finetuned"
print(use.push_command(model_dir, repository))
if os.environ.get("HF_TOKEN") and not repository.startswith("your-name/"):
    subprocess.run(use.push_command(model_dir, repository), shell=True, check=True)

# %% [markdown]
# Retrieval on the 50 held-out queries (over the 303 passages), before and after, with FlagEmbedding's
# own scoring functions for each head (MRR@10 and nDCG@10: how high the right passage ranks; R@k: the
# share of right passages in the top k). FlagEmbedding also ships an evaluation
# (`python -m FlagEmbedding.evaluation.custom`), which this lesson does not use, for two reasons read in
# its code: it scores the dense vector only, and it keeps its results in a folder named after the
# model folder's last name, reusing them while `--overwrite` is off (its default). A base model and a
# fine-tuned one saved under the same last name (`.../base/model` and `.../run/model`) then get the
# same figures, without a word. If you use it, give each model folder its own name or pass
# `--overwrite True`. Here every head is scored afresh each time:

# %%
print(f"retrieval on the held-out split, {env.model}; with the stand-in's random weights these figures say the "
      "pipeline runs, not how good a model is")
print(before.table(after))
from m3lab.use.evaluate import verdict

print(f"did it help ({env.model}):", *verdict(before, after), sep="\n  ")

# %%
# the measured peak of the run, drawn over the prediction of the same configuration on this machine
plots.breakdown_bars({"this run": lessons.predict_run(run_config, env)}, title=f"The run above ({run_config.model})",
                     measured={"this run": run.peak_allocated_bytes}, measured_provenance=run.provenance);

# %% [markdown]
# On the CPU the stand-in is a randomly initialised toy, and 40 steps at a high learning rate on 251
# queries move its scores either way: that says nothing about BGE-M3's quality. What the run shows is
# the whole path working end to end: the data, the real trainer, the saved model with its sparse and
# ColBERT heads, loaded and used, and FlagEmbedding's own scoring. On a T4 the same cells train and
# score the real BGE-M3. Either way the measured peak is drawn over the prediction for this machine
# (on a CPU: live tensor bytes, no GPU emulation). On a T4 expect the measurement below the
# prediction: FlagEmbedding pads each batch to its longest text, while the prediction assumes every
# text is full length.
#
# ## Did it help? A real pretrained encoder, measured
#
# The stand-in cannot say whether this data and this recipe make a model better. A real pretrained
# encoder can: sentence-transformers' all-MiniLM-L6-v2 (English, 6 layers, the one pretrained sentence
# encoder on the package index, so CI has it without the hub), fine-tuned on a CPU with FlagEmbedding's
# M3 trainer through the same code as every run here, on the series' 251 training queries, and scored
# before and after on the same 50 held-out queries with the same evaluation
# (`python -m m3lab.evidence.real_quality` reproduces it; its file is committed). It is not BGE-M3: it
# says whether the pipeline and the data move a real model, not how far BGE-M3 moves. Its "before"
# sparse and ColBERT scores are those of heads FlagEmbedding makes up at random (the model has none).

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.evidence import real_quality

measured = real_quality.committed()
print(f"{measured.provenance}, {measured.date}; {measured.steps} optimizer steps")
print(measured.table())
print(*verdict(measured.before, measured.after), sep="\n")

# %%
plots.retrieval_before_after(measured.before, measured.after, measured.label);

# %% [markdown]
# ## Context: check the predictor on your GPU
#
# Every T4 figure in this series is predicted. On a GPU, `m3lab.evidence.gpu_check` holds the predictor to
# account with batches that are full length: it trains a BGE-M3-shaped model (the real shapes,
# random weights: memory depends on shapes, not values) for three steps per configuration and sets
# `torch.cuda.max_memory_allocated` beside the prediction. The project's tests hold every prediction to
# the measurements committed under `data/measurements/`, and lesson 01 shows each beside its
# prediction, with how far apart they are. A file measured on a real
# T4 (`results/gpu_check/gpu_check.json`) is the most useful thing you can send back: no T4 has
# measured the CUDA context the verdicts estimate. `python -m m3lab.evidence.gpu_check --out DIR` runs all of
# the configurations.

# %%
from pathlib import Path

from m3lab.evidence import gpu_check

# two configurations, a few minutes on a T4; on a CPU the tiny stand-in's two, measured as live tensor bytes
# (run() prints each measurement beside its prediction as it goes)
check = gpu_check.run(Path("results/gpu_check"), model=env.gpu_check_model,
                      only=gpu_check.NOTEBOOK_CHECKS[env.gpu_check_model], parallel=1, budget_s=1200)


# %% [markdown]
# ## The path so far
#
# The series' ledger (`m3lab.plan.ledger`): FlagEmbedding's example on one T4, then each lesson's knob,
# taken from where the lesson before left the run, all predicted for a T4: each bar is the peak of
# live tensors after the step, coloured by the verdict, and the mark above it what the step needs
# of the card. This lesson's steps and the flags they change in the command, then the whole path
# so far:

# %%
so_far = ledger.predict_path("07")

# %%
# NBVAL_CHECK_OUTPUT
print("\n".join(ledger.lesson_changes("07")))
print()
print(lessons.prediction_table(so_far))

# %%
plots.ledger(so_far, **lessons.gpu_measurements(ledger.path("07")));

# %% [markdown]
# ## Your data
#
# Name your training file (FlagEmbedding's JSONL: `query`, `pos`, `neg`, lesson 00) as this notebook's
# folder sees it. On Colab, upload it (the folder icon, then upload: it lands in `/content`) or mount
# Google Drive (`/content/drive/MyDrive/...`); on Kaggle, add it as a dataset
# (`/kaggle/input/<dataset>/<file>.jsonl`). Left as it is, the series' sample is used.

# %%
MY_DATA = "data/train.jsonl"  # your FlagEmbedding JSONL file, e.g. "/content/my_train.jsonl"

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.data.jsonl import load_jsonl

my_records = load_jsonl(MY_DATA)  # every bad line, as file:line: what is wrong; what to do
print(f"{len(my_records)} training lines, all valid; the fewest negatives on a line: "
      f"{min(len(r['neg']) for r in my_records)}")

# %% [markdown]
# ## The answer, with FlagEmbedding as it is
#
# `m3lab fit` on your data for each platform (from a shell: `m3lab fit --platform colab-t4 --stock
# --data FILE`): the lengths that keep most of the data's tokens (`--coverage 0.95`), the largest group the platform holds
# (GPU and host RAM), the fastest memory setting that holds it, never a close call; then the run: two
# epochs, the warm-up counted on your data, a checkpoint at least every half hour of training, in the
# folder that outlives the session. A full checkpoint holds the whole model and its optimizer: with the one
# being written beside the last one kept, two of them take 91% of the free 15 GB of a Google account's
# Drive (keep nothing else there during the run); lesson 09's LoRA checkpoints are a few percent of it.
# Every figure is labelled: the GPU's and the host's are predicted,
# the times estimated (nothing here ran on a T4), as a range.
#
# **How a time is estimated.** The predictor counts the step's arithmetic (its floating-point
# operations, FLOPs) with every text at its max length; FlagEmbedding pads a batch only to its longest
# text, so the count is scaled to the lengths batches drawn from your data really pad to (the more
# passages a batch holds, the likelier one of them is long, and the whole batch pads to it: the answer
# cards say what share of the full-length work is left). A T4 does that work at some share of its
# datasheet's 65 TFLOPS. The share comes from a published *training* run on a free Colab T4 (Unsloth's
# BGE-M3 notebook: short texts, a small adapter trained, so a rough guide to a full fine-tune of long
# texts; it prints no token counts, so its texts are taken as short as a one-line query and a one-sentence
# passage can be, and as long, which gives the range), and its top is capped by published *inference*
# on a T4, which a training step does not beat. On Kaggle's two T4s each step also sends every
# gradient from one GPU to the other. The figures behind the range:

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.predict import steptime

print("\n".join(steptime.basis()))

# %%
from m3lab.plan import recipes

stock_answers = {platform: recipes.answer_for(platform, stock=True, data=MY_DATA)
                 for platform in ("colab-t4", "kaggle-t4x2")}

# %%
# NBVAL_CHECK_OUTPUT
for answer in stock_answers.values():
    print(f"## {answer.title}")
    print("\n".join(answer.figures()), end="\n\n")

# %% [markdown]
# **On Colab's and Kaggle's own packages.** The figures above were predicted with the packages this
# notebook runs on. Colab ships transformers 5.15 and Kaggle a 5.x; transformers 5 builds the model
# and allocates its tensors in another order than transformers 4, which can move what a step needs by
# a little. The same answers, predicted with a copy of each platform's packages (on a CPU, kept in
# `data/predictions/`; `python -m m3lab.evidence.platform_stack` made them):

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.evidence import platform_stack

for platform, answer in stock_answers.items():
    print("\n".join(platform_stack.load(platform).beside(answer)), end="\n\n")

# %% [markdown]
# Here the platforms' own packages leave this answer's spare memory where it is; lesson 08 shows how
# they move the levers' answer. A run whose spare memory is under the planner's margin is called a
# close call and never chosen, and the margin is what absorbs a difference like these.

# %%
# What each answer changes from FlagEmbedding's example (lesson 01), flag by flag. The series ends with
# one answer per platform, printed in full to copy, at the end of lesson 08, which weighs this one
# against the levers' and against every text whole.
for answer in stock_answers.values():
    print(f"## {answer.title}, against FlagEmbedding's example")
    example = ledger.baseline().replace(train_data=answer.config.train_data)  # the same data, as this folder sees it
    print("\n".join(changes(example, answer.config)), end="\n\n")

# %% [markdown]
# ## Context: per-length batches, every text as long as the card holds it
#
# The answer above cuts passages at the length that keeps most of your data's tokens (`--coverage 0.95`). BGE-M3's authors
# cut nothing: they split their data by length into files and gave each file the largest batch their
# card held (FlagEmbedding's `research/BGE_M3`; the BGE-M3 paper's Table 9). FlagEmbedding still runs
# that way: with `--same_dataset_within_batch True` every batch comes from one file, at the
# `batch_size` its lines carry. `m3lab fit --buckets DIR --stock --data FILE` makes the files and
# finds each one's batch with the predictor (every passage at its bucket's longest length, never a
# close call), and compares one epoch three ways: the common T4 advice (64/392 tokens), one batch for
# every line at full length, and the per-length batches. Memory is predicted, times estimated.

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.plan import buckets

stock_buckets = buckets.plan(MY_DATA, "colab-t4", stock=True)
print(stock_buckets.table())
print()
print(buckets.cost_table(buckets.epoch_costs(stock_buckets)))

# %% [markdown]
# **What they keep.** With FlagEmbedding as it is, the per-length batches stop at 2,560-token
# passages: the planner tries lengths in steps of 256, and the next, 2,816, does not fit even one query
# at a time with groups of 2 (its sparse head's passages x tokens x vocabulary tensor grows with every
# token). The answer above cuts at the length that keeps most of the tokens (`--coverage 0.95`), 2,704, between the two,
# and that fits. So the per-length batches keep 94% of the passages' tokens, about what the answer
# above keeps, where the common advice (64/392 tokens) keeps 58%. With FlagEmbedding as it is the
# answer stays the run above; lesson 08's sparse head is what lets a T4 hold every text whole, and
# lesson 08 weighs the three and prints the one to run.

# %% [markdown]
# **In one line.** With FlagEmbedding as it is, on your data: no DeepSpeed, fused AdamW, groups of 2
# at 2,704-token passages: 12.53 GiB peak and 0.77 GiB to spare on a T4 (predicted); two epochs in 2
# to 4 min on free Colab, 1 to 4 min on Kaggle's two T4s (estimated).
