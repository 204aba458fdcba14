"""Writes the notebook series (notebooks/NN_*.ipynb) from the cell texts below, unexecuted.

Maintainers edit the lessons here, then run ``make notebooks``, which writes the notebooks and
executes them top to bottom on this machine so that the committed outputs come from a clean run
(nbval compares the cells marked ``# NBVAL_CHECK_OUTPUT`` against them in CI).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPOSITORY = "m3lab/m3lab"  # owner/name on GitHub: the Colab badge and the install cell use it


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip())


def header(name: str, title: str, lesson: str) -> list:
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}.ipynb)")
    return [
        md(f"# {title}\n\n{badge}\n\n{lesson}\n\n"
           "*Every memory figure below says where it comes from: **measured on &lt;device&gt;** or "
           "**predicted for &lt;GPU&gt;**. On a CPU (and in CI) full-size figures are predicted by "
           "`m3lab.memory`, which traces FlagEmbedding's real training step on fake tensors, and real runs "
           "use `tiny-bge-m3`, an offline stand-in with BGE-M3's architecture at toy size. On a Colab or "
           "Kaggle GPU the same cells measure the real `BAAI/bge-m3`.*"),
        code(f"""
# On Colab or Kaggle: fetch m3lab (with its data) and install it. The runtime's CUDA torch is kept,
# because m3lab asks only for torch>=2.4. Where m3lab is installed already (make test) this does nothing.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("m3lab") is None:
    subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{REPOSITORY}", "m3lab-repo"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "m3lab-repo"], check=True)
    sys.path.insert(0, os.path.abspath("m3lab-repo"))
"""),
        code("""
import matplotlib
matplotlib.rcParams["figure.dpi"] = 80
from m3lab import lessons, plots
from m3lab.config import TrainConfig
from m3lab.gpus import GIB

env = lessons.environment()
print(env.describe())
print(", ".join(f"{name} {version}" for name, version in lessons.versions().items()))
"""),
    ]


CHECK = "# NBVAL_CHECK_OUTPUT\n"

NOTEBOOKS: dict[str, tuple[str, str, list]] = {}

NOTEBOOKS["00_setup_and_data"] = ("00 · Setup and data", """
The series fine-tunes BGE-M3 with FlagEmbedding's own trainer
(`torchrun -m FlagEmbedding.finetune.embedder.encoder_only.m3`). Before any memory question:
what machine is this, what does the training data look like, is it valid, and how long are its texts?
The last question decides `query_max_len` and `passage_max_len`, the first knobs of lesson 02.
""", [
    md("""
## The data format

FlagEmbedding reads JSON lines: one query per line, a list of positive passages (`pos`) and a list
of hard negatives (`neg`); optional `pos_scores`/`neg_scores` for distillation, `prompt` and `type`.
Each training step samples one positive and `train_group_size - 1` negatives per query. The sample
in `data/` has 251 training queries and 50 held-out ones over 303 passages in five languages
(see `data/README.md` for where the text comes from).
"""),
    code(CHECK + """
import json
from m3lab.data import load_jsonl, resolve_data_path

first = json.loads(resolve_data_path("data/train.jsonl").read_text(encoding="utf-8").splitlines()[0])
print(json.dumps({k: (v[:70] + "..." if isinstance(v, str) else [t[:50] + "..." for t in v[:2]] + ["..."])
                  for k, v in first.items()}, indent=1, ensure_ascii=False))
"""),
    md("""
## Validation

`load_jsonl` checks every line against FlagEmbedding's format and reports **every** bad line as
`file:line: what is wrong; what to do`, so a broken file fails here, in a second, not twenty
minutes into a GPU session.
"""),
    code(CHECK + """
train_records = load_jsonl("data/train.jsonl")
held_out = load_jsonl("data/eval.jsonl", need_negatives=False)
print(f"train: {len(train_records)} queries, {sum(len(r['neg']) for r in train_records)} negatives; "
      f"held out: {len(held_out)} queries")
"""),
    code(CHECK + """
# What a broken file looks like (two of the project's test fixtures)
from m3lab.data import REPO_ROOT, validate_jsonl

for name in ("06-missing-pos.jsonl", "18-score-not-finite.jsonl"):
    _, problems = validate_jsonl(REPO_ROOT / "tests" / "fixtures" / "bad_data" / name)
    for problem in problems:
        print(str(problem).replace(str(REPO_ROOT) + os.sep, ""))
"""),
    md("""
## Token lengths

Memory grows with the number of tokens per text, so the max lengths should cover the data, not a
guess. Counts below use BGE-M3's tokenizer where the hub is reachable, else the stand-in's
(trained offline on the same corpus; it splits text into more pieces than BGE-M3's 250k vocabulary
does, so its counts run higher).
"""),
    code("""
from m3lab.data import length_covering, token_length_stats, token_lengths

tokenizer, tokenizer_name = lessons.load_tokenizer()
stats = token_length_stats(train_records, tokenizer, query_max_len=64, passage_max_len=392)
print("tokenizer:", tokenizer_name)
"""),
    code(CHECK + """
print(f"{'field':8} {'texts':>5} {'p50':>5} {'p90':>5} {'p95':>5} {'p99':>5} {'max':>6}  cut at max_len")
for s in stats:
    print(f"{s.field:8} {s.count:5} {s.p50:5} {s.p90:5} {s.p95:5} {s.p99:5} {s.max:6}  "
          f"{s.truncated_share:5.1%} of texts, {s.truncated_token_share:5.1%} of tokens beyond {s.max_len}")
by_field = {s.field: s for s in stats}
print(f"max lengths that keep 95% of texts whole: query {length_covering(by_field['query'])}, "
      f"passage {length_covering(by_field['passage'])}")
"""),
    code("""
