"""The host RAM a run needs (m3lab.predict.host): the fp32 weights as loaded, counted; DeepSpeed's
offloaded optimizer, traced and split between processes; the processes themselves, estimated."""

import pytest

from m3lab.config import TrainConfig
from m3lab.predict import predict
from m3lab.predict.host import LAUNCHER_BYTES, PROCESS_BYTES

BGE_M3_PARAMS = 568e6  # BAAI/bge-m3's model card


@pytest.mark.slow
def test_without_offload_the_host_holds_the_fp32_weights_as_loaded():
    report = predict(TrainConfig.common_t4_advice(deepspeed_stage=None), "t4")
    host = report.host
    assert host.processes == 1 and host.offloaded_peak_bytes == 0 == report.host_peak_bytes
    assert host.weights_load_bytes == pytest.approx(4 * BGE_M3_PARAMS, rel=0.01)
    assert host.total_bytes == PROCESS_BYTES + host.weights_load_bytes + LAUNCHER_BYTES
    assert "estimated" in host.describe() and report.to_json()["host_total_bytes"] == host.total_bytes


@pytest.mark.slow
def test_offloaded_optimizer_is_split_between_processes():
    one = predict(TrainConfig.common_t4_advice(offload_optimizer=True), "t4").host
    two = predict(TrainConfig.common_t4_advice(offload_optimizer=True, num_processes=2), "t4x2").host
    # fp32 masters and Adam's two moments (12 bytes a parameter) at least, more than the weights as loaded
    assert one.offloaded_peak_bytes > 12 * BGE_M3_PARAMS > one.weights_load_bytes
    assert two.processes == 2
    assert two.offloaded_peak_bytes == pytest.approx(one.offloaded_peak_bytes / 2, rel=0.05)  # ZeRO partitions
    assert two.total_bytes == 2 * (PROCESS_BYTES + two.offloaded_peak_bytes) + LAUNCHER_BYTES
