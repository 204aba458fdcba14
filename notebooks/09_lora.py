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
# # 09 · LoRA: the encoder frozen, a small adapter trained
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/m3lab/m3lab/blob/main/notebooks/09_lora.ipynb)
#
# Lesson 08 trains every parameter of BGE-M3. LoRA ("low-rank adaptation", Hu et al., 2021) trains far
# fewer: every weight of the encoder stays fixed (word embeddings and layer norms too), and beside six
# projections in each layer a pair of thin matrices (rank 64 here, FlagEmbedding's default) learns a
# correction that is added to the projection's output. Frozen weights need no gradients and no optimizer
# states (the two running averages Adam keeps for every trained weight, in fp32), and a checkpoint holds
# only what trains. BGE-M3's sparse and ColBERT vectors have small layers of their own, which keep
# training in full; its dense vector is the encoder's first output, so it changes through the adapter.
#
# FlagEmbedding's M3 trainer has no LoRA. m3lab adds it to the same trainer under the flag names
# FlagEmbedding uses for its decoder-only (LLM) embedders, `--use_lora True --lora_rank 64 --lora_alpha 16
# --lora_dropout 0.1`, run through `torchrun -m m3lab.run_m3`. The adapter's dropout zeroes a random
# tenth of each adapter's input while training, as a regulariser. This lesson shows:
#
# - what LoRA keeps and what it drops, counted;
# - the memory of lesson 08's answer with and without it, predicted for a T4;
# - the answer per platform with LoRA, its times and its checkpoints;
# - a real run through the same code, the adapter loaded, scored and merged;
# - what is known, and not known, of its quality.
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
# ## What LoRA keeps and what it drops
#
# The model FlagEmbedding's trainer builds, with and without the adapter, counted on the "meta" device
# (shapes without memory). `--target_modules query key value intermediate.dense output.dense` (the
# default) wraps six projections in every layer: `output.dense` matches both the attention's output
# projection and the feed-forward's second one. The pooler, which BGE-M3 never uses, is left out.

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.predict import model_for

full_run = TrainConfig(fp16=True, gradient_checkpointing=True, use_self_distill=True)
lora_run = full_run.replace(use_lora=True)
full_model, lora_model = model_for(full_run), model_for(lora_run)
for name, model in (("full fine-tuning", full_model), ("LoRA, rank 64", lora_model)):
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{name:17} {trained / 1e6:7.1f}M of {total / 1e6:.1f}M parameters trained ({trained / total:.1%})")
adapter = {name: p for name, p in lora_model.named_parameters() if "lora_" in name}
layers = {name.split("layer.")[1].split(".")[0] for name in adapter}
wrapped = sorted({name.split(".lora_")[0].split("layer.0.")[1] for name in adapter if "layer.0." in name})
print(f"the adapter: {sum(p.numel() for p in adapter.values()) / 1e6:.1f}M parameters in {len(layers)} of "
      f"{len(full_model.model.encoder.layer)} layers; the rest that trains is the two heads")
print("wrapped in each layer:", ", ".join(wrapped))

# %% [markdown]
# ## Your data
#
# As in lessons 07 and 08: your training file as this notebook's folder sees it; left as it is, the
# series' sample.

# %%
MY_DATA = "data/train.jsonl"  # your FlagEmbedding JSONL file, e.g. "/content/my_train.jsonl"

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.data import held_out

judged = held_out.prepare(MY_DATA, None, None)
TRAIN_DATA = judged.train
print(judged.describe())

# %% [markdown]
# ## The same run, with and without LoRA
#
# Lesson 08's answer for free Colab on your data (every parameter trained), and the same run with the
# adapter: the same group, lengths, optimizer and levers, with and without the adapter's dropout. Below
# the table, what holds the card at each run's tightest moment: the weights, their gradients, the
# optimizer states, the activations (what the forward pass keeps for the backward) and the temporaries
# (what a pass makes and frees again, such as the layer that gradient checkpointing recomputes while the
# backward pass goes through it).