passages = list(dict.fromkeys(t for r in train_records for t in r["pos"] + r["neg"]))
plots.token_length_histogram({"query": token_lengths([r["query"] for r in train_records], tokenizer).tolist(),
                              "passage": token_lengths(passages, tokenizer).tolist()},
                             max_lens={"query": 64, "passage": 392}, tokenizer_name=tokenizer_name);
"""),
    md("""
**Reading it.** Queries are short: 64 tokens keeps nearly all of them whole. Passages are
long-tailed: the common advice's 392 tokens cuts nearly a quarter of the passages and over 40% of
passage tokens (with the stand-in's tokenizer), while 95% of passages fit in about 1,400. Lesson 02 shows what each max length costs in
memory, so the cut can be a decision rather than a default.
"""),
])

NOTEBOOKS["01_baseline_oom"] = ("01 · The baseline OOM on a T4", """
FlagEmbedding's own example (`examples/finetune/embedder/encoder_only/m3.sh`: group 8, batch 2,
fp16, gradient checkpointing, DeepSpeed stage 0, unified fine-tuning with self-distillation), run
at BGE-M3's long context on a 16 GB T4. Why can it not fit, and what exactly is too big?
""", [
    code("""
example_8192 = TrainConfig.upstream_example(passage_max_len=8192)
print(example_8192.shell_command())
"""),
    code("""
configs = {"example, passage 8192": example_8192,
           "example, passage 512": TrainConfig.upstream_example()}
reports = lessons.predict_all(configs, "t4")
"""),
    code(CHECK + "print(lessons.prediction_table(reports))"),
    code("""plots.breakdown_bars(reports, title="FlagEmbedding's example on a T4");"""),
    code(CHECK + """
for label, report in reports.items():
    print(f"{label}: peak in {report.peak_phase} at {report.peak_op} ({report.peak_module}); "
          f"temporaries {report.breakdown['temporaries'] / GIB:.2f} GiB, "
          f"activations {report.breakdown['activations'] / GIB:.2f} GiB")
# FlagEmbedding's sparse head in training mode builds a (passages, tokens, vocabulary) tensor
passages, vocab = 2 * 8, 250_002
for tokens in (8192, 512):
    print(f"(16 x {tokens} x {vocab:,}) fp16 tensor: {passages * tokens * vocab * 2 / GIB:.2f} GiB")
"""),
    md("""
**What the breakdown says.** It is not the weights (1 GiB in fp16) and not mostly the activations:
the peak sits in backward, in the sparse head. In training mode FlagEmbedding's `_sparse_embedding`
scatters each token's weight into a `torch.zeros(batch, seq_len, vocab_size)` tensor before taking
the max over tokens: 16 passages x 8192 tokens x 250,002 vocabulary entries is 61 GiB per copy in
fp16, and backward holds more than one. At 512 tokens the same head still needs several GiB, which
is why even FlagEmbedding's example at its default lengths does not fit a T4. Gradient
checkpointing, part of the example, does nothing for this tensor: it is made after the encoder.

## The real thing

On a GPU the next cell runs the example for one step with the real BGE-M3 and shows the
allocator's message (the kernel survives: training runs in a child process). On a CPU it rehearses
the same failure with the stand-in under a 256 MiB cap, so you can see what comes back.
"""),
    code("""
from m3lab.train import train

if env.on_gpu:
    oom_run = train(example_8192.replace(model=env.model, max_steps=1), memory_limit_bytes=lessons.t4_memory_limit(env))
else:
    oom_run = train(example_8192.replace(model=env.model, max_steps=1, fp16=False), memory_limit_bytes=256 * 2**20)
print(oom_run.status)
print(oom_run.summary()[:400])
"""),
    md("""
## The tensor need not exist

The sparse embedding only needs, for each text and each vocabulary entry, the largest weight of
that token in the text: a (passages x vocabulary) result. m3lab's `efficient_sparse_head`
(`m3lab.sparse_head`, a subclass of FlagEmbedding's model) scatter-reduces straight into it, as
FlagEmbedding's own eval branch does, and zeroes the special tokens out of place, which is what
broke upstream's attempt to do the same in training (PR #1425). Same loss and gradients (tested on
the stand-in); the command becomes `torchrun -m m3lab.run_m3 ... --efficient_sparse_head True`.
"""),
    code("""
lean = lessons.predict_all({"example 8192, efficient head": example_8192.replace(efficient_sparse_head=True),
                            "example 512, efficient head": TrainConfig.upstream_example(efficient_sparse_head=True)})
"""),
    code(CHECK + "print(lessons.prediction_table(lean))"),
    md("""
