"""Fine-tune a BERT built from a config.json with the real transformers.Trainer on this CPU for
two steps, recording each step's peak live tensor bytes with m3lab's StepRecorder.

Usage: python hf_trainer_run.py CONFIG_JSON OUT_DIR OPTIM BATCH SEQ_LEN [gradient_checkpointing]
"""

import sys

import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from m3lab.predict import load_model_config
from m3lab.train.meter import StepRecorder


def main():
    config_path, out_dir, optim, batch, seq_len = sys.argv[1:6]
    checkpointing = len(sys.argv) > 6
    batch, seq_len = int(batch), int(seq_len)
    torch.manual_seed(0)
    config = load_model_config(config_path)
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    # Full-length examples, as the predictor assumes: no padding, so transformers drops the mask.
    rows = [{"input_ids": torch.randint(5, config.vocab_size, (seq_len,)),
             "attention_mask": torch.ones(seq_len, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(batch * 4)]
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=2, optim=optim,
                             learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, gradient_checkpointing=checkpointing, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[StepRecorder(out_dir)])
    trainer.train()


if __name__ == "__main__":
    main()