# %%
from m3lab.predict import predict
from m3lab.plan import recipes

full_answer = recipes.answer_for("colab-t4", stock=False, data=TRAIN_DATA)
same_with_lora = full_answer.config.replace(use_lora=True)
side_by_side = {"08's answer, every parameter trained": full_answer.report,
                "the same run with LoRA": predict(same_with_lora, "t4"),
                "with LoRA, no adapter dropout": predict(same_with_lora.replace(lora_dropout=0.0), "t4")}

# %%
# NBVAL_CHECK_OUTPUT
config = full_answer.config
print(f"08's answer: train_group_size {config.train_group_size}, query_max_len {config.query_max_len}, passage_max_len "
      f"{config.passage_max_len}, {config.optim}, learning rate {config.learning_rate:g}")
print(lessons.prediction_table(side_by_side))
print("at the peak, GiB:")
for name, report in side_by_side.items():
    print(f"  {name}: " + ", ".join(f"{category.value.replace('_', ' ')} {size / GIB:.2f}"
                                    for category, size in report.breakdown.items())
          + f"; in the {report.peak_phase}")
print("08's answer, as lesson 08 gives it:")
print("\n".join(line for line in full_answer.figures() if line.startswith(("step time", "training time", "a checkpoint"))))

# %%
plots.breakdown_bars(side_by_side, title="08's answer for free Colab, with and without LoRA");

# %% [markdown]
# ## The answer with LoRA, one per platform
#
# `m3lab fit --platform colab-t4 --lora --data FILE`: the largest group the card holds at your data's
# lengths, then the fastest LoRA setting that holds it: fused AdamW without DeepSpeed first (with the
# optimizer holding only the adapter and the heads, 8-bit AdamW or ZeRO would save next to nothing), then
# the gradient cache, which cuts the activations. The learning rate is ten times the full fine-tune's, for
# the reason in the last section. GPU and host figures are predicted; times are estimated, as a range; each
# checkpoint's size is set against what Google Drive (Colab) or the saved output (Kaggle) holds.

# %%
lora_answers = {platform: recipes.answer_for(platform, stock=False, data=TRAIN_DATA, lora=True)
                for platform in ("colab-t4", "kaggle-t4x2")}

# %%
# NBVAL_CHECK_OUTPUT
for answer in lora_answers.values():
    print(f"## {answer.title}")
    print("\n".join(answer.figures()))
    print(f"learning rate {answer.config.learning_rate:g}", end="\n\n")

# %% [markdown]
# The commands to copy, one per platform. As in lesson 08, the same command serves every session, the
# first included: it goes on from the newest checkpoint in the run's folder, or starts from the beginning
# when there is none. Run it from this notebook's folder (in a cell, after `!`, or in a terminal).

# %%
for answer in lora_answers.values():
    print(f"# {answer.title}\n# Before you run it: {answer.platform.storage}.")
    print(answer.resume_command(), end="\n\n")

# %% [markdown]
# Lesson 08's per-length batches take LoRA too: `m3lab fit --buckets DIR --platform colab-t4 --lora --data
# FILE` plans the files with the adapter (the encoder read in chunks of tokens, as there),
# and prints its batches, memory and times beside the common advice's, as lesson 08's plan does. It is not
# run here: with an adapter on every projection its search takes several minutes on a CPU.

# %% [markdown]
# ## A real run, through the same code
#
# A few steps of the LoRA answer, saving a checkpoint and, at the end, the merged model
# (`--save_merged_lora_model True`). On a T4 that is the real BGE-M3 at the answer's sizes; on a CPU the
# offline stand-in at short lengths, in full precision, only to show that the cells run. The run's folder
# is under `runs/` beside this notebook (on Kaggle that is part of the saved output).

# %%
from m3lab.train.launch import train