Without the (passages x tokens x vocabulary) tensor, FlagEmbedding's example at its default 512
tokens goes from OOM to a close call (the optimizer step's 12.7 GiB is then the peak), and at
8,192 tokens from 137 to about 20 GiB: still too much for a T4, now in the encoder's activations and
the loss's temporaries. The next lessons take the common advice knob by knob.
"""),
])

NOTEBOOKS["02_shorter_lengths"] = ("02 · Shorter max lengths", """
The first piece of common advice: cut `query_max_len`/`passage_max_len` (e.g. 64/392). How does
peak memory move with each, and what does the cut cost in text?
""", [
    code("""
base = TrainConfig.upstream_example(query_max_len=64)
passage_lengths = [128, 256, 392, 512, 1024, 2048, 4096, 8192]
passage_configs = {f"passage {p}": base.replace(passage_max_len=p) for p in passage_lengths}
by_passage = lessons.predict_all(passage_configs)
query_lengths = [32, 64, 128, 256, 512]
query_configs = {f"query {q}": base.replace(query_max_len=q, passage_max_len=392) for q in query_lengths}
by_query = lessons.predict_all(query_configs)
"""),
    code(CHECK + "print(lessons.prediction_table(by_passage))\nprint()\nprint(lessons.prediction_table(by_query))"),
    code("""
plots.memory_curve(passage_lengths, list(by_passage.values()), "passage_max_len (tokens)", log_x=True,
                   title="FlagEmbedding's example (query 64), peak memory vs passage length");
"""),
    code("""
from m3lab.data import load_jsonl, token_length_stats

tokenizer, tokenizer_name = lessons.load_tokenizer()
records = load_jsonl("data/train.jsonl")
cut = {p: {s.field: s for s in token_length_stats(records, tokenizer, passage_max_len=p)}["passage"]
       for p in passage_lengths}
"""),
    code(CHECK + """
print(f"tokenizer: {tokenizer_name}")
print(f"{'passage_max_len':>15} {'passages cut':>13} {'tokens cut':>11}  predicted peak (T4)")
for p in passage_lengths:
    report = by_passage[f"passage {p}"]
    print(f"{p:15} {cut[p].truncated_share:13.1%} {cut[p].truncated_token_share:11.1%}  "
          f"{report.peak_allocated_bytes / GIB:6.2f} GiB, {report.short_verdict}")
"""),
    code("""
# Every configuration above as the command to copy (--deepspeed names the JSON that
# config.deepspeed_json() prints; lesson 07 shows one whole)
lessons.print_commands({**passage_configs, **query_configs})
"""),
    md("""
**What it shows.** Passage length is the strong knob while the sparse head's (passages x tokens x
vocabulary) tensor makes the peak: from 8,192 down to 512 tokens the peak falls from 137 to
15.5 GiB, still 1.2 GiB too much. At 392 the live tensors leave 0.7 GiB for the allocator's cache and
the CUDA context: a close call. At 256 and below the curve is flat
at 12.71 GiB, because the peak is now the optimizer step (ZeRO-0: fp32 master weights and Adam
moments, 6.4 GiB, plus their update temporaries), which no length changes. So the advice's 392 is
the knee of the curve on this configuration: shorter buys no memory and cuts more text (about a
quarter of the passages and 42% of passage tokens here); longer does not fit. Query length hardly
matters (13.64 to 13.70 GiB from 32 to 512 tokens): queries are one text per group. The margin
left at the floor is the allocator's cache and the CUDA context, both estimates; the next lessons
look for real room.
"""),
])

NOTEBOOKS["03_smaller_groups"] = ("03 · Smaller groups and batches", """
Next piece of advice: a smaller `train_group_size` (e.g. 6) and per-device batch 1; and
`negatives_cross_device` off. What do they change, and what does `same_dataset_within_batch` do?
""", [
    code("""
base = TrainConfig.upstream_example(query_max_len=64, passage_max_len=392)
groups = [2, 4, 6, 8, 16]
group_configs = {f"group {g}, batch 2": base.replace(train_group_size=g) for g in groups}
by_group = lessons.predict_all(group_configs)
batches = [1, 2, 4]
batch_configs = {f"group 6, batch {b}": base.replace(train_group_size=6, per_device_train_batch_size=b)
                 for b in batches}
by_batch = lessons.predict_all(batch_configs)
"""),
    code(CHECK + "print(lessons.prediction_table(by_group))\nprint()\nprint(lessons.prediction_table(by_batch))"),
    code("""
plots.memory_curve(groups, list(by_group.values()), "train_group_size (1 positive + negatives per query)",
                   title="Peak memory vs group size (example settings, 64/392, batch 2)");
"""),
    md("""
## negatives_cross_device

It shares every GPU's passages as extra negatives for every other GPU's queries (an all-gather).
On one GPU there is nothing to share; m3lab refuses the flag there rather than let it silently do
nothing. On Kaggle's 2 x T4 it is real, and the prediction below shows its cost per GPU
(ZeRO-1, the common advice otherwise).
"""),
    code(CHECK + """
from m3lab.config import ConfigError

try:
    TrainConfig.common_t4_advice(negatives_cross_device=True).check()
except ConfigError as error:
    print(error)
"""),
    code("""
two = TrainConfig.common_t4_advice(num_processes=2)
cross_configs = {"2 x T4, cross-device off": two, "2 x T4, cross-device on": two.replace(negatives_cross_device=True)}
cross = lessons.predict_all(cross_configs)
"""),
    code(CHECK + "print(lessons.prediction_table(cross))"),
    code("""
# Every configuration above as the command to copy (--deepspeed names the JSON that
# config.deepspeed_json() prints; lesson 07 shows one whole)
lessons.print_commands({**group_configs, **batch_configs, **cross_configs})
"""),
    md("""
## same_dataset_within_batch

It makes every batch come from one training file (one `dataset`), so that in-batch negatives are of
the same kind. It changes **which** texts share a batch, never how many or how long they may be: the
tensors of a step have the same shapes, and the predicted peak is the same. With one training file,
as here, it changes nothing at all. It can matter indirectly: FlagEmbedding pads each batch to its
longest text, so grouping a short-text dataset apart from a long-text one lowers the typical step.
The peak, set by the longest texts allowed, stays.

