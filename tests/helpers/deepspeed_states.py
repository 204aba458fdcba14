"""Build FlagEmbedding's M3 model at a given geometry with REAL tensors, wrap it in the real
DeepSpeed engine (gloo, this process is rank RANK of WORLD_SIZE), take one step and print, as
JSON into OUT_DIR/rank-N.json, the bytes DeepSpeed holds: parameters, optimizer state, fp32
master copies; with a 4th argument "offload", the optimizer is offloaded to the CPU. (One file per rank: two ranks printing at once interleave their lines.)

Run under torchrun (tests/test_memory.py does); used to check the predictor's model states.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    import deepspeed
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from transformers import AutoModel

    from m3lab.config import TrainConfig
    from m3lab.predict import load_model_config
    from m3lab.predict.models import FakeTokenizer
    from m3lab.tensors import fp32_master_tensors, optimizer_state_tensors, tensor_bytes

    model_config = load_model_config(sys.argv[1])
    stage = int(sys.argv[2])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    encoder = AutoModel.from_config(model_config)
    hidden = model_config.hidden_size
    model = EncoderOnlyEmbedderM3Model(
        {"model": encoder, "colbert_linear": torch.nn.Linear(hidden, hidden), "sparse_linear": torch.nn.Linear(hidden, 1)},
        tokenizer=FakeTokenizer(), temperature=0.02, sub_batch_size=None, normalize_embeddings=True,
        unified_finetuning=True)
    world = dist.get_world_size()
    offload = len(sys.argv) > 4 and sys.argv[4] == "offload"
    ds = TrainConfig(deepspeed_stage=stage, per_device_train_batch_size=1, num_processes=world,
                     offload_optimizer=offload).deepspeed_config()
    ds["optimizer"]["params"] = {"lr": 1e-5, "torch_adam": True}
    ds["gradient_clipping"] = 1.0
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    features = {"input_ids": torch.randint(5, 100, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    passages = {"input_ids": torch.randint(5, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    loss = engine(queries=features, passages=passages).loss
    engine.backward(loss)
    engine.step()
    out = Path(sys.argv[3]) / f"rank-{dist.get_rank()}.json"
    out.write_text(json.dumps({"rank": dist.get_rank(),
                      "weights": tensor_bytes(model.parameters()),
                      "optimizer_states": tensor_bytes(optimizer_state_tensors(engine.optimizer)
                                                       + fp32_master_tensors(engine.optimizer))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