cpu_sizes = dict(query_max_len=32, passage_max_len=128, per_device_train_batch_size=2, train_group_size=4)
lora_steps = env.sized(lora_answers["colab-t4"].config.replace(
    train_data=[TRAIN_DATA], max_steps=4, save_steps=2, save_merged_lora_model=True, warmup_steps=0), **cpu_sizes)
lora_result = train(lora_steps, memory_limit_bytes=env.memory_limit_bytes)
print(lora_result.summary())
saved = lora_result.run_dir / "model"
print("saved:", ", ".join(sorted(path.name for path in saved.iterdir())))

# %% [markdown]
# What the folder holds: the adapter (`adapter_config.json`, `adapter_model.safetensors`, in peft's
# format), the two heads (`colbert_linear.pt`, `sparse_linear.pt`), the tokenizer, a checkpoint, and
# `merged_model`: the adapter folded into the encoder's weights, a full-size model again, for tools that
# know no adapters (sentence-transformers, ONNX export, a server). FlagEmbedding loads the adapter folder
# itself, with peft installed: transformers finds the base model the adapter names (the command's
# `--model_name_or_path`) and adds the adapter on top.
#
# ```python
# from FlagEmbedding import BGEM3FlagModel
# model = BGEM3FlagModel("/content/drive/MyDrive/bge-m3-finetuned", use_fp16=True)  # the adapter's folder
# ```
#
# Below, one query and two passages scored both ways, in full precision so that the two can be compared
# closely (in fp16 the adapter's sum and the merged weights round differently). On the stand-in the
# scores themselves mean nothing: only whether the two ways agree.

# %%
from m3lab import use

query = "How do I read a file line by line in Python?"
passages = ["Open the file with a with statement and loop over it: each iteration yields one line.",
            "Lists keep their items in the order they were added."]
by_folder = {way: use.score(folder, query, passages, full_precision=True)
             for way, folder in (("adapter", saved), ("merged", saved / "merged_model"))}
for way, scores in by_folder.items():
    print(way, [(round(s.dense, 4), round(s.sparse, 4), round(s.colbert, 4)) for s in scores])
gap = max(abs(a - b) for x, y in zip(*by_folder.values())
          for a, b in ((x.dense, y.dense), (x.sparse, y.sparse), (x.colbert, y.colbert)))