**Verdict.** Group size and batch scale the sparse head's tensor and the activations (passages per
step = batch x group): a real lever while those make the peak, as at group 16 or batch 4. At 392
tokens, from group 6 down (12 passages per step), the peak is the optimizer step and a smaller
group buys nothing: group 2 and group 6 both peak at 12.71 GiB, while group 2 trains with a third
of the negatives. `negatives_cross_device` costs nothing visible at the peak on 2 x T4: what it
gathers (the other GPU's dense, sparse and ColBERT vectors of a dozen passages) is megabytes, next
to gigabytes of model states.
"""),
])

NOTEBOOKS["04_deepspeed_zero1"] = ("04 · DeepSpeed ZeRO-1 instead of ZeRO-0", """
The advice says: switch FlagEmbedding's `ds_stage0.json` for `ds_stage1.json`. ZeRO-1 partitions
the optimizer states (fp32 master weights and the two Adam moments, 12 bytes per parameter)
across GPUs. What does it do on **one** T4?
""", [
    code("""
advice = TrainConfig.common_t4_advice()
configs = {"1 x T4, ZeRO-0": advice.replace(deepspeed_stage=0),
           "1 x T4, ZeRO-1": advice,
           "1 x T4, ZeRO-2 (no ckpt)": advice.replace(deepspeed_stage=2, gradient_checkpointing=False),
           "1 x T4, ZeRO-1 + offload": advice.replace(offload_optimizer=True),
           "2 x T4, ZeRO-0": advice.replace(deepspeed_stage=0, num_processes=2),
           "2 x T4, ZeRO-1": advice.replace(num_processes=2)}
reports = lessons.predict_all(configs)
"""),
    code(CHECK + """
print(lessons.prediction_table(reports))
print()
for label, report in reports.items():
    states = [r.model_state_bytes["optimizer_states"] / GIB for r in report.per_rank]
    host = report.host_peak_bytes / GIB
    print(f"{label:28} optimizer states per GPU: {', '.join(f'{s:.2f}' for s in states)} GiB"
          + (f"; host memory for the offloaded optimizer {host:.2f} GiB" if host else ""))
"""),
    code("""plots.breakdown_bars(reports, title="ZeRO stages on one and two T4s (common advice)");"""),
    code("""
# Every configuration above as the command to copy (--deepspeed names the JSON that
# config.deepspeed_json() prints; lesson 07 shows one whole)
lessons.print_commands(configs)
"""),
    md("""
## Measured: the optimizer state each rank really holds

Real DeepSpeed on this machine (CPU, gloo, the tiny stand-in): one step each of ZeRO-0 and ZeRO-1
on one process and on two, then the bytes of AdamW state tensors (and fp32 masters) that
DeepSpeed's optimizer object holds on rank 0. On a GPU the same runs measure BGE-M3.
"""),
    code("""
from m3lab.train import train

small = dict(model=env.model, max_steps=1, train_group_size=2, query_max_len=32, passage_max_len=128,
             per_device_train_batch_size=1, reduce_bucket_size=1_000_000, fp16=env.on_gpu)
runs = {"ZeRO-0, 1 proc": TrainConfig(deepspeed_stage=0, **small),
        "ZeRO-1, 1 proc": TrainConfig(deepspeed_stage=1, **small),
        "ZeRO-1, 2 procs": TrainConfig(deepspeed_stage=1, num_processes=2, **small)}
if env.on_gpu and env.gpu_count < 2:
    runs.pop("ZeRO-1, 2 procs")
measured = {label: train(config) for label, config in runs.items()}
"""),
    code(CHECK + """
print(f"bytes per rank, {next(iter(measured.values())).provenance}")
for label, result in measured.items():
    moments = [result.optimizer_state_bytes(rank) for rank in range(len(result.ranks))]
    masters = [result.ranks[rank].steps[-1].fp32_master_bytes for rank in range(len(result.ranks))]
    print(f"{label:16} Adam moments: {', '.join(f'{b:,}' for b in moments):>22}   "
          f"fp32 master copies: {', '.join(f'{b:,}' for b in masters)}")
"""),
    code("""
plots.memory_bars(list(measured), [r.optimizer_state_bytes(0) for r in measured.values()],
                  next(iter(measured.values())).provenance, title="Adam moments held by rank 0 (real DeepSpeed)",
                  ylabel="Adam state on rank 0 (GiB)");
"""),
    md("""
**Verdict.** On one T4, ZeRO-1 partitions nothing: there is one partition, and the optimizer
states are the same 6.36 GiB as ZeRO-0's (measured: the same Adam bytes on one process, to a few
bytes of padding). Its step does peak about 1 GiB lower than ZeRO-0's (11.65 against 12.71 GiB),
but for another reason: DeepSpeed's ZeRO optimizer updates one flat fp32 partition rather than
ZeRO-0's per-tensor path with its foreach temporaries. Either way the margin that is left is the
allocator's cache and the CUDA context, both estimates: a close call, not a fit. On Kaggle's
2 x T4 ZeRO-1 halves the states per GPU (measured: each rank holds exactly half the Adam bytes),
which is the saving the advice promises, and 2 x T4 then has 3.9 GiB to spare. One more
measured detail: in full precision (the CPU runs), ZeRO-1 keeps an fp32 master copy that ZeRO-0
does not need; with fp16 on a GPU both keep one. Offloading the optimizer to the CPU takes states
and update off the GPU entirely (4.48 GiB peak), at the price of about 14 GiB of host memory for
BGE-M3 at the CPU update's peak (fp32 masters, Adam moments and fp32 gradients, 8.5 GiB, plus the
temporaries of torch's AdamW on one flat 568M-element tensor): more than a free Colab machine has
(about 12.7 GB of RAM), fine on Kaggle (about 30 GB).
"""),
])

NOTEBOOKS["05_gradient_checkpointing"] = ("05 · Gradient checkpointing", """
Checkpointing keeps only each layer's input during forward and recomputes the rest in backward:
activations shrink from every intermediate of 24 layers to 24 layer inputs, at the cost of one
more forward pass. When does that matter for BGE-M3, and what does it cost in time?
""", [
    code("""
advice = TrainConfig.common_t4_advice()
lengths = [392, 1024, 2048]
configs = {}
for p in lengths:
    configs[f"passage {p}, checkpointing"] = advice.replace(passage_max_len=p)
    configs[f"passage {p}, no checkpointing"] = advice.replace(passage_max_len=p, gradient_checkpointing=False)
reports = lessons.predict_all(configs)
"""),
    code(CHECK + """
print(lessons.prediction_table(reports))
for label, report in reports.items():
    print(f"{label:32} activations at the peak {report.breakdown['activations'] / GIB:5.2f} GiB, peak in {report.peak_phase}")
"""),
    code("""plots.breakdown_bars(reports, title="Gradient checkpointing on and off (common advice, ZeRO-1)");"""),
    code("""
