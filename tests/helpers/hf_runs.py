"""Plain HF Trainer runs of the bert-tiny fixture, as the predictor's tests describe them."""

from pathlib import Path

from m3lab.config import TrainConfig

BERT_TINY = Path(__file__).resolve().parent.parent / "fixtures" / "bert-tiny-config.json"


def hf_run(model=BERT_TINY, batch_size: int = 1, seq_len: int = 512, precision: str = "fp32", **changes) -> TrainConfig:
    """HF Trainer fine-tuning a sequence classifier: no DeepSpeed unless ``changes`` say so."""
    return TrainConfig(trainer="hf", model=str(model), per_device_train_batch_size=batch_size, seq_len=seq_len,
                       fp16=precision == "fp16", bf16=precision == "bf16",
                       **{"deepspeed_stage": None, "max_steps": 10, **changes})