print(f"largest difference between the adapter's and the merged model's scores: {gap:.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print(f"adapter and merged model score alike (dense, sparse, ColBERT; within 1e-4): {gap <= 1e-4}")

# %% [markdown]
# A run stopped by the end of a session goes on from the newest checkpoint with the command above: it
# loads the adapter, the heads and the optimizer. A folder saved without `--save_merged_lora_model True`
# is merged afterwards with `python -m m3lab.train.lora FOLDER` (e.g.
# `python -m m3lab.train.lora /content/drive/MyDrive/bge-m3-finetuned`); the merged model is as large as
# lesson 08's. To judge the result on your held-out queries, run lesson 08's "Did it help?" cells with
# the run's folder.

# %% [markdown]
# ## Does LoRA lose quality?
#
# Not measured for BGE-M3: that needs the real model and a GPU. What is measured here is a real
# pretrained encoder, sentence-transformers' all-MiniLM-L6-v2 (English, 6 layers, 384 wide), fine-tuned
# through the same trainer on the series' training file on a CPU for one epoch, once in full and twice
# with LoRA (rank 64): at the full fine-tune's learning rate, and at ten times it, since LoRA scales its
# updates down by alpha / rank (16 / 64 here). Each is scored on the same held-out queries; the first
# rows are the encoder before training (its sparse and ColBERT heads random then, drawn afresh in each
# run). `python -m m3lab.evidence.real_quality --lora --learning-rate R` reproduces a run.

# %%
# NBVAL_CHECK_OUTPUT
from m3lab.evidence import real_quality

measured_runs = {"full fine-tune, lr 5e-05": real_quality.committed(),
                 "LoRA, lr 5e-05": real_quality.committed(real_quality.lora_out(5e-5)),
                 "LoRA, lr 0.0005": real_quality.committed(real_quality.lora_out(5e-4))}
first = next(iter(measured_runs.values()))
print(f"{first.before.queries} held-out queries over {first.before.corpus} passages, one epoch of "
      f"{first.steps} steps; {first.label}")
print(real_quality.after_table(measured_runs))

# %% [markdown]
# **Verdict.**
#
# - **What LoRA drops.** At rank 64 the adapter adds 28.3M parameters, and with the two heads 29.4M train:
#   4.9% of the 597.1M the model has with its adapter (BGE-M3 alone has 568.8M, all trained in 08). For
#   08's answer on free Colab that takes the optimizer states from 4.23 to 0.22 GiB; the weights grow by
#   the adapter's own (2.12 to 2.22 GiB).
# - **What it buys on a T4** (predicted). The same run needs 10.20 GiB of the card instead of 11.76: 4.54 GiB
#   to spare instead of 2.98. The tightest moment of both is early in the backward pass, where even the full
#   fine-tune holds almost no gradients yet, so what LoRA saves there is the optimizer states, less what
#   the adapter brings: as gradient checkpointing recomputes each layer's forward pass during the backward,
#   every adapter keeps a copy of its projection's input after dropout for its own gradient (query, key and
#   value each make their own; the feed-forward's second projection's is four times as wide), and the
#   temporaries at the peak grow from 1.62 to 3.68 GiB. Without the adapter's dropout (`--lora_dropout 0`)
#   most of those copies go: 2.15 GiB, and 6.12 GiB to spare. Whether dropout 0 trains as well is not
#   measured here.
# - **The answer with LoRA**, on the series' sample: the same groups and lengths as 08's (11 at 32/2,704
#   tokens; the data's lines have ten negatives each, so no larger group is asked), fused AdamW without
#   DeepSpeed or the gradient cache, at a learning rate of 0.0001 against 08's 1e-05. A checkpoint holds the
#   adapter, the heads and their optimizer states: about 0.4 GB (two on disk take 5% of a free Google
#   account's Drive) against 6.8 GB for 08's (91%). Each step skips the products that compute the frozen
#   weights' gradients: 3.5 to 6.3 s a step against 3.9 to 7.1 s, two epochs in 29 min to 53 min on free
#   Colab against 32 min to 59 min, and 14 min to 26 min on Kaggle (estimated).
# - **Quality** is where LoRA may cost, and for BGE-M3 nobody has measured it here. On MiniLM, one epoch of
#   LoRA at the full fine-tune's learning rate barely moved the encoder (combined MRR@10 0.900 before, 0.909
#   after, against the full fine-tune's 0.950; dense 0.785 to 0.796, against 0.920); at ten times the rate
#   it came close (0.927 combined, 0.900 dense). One run each, one seed: how far two runs of one recipe
#   differ was not measured. And rank 64 is a larger share of MiniLM's layers, less than half as wide as
#   BGE-M3's, so this may flatter LoRA for BGE-M3. Before you rely on it, judge it on your
#   held-out queries.
# - **When to reach for it**: where the full fine-tune needs costly levers to fit (the gradient cache's
#   extra pass, 8-bit optimizer states), where checkpoints must stay small (Drive, Kaggle's output), or to
#   keep several adapters for one base model. Where the full fine-tune fits with room, as on this sample, it
#   trains the way BGE-M3 itself was trained.

# %% [markdown]
# **In one line.** LoRA at rank 64 trains 4.9% of the model's parameters and takes 08's answer on free
# Colab from 2.98 to 4.54 GiB to spare and its checkpoint from 6.8 to 0.4 GB (predicted, estimated); on a
# real pretrained encoder it reached a combined MRR@10 of 0.927 against full fine-tuning's 0.950 at ten
# times the learning rate (measured on a CPU, not BGE-M3).