# Every configuration above as the command to copy (--deepspeed names the JSON that
# config.deepspeed_json() prints; lesson 07 shows one whole)
lessons.print_commands(configs)
"""),
    md("""
## Measured: memory and step time

Two real runs with the same settings, checkpointing off and on (on a CPU: the stand-in, whose
layers are tiny, so the time cost shows less than on BGE-M3).
"""),
    code("""
from m3lab.train import train

small = dict(model=env.model, max_steps=4, train_group_size=4, query_max_len=64, passage_max_len=256,
             per_device_train_batch_size=2, deepspeed_stage=1, reduce_bucket_size=1_000_000, fp16=env.on_gpu,
             use_self_distill=True)
runs = {"no checkpointing": train(TrainConfig(**small)),
        "checkpointing": train(TrainConfig(gradient_checkpointing=True, **small))}
"""),
    code("""
import statistics
for label, result in runs.items():
    seconds = statistics.median(s.step_time_s for s in result.steps[1:])
    print(f"{label:18} peak {result.peak_allocated_bytes / 2**20:7.1f} MiB, median step {seconds:.2f} s ({result.provenance})")
plots.memory_bars(list(runs), [r.peak_allocated_bytes for r in runs.values()], next(iter(runs.values())).provenance,
                  title="Peak memory of one step, checkpointing off and on");
"""),
    md("""
**Verdict.** Checkpointing is worth keeping on a T4, but it is not what makes the common advice
fit: at 392 tokens the peak is the optimizer step, where activations are already gone, and the
prediction barely moves. It starts to matter as texts grow: at 1,024 and 2,048 passage tokens
it is the difference between activations of 5 GiB and a third of one (at 1,024 tokens: a close
call with it, OOM by 4 GiB without). In the committed CPU run (the stand-in) it cut the peak by about
40%. It costs one extra forward pass of the encoder per step; on the stand-in, whose layers are
tiny, that is lost in the noise of the step times above; on BGE-M3, where the forward is roughly a
third of a step's compute, expect up to a third more step time (an estimate, not measured here).
"""),
])

NOTEBOOKS["06_fix_encoder"] = ("06 · fix_encoder", """
`fix_encoder` is often suggested as the last resort: train only the sparse and ColBERT heads. What
does it train, what does it leave out, and what does it save?
""", [
    code(CHECK + """
import torch
from m3lab.memory import _build_m3_model, spec_from_config

def parameters(config):
    with torch.device("meta"):  # the full-size model without memory
        model = _build_m3_model(spec_from_config(config))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    return sum(p.numel() for p in model.parameters()), trainable

total, trainable = parameters(TrainConfig.common_t4_advice())
print(f"fix_encoder off: {sum(trainable.values()):,} of {total:,} parameters train")
total, trainable = parameters(TrainConfig.common_t4_advice(fix_encoder=True))
print(f"fix_encoder on:  {sum(trainable.values()):,} of {total:,} parameters train:")
for name, count in trainable.items():
    print(f"    {name}: {count:,}")
"""),
    md("""
Only `colbert_linear` and `sparse_linear` train. The **dense** embedding is the CLS vector of the
encoder itself, with no head of its own, so with the encoder frozen the dense retrieval of the
model does not change at all: a fine-tuning run whose most used output stays exactly as it was.
"""),
    code("""
configs = {"common advice": TrainConfig.common_t4_advice(),
           "common advice + fix_encoder": TrainConfig.common_t4_advice(fix_encoder=True),
           "example 8192 + fix_encoder": TrainConfig.upstream_example(passage_max_len=8192, fix_encoder=True)}
reports = lessons.predict_all(configs)
"""),
    code(CHECK + "print(lessons.prediction_table(reports))"),
    code("""plots.breakdown_bars(reports, title="fix_encoder: what is left");"""),
    code("""
# Every configuration above as the command to copy (--deepspeed names the JSON that
# config.deepspeed_json() prints; lesson 07 shows one whole)
lessons.print_commands(configs)
"""),
    md("""
## The trap: fix_encoder without unified_finetuning

With `unified_finetuning` off, FlagEmbedding builds no sparse or ColBERT head (they are `None`),
so `fix_encoder` leaves nothing to train; the run would start, log a loss and change nothing.
m3lab refuses it before launch:
"""),
    code(CHECK + """
from m3lab.config import ConfigError

try:
    TrainConfig.common_t4_advice(fix_encoder=True, unified_finetuning=False, use_self_distill=False).check()
except ConfigError as error:
    print(error)
"""),
    md("""
**Verdict.** `fix_encoder` frees most of the card (the optimizer states of 568M parameters go),
but it is not fine-tuning BGE-M3: the encoder and therefore the dense embeddings stay as they were.
Note also what remains at the peak: the sparse head's (passages x tokens x vocabulary) tensor,
which is why FlagEmbedding's example at 8,192 tokens is still 116 GiB over with a frozen encoder.
Use it when only the sparse and ColBERT scores need adapting; otherwise see lesson 07.
"""),
])

NOTEBOOKS["07_t4_recipe"] = ("07 · The T4 recipe", """
Everything so far, put together: which configuration fine-tunes **all** of BGE-M3 on one T4 with a
margin, a real fine-tuning run, and retrieval quality on the held-out queries before and after.
""", [
    code("""
advice = TrainConfig.common_t4_advice()
candidates = {"common advice (ZeRO-1)": advice,
              "common advice, ZeRO-0": advice.replace(deepspeed_stage=0),
              "advice + offload, 64/392": advice.replace(offload_optimizer=True),
              "advice + offload, 128/512, group 8": advice.replace(offload_optimizer=True, query_max_len=128,
                                                                  passage_max_len=512, train_group_size=8),
              "advice + fix_encoder": advice.replace(fix_encoder=True)}
reports = lessons.predict_all(candidates)
"""),
    code(CHECK + """
print(lessons.prediction_table(reports))
for label, report in reports.items():
    if report.host_peak_bytes:
        print(f"{label}: the offloaded optimizer needs {report.host_peak_bytes / GIB:.2f} GiB of host memory")
"""),
    code("""plots.breakdown_bars(reports, title="Candidates for one T4");"""),
    md("""
**The recipe.** The common advice with ZeRO-1 is a close call: its live tensors leave 2.7 GiB of
the card, and the caching allocator's cache (how much depends on fragmentation, which m3lab can
only estimate) and the CUDA context must fit in that: expect it to work on some runs and not on
others. `fix_encoder` fits easily but does not fine-tune the encoder (lesson
06). Offloading the optimizer to the CPU keeps every parameter trainable and leaves several GiB
free on the GPU, enough to go back to 128/512 tokens and a group of 8, at the price of about
14 GiB of host RAM (Kaggle: fine; free Colab, with about 12.7 GB: too little) and slower steps.
So with FlagEmbedding as it is, on free Colab the choice is between the close call and
`fix_encoder`; on Kaggle, offload (or ZeRO-1 over both T4s, lesson 04). Lesson 08 goes further with
m3lab's levers (gradient caching, 8-bit AdamW, an efficient sparse head): all of BGE-M3 at 8,192 tokens
on one T4, without offload. The command for FlagEmbedding as it is:
"""),
    code("""
recipe = advice.replace(offload_optimizer=True, query_max_len=128, passage_max_len=512, train_group_size=8)
print(recipe.shell_command())
print(recipe.deepspeed_json())
"""),
    md("""
## A real fine-tuning run, and retrieval before and after

On a T4 this trains the real BGE-M3 with the recipe (60 steps; drop `max_steps` for a full epoch).
On a CPU the same code trains the stand-in (small settings, full precision) and measures it. The
held-out split (50 queries, 303 passages) is scored with FlagEmbedding's own dense, sparse and
ColBERT scores and their weighted sum.
"""),
    code("""
from m3lab.evaluate import evaluate_retrieval
from m3lab.standin import resolve_model
from m3lab.train import train

if env.on_gpu:
    run_config = recipe.replace(model=env.model, max_steps=60)
else:
    run_config = TrainConfig(model=env.model, train_group_size=4, query_max_len=64, passage_max_len=256,
                             per_device_train_batch_size=2, max_steps=40, learning_rate=2e-4, deepspeed_stage=1,
                             reduce_bucket_size=1_000_000, gradient_checkpointing=True, use_self_distill=True)
before = evaluate_retrieval(resolve_model(env.model))
run = train(run_config, memory_limit_bytes=lessons.t4_memory_limit(env))
print(run.summary())
after = evaluate_retrieval(run.run_dir / "model")
"""),
    code("""
print(f"{'mode':9} {'MRR@10':>14} {'R@1':>14} {'R@5':>14} {'R@10':>14}   (before -> after)")
for b, a in zip(before.rows(), after.rows()):
    print(f"{b['mode']:9} " + " ".join(f"{b[k]:6.3f}->{a[k]:6.3f}" for k in ("MRR@10", "R@1", "R@5", "R@10")))
plots.loss_curve(run, title=f"Fine-tuning {env.model} with FlagEmbedding's M3 trainer");
"""),
    code("""
if env.on_gpu:  # the measured peak of the real run, drawn over its prediction
    plots.breakdown_bars({"recipe": reports["advice + offload, 128/512, group 8"]}, title="The recipe on this GPU",
                         measured={"recipe": run.peak_allocated_bytes}, measured_provenance=run.provenance)
else:
    print(f"no GPU: on a T4 this cell draws the measured peak of the real run over the prediction; the stand-in's "
          f"{run.peak_allocated_bytes / 2**20:.0f} MiB ({run.provenance}) is no measure of BGE-M3")
"""),
    md("""
On the CPU the stand-in is a randomly initialised toy, and 40 steps at a high learning rate on
251 queries move its scores both ways (in the committed run its dense and ColBERT scores rose a
little and its sparse score fell): that says nothing about BGE-M3's quality. What the run shows is
the whole path working end to end: the data, the real trainer under DeepSpeed, the saved model
with its sparse and ColBERT heads, and FlagEmbedding's own scoring. On a T4 the same cells train
and score the real BGE-M3, and draw its measured peak over the prediction: expect it below, because
FlagEmbedding pads each batch to its longest text while the prediction assumes every text is full
length.

## Check the predictor on your GPU

Every T4 figure in this series is predicted. On a GPU, `m3lab.gpu_check` holds the predictor to
account with batches that are full length: it trains a BGE-M3-shaped model (the real shapes,
random weights, built here in about a minute: memory depends on shapes, not values) for three
steps per configuration and sets `torch.cuda.max_memory_allocated` beside the prediction. The
project's tests keep every prediction within 5% of the measurements committed under
`data/measurements/`; there are none yet, so a measured file from a T4 (`results/gpu_check/gpu_check.json`)
is the most useful thing you can send back. `python -m m3lab.gpu_check --out DIR` runs all of them.
"""),
    code("""
from pathlib import Path

from m3lab import gpu_check

if env.on_gpu:  # two configurations, a few minutes on a T4
    check = gpu_check.run(Path("results/gpu_check"), only=["advice, fix_encoder on", "advice (ZeRO-1)"], parallel=1,
                          budget_s=1200)
    for row in gpu_check.compare(check):
        print(row.describe())
else:
    print("no GPU: on one, this cell measures two configurations at full size and prints each beside its prediction")
"""),
])


NOTEBOOKS["08_beyond_the_advice"] = ("08 · Beyond the advice: all of BGE-M3 at 8,192 tokens on one T4", """
The common advice stops at 392-token passages, groups of 6 and, often, a frozen encoder. BGE-M3 reads
8,192 tokens. This lesson reaches for the whole thing on one T4: **every parameter trained** (word
embeddings included; dense, sparse and ColBERT heads; self-distillation on), passages of 8,192 tokens,
queries of 512, groups of 8, with a predicted total (CUDA context included) of at most 14.0 GiB.
m3lab adds five levers, each one flag, each traced by the predictor:

| lever | flag (`m3lab predict`) | TrainConfig field |
|---|---|---|
| memory-efficient sparse head, O(batch × vocab) | `--efficient-sparse-head` | `efficient_sparse_head=True` |
| frozen word embeddings (256M parameters) | `--freeze-word-embeddings` | `freeze_word_embeddings=True` |
| 8-bit AdamW (bitsandbytes), via HF Trainer | `--optim adamw_bnb_8bit` | `optim="adamw_bnb_8bit"` |
| DeepSpeed optimizer offload to the CPU | `--offload-optimizer` | `offload_optimizer=True` |
| gradient caching of the M3 loss | `--grad-cache-chunk-size N` | `grad_cache_chunk_size=N` |

Training runs with any of the first, second or last go through `torchrun -m m3lab.run_m3`, which is
FlagEmbedding's M3 runner and trainer with the model subclassed (same arguments, plus these).
""", [
    md("""
## Each lever alone, against the common advice

The common advice (group 6, 64/392 tokens, batch 1, fp16, ZeRO-1, checkpointing) with one lever at a
time. 8-bit AdamW replaces DeepSpeed's AdamW: HF Trainer's `--optim` counts only without DeepSpeed,
so that bar runs HF's own fp16 (the same for the gradient cache, which here keeps ZeRO-1).
"""),
    code("""
advice = TrainConfig.common_t4_advice()
levers = {"common advice (ZeRO-1)": advice,
          "+ efficient sparse head": advice.replace(efficient_sparse_head=True),
          "+ frozen word embeddings": advice.replace(freeze_word_embeddings=True),
          "+ 8-bit AdamW (no DeepSpeed)": advice.replace(deepspeed_stage=None, optim="adamw_bnb_8bit"),
          "+ optimizer offload": advice.replace(offload_optimizer=True),
          "+ grad cache (chunks of 1)": advice.replace(grad_cache_chunk_size=1)}
lever_reports = lessons.predict_all(levers)
"""),
    code(CHECK + """
print(lessons.prediction_table(lever_reports))
for label, report in lever_reports.items():
    print(f"{label:30} peak in {report.peak_phase:9} optimizer states {report.breakdown['optimizer_states'] / GIB:5.2f} GiB")
"""),
    code("""plots.breakdown_bars(lever_reports, title="Each lever alone on the common T4 advice (64/392, group 6)");"""),
    md("""
## Toward the goal: 8,192-token passages, 512-token queries, groups of 8

The advice at the goal's lengths, then the levers added one after the other. Each one removes what
the previous bar's peak is made of.
"""),
    code("""
at_goal = advice.replace(query_max_len=512, passage_max_len=8192, train_group_size=8)
path = {"advice at 8192/512, group 8": at_goal,
        "+ efficient sparse head": at_goal.replace(efficient_sparse_head=True),
        "+ grad cache (chunks of 1)": at_goal.replace(efficient_sparse_head=True, grad_cache_chunk_size=1),
        "+ 8-bit AdamW (the goal)": at_goal.replace(efficient_sparse_head=True, grad_cache_chunk_size=1,
                                                   deepspeed_stage=None, optim="adamw_bnb_8bit")}
path_reports = lessons.predict_all(path)
"""),
    code(CHECK + """
print(lessons.prediction_table(path_reports))
for label, report in path_reports.items():
    print(f"{label:30} peak in {report.peak_phase:9} ({report.peak_op})")
"""),
    code("""plots.breakdown_bars(path_reports, title="From the advice to the goal (8,192/512 tokens, group 8, all trained)");"""),
    md("""
## The gradient cache: memory that does not grow with the group

Without the cache, every passage of the group keeps its activations until backward. With it, the
encoder sees one chunk at a time; only the representations themselves grow with the group (for
ColBERT one 1,024-wide vector per token: 32 MiB per 8,192-token passage in fp32).
"""),
    code("""
from m3lab import memory

lean = at_goal.replace(efficient_sparse_head=True, deepspeed_stage=None, optim="adamw_bnb_8bit")
groups = [2, 4, 8, 16]
cached = [memory.predict(lean.replace(grad_cache_chunk_size=1, train_group_size=g), "t4") for g in groups]
uncached = [memory.predict(lean.replace(train_group_size=g), "t4") for g in groups]
plots.memory_curve(groups, cached, "train_group_size", label="grad cache", compare={"no grad cache": uncached},
                   title="8,192-token passages, all trained, 8-bit AdamW: with and without the cache");
"""),
    code(CHECK + """
for g, with_cache, without in zip(groups, cached, uncached):
    print(f"group {g:2}: with the cache {with_cache.peak_allocated_bytes / GIB:6.2f} GiB ({with_cache.short_verdict}); "
          f"without {without.peak_allocated_bytes / GIB:6.2f} GiB ({without.short_verdict})")
"""),
    md("""
## The goal, traced in full

The predictions above trace 2 and 3 layers and extrapolate to 24 (tested exact on the stand-in; for
this configuration at full size the full trace is 0.8% higher, so the goal's figure is the full
trace). The command to copy, and the same check from the command line:
`m3lab predict --query-max-len 512 --passage-max-len 8192 --train-group-size 8 --batch-size 1
--precision fp16 --gradient-checkpointing --use-self-distill --optim adamw_bnb_8bit
--efficient-sparse-head --grad-cache-chunk-size 1 --gpu t4 --exact`.
"""),
    code("""
goal = path["+ 8-bit AdamW (the goal)"]
goal_report = memory.predict(goal, "t4", exact=True)
"""),
    code(CHECK + """
print(goal_report.summary())
print(f"{goal_report.method}; total with the allocator's cache and the CUDA context: "
      f"{goal_report.total_bytes / GIB:.2f} GiB (goal: at most 14.0 GiB)")
print("breakdown: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in goal_report.breakdown.items()))
"""),
    code("""print(goal.shell_command())"""),
    md("""
## `m3lab fit`: let the predictor choose

`m3lab fit --gpu t4 --data data/train.jsonl` takes the lengths that keep 95% of the data's tokens, finds
the largest group the most frugal setting holds (bisecting), then the fastest setting that holds the
same group, and prints its command. The encoder always trains. The same from Python:
"""),
    code("""
from m3lab.config import DEFAULT_TRAIN_DATA
from m3lab.fit import fit

fitted = fit(DEFAULT_TRAIN_DATA, gpu="t4", margin_gib=1.0)
"""),
    code(CHECK + """
print(fitted.table())
print(fitted.best.report.summary())
"""),
    code("""print(fitted.best.config.shell_command())"""),
    md("""
## A real run with the levers

On a T4 this trains the real BGE-M3 with the goal's configuration for a few steps and draws the
measured peak over the prediction. On a CPU the stand-in trains with the same levers (gradient cache,
8-bit AdamW through HF Trainer, the efficient sparse head) in full precision: the whole path, end to end.
"""),
    code("""
from m3lab.train import train

if env.on_gpu:  # the goal itself, on a card capped to a T4's memory where it is bigger
    runs = {"the goal": train(goal.replace(model=env.model, max_steps=6),
                              memory_limit_bytes=lessons.t4_memory_limit(env))}
else:  # the stand-in: FlagEmbedding's step, then the same with the levers
    small = dict(model=env.model, train_group_size=8, query_max_len=64, passage_max_len=512,
                 per_device_train_batch_size=2, max_steps=4, learning_rate=1e-4, deepspeed_stage=None,
                 gradient_checkpointing=True, use_self_distill=True)
    runs = {"FlagEmbedding's step": train(TrainConfig(**small)),
            "with the levers": train(TrainConfig(**small, optim="adamw_bnb_8bit", grad_cache_chunk_size=1,
                                                 efficient_sparse_head=True))}
for label, run in runs.items():
    print(f"{label:22} {run.summary()}")
"""),
    code("""
provenance = next(iter(runs.values())).provenance
plots.memory_bars(list(runs), [run.peak_allocated_bytes for run in runs.values()], provenance,
                  title="Peak memory of one step, measured");
if env.on_gpu:  # the measured peak drawn over the prediction
    plots.breakdown_bars({"the goal": goal_report}, title="The goal on this GPU",
                         measured={"the goal": runs["the goal"].peak_allocated_bytes}, measured_provenance=provenance);
"""),
    md("""
**Verdict.**

- **At the advice's own settings** (64/392, group 6) only the levers that shrink the optimizer
  matter: the peak is ZeRO-1's optimizer step (11.65 GiB, a close call). 8-bit AdamW brings it to
  8.69 GiB, frozen word embeddings to 6.90 (but they stop training), offload to 4.48 (with 14.25 GiB of
  host RAM, more than free Colab has). The efficient sparse head and the gradient cache change
  nothing there: the common advice's problem at 392 tokens is not activations.
- **At BGE-M3's real lengths** (8,192-token passages, 512-token queries, group 8) the advice needs
  72 GiB, almost all of it FlagEmbedding's (passages x tokens x vocabulary) sparse-head tensor. The
  efficient sparse head takes that away (14.52 GiB: still OOM), the gradient cache takes the
  activations away (11.66: the optimizer step is the peak again), 8-bit AdamW shrinks the optimizer.
  **The goal**, every parameter trained: 8.59 GiB peak and 10.03 GiB with the allocator's cache and the
  CUDA context, full trace, predicted for a T4 (at most 14.0 asked). No shorter lengths, no smaller
  group, no frozen encoder, no offload. The common advice to cut lengths and groups is a workaround for
  two things FlagEmbedding's trainer does, not a limit of the card.
- **The gradient cache** keeps the encoder's memory flat: from group 2 to 16 the peak grows by
  0.45 GiB (the cached representations); without it group 8 is OOM by 0.43 GiB and group 16 by 10.4.
  In the CPU run above it cut the stand-in's measured peak from 0.300 to 0.034 GiB (in the committed
  run; its losses differ from the plain run's because chunks draw their dropout masks in another
  order, exactly as FlagEmbedding's own `sub_batch_size` does, and the tests hold the cache to that
  computation within 1e-5).
- **What they cost** (not measured here, no GPU): the cache encodes every text twice, once without
  a graph and once with it, on top of checkpointing's recompute, so expect steps around a third
  slower than checkpointing alone; at 8,192 tokens a T4 step takes seconds. 8-bit AdamW keeps Adam's
  moments block-quantised to 8 bits (HF keeps the word embeddings' in 32 bits); Dettmers et al.
  (2022, "8-bit Optimizers via Block-wise Quantization") report fine-tuning results on par with
  32-bit Adam. Where you can afford both, ZeRO-1 AdamW without the cache is the faster choice, and
  `m3lab fit` picks it when it holds the group: on `data/train.jsonl` it picks 8-bit AdamW without the
  cache at 2,704-token passages, group 11 (the data's ten negatives per line).
"""),
])


def build(names: list[str] | None = None) -> list[Path]:
    written = []
    for name, (title, lesson, cells) in NOTEBOOKS.items():
        if names and name not in names:
            continue
        notebook = nbformat.v4.new_notebook()
        notebook.cells = header(name, title, lesson.strip()) + cells
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        notebook.metadata["accelerator"] = "GPU"
        notebook.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
        path = HERE / f"{name}.ipynb"
        nbformat.write(notebook, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in build(sys.argv[1:] or None):
        print(path)
