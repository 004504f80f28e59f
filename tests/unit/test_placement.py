"""plan_placements: one GPU per GPU worker, CPU fallback, fail-fast with a useful message."""

from __future__ import annotations

from typing import Any

import pytest

from haif.config import ModelConfig
from haif.exceptions import GpuUnavailable
from haif.orchestrator.placement import Placement, plan_placements

pytestmark = pytest.mark.unit


def model(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, runtime="echo", **kw)


def test_gpu_model_gets_one_gpu_per_worker() -> None:
    plans = plan_placements([model("g", device="gpu", workers=2, num_cpus=0.5)], cluster_gpus=2)
    plan = plans["g"]
    assert isinstance(plan, Placement)
    assert plan.use_gpu is True
    assert plan.fell_back_to_cpu is False
    options = plan.actor_options(max_concurrency=64)
    assert options["num_gpus"] == 1
    assert options["num_cpus"] == 0.5
    assert options["max_concurrency"] == 64
    assert options["max_restarts"] == 0


def test_cpu_placement_reserves_no_gpu() -> None:
    plan = plan_placements([model("c", device="cpu")], cluster_gpus=4)["c"]
    assert isinstance(plan, Placement)
    assert plan.use_gpu is False
    assert plan.actor_options(8)["num_gpus"] == 0


def test_gpu_without_gpus_fails_fast_with_a_useful_message() -> None:
    plan = plan_placements([model("gpu-hungry", device="gpu")], cluster_gpus=0)["gpu-hungry"]
    assert isinstance(plan, GpuUnavailable)
    assert "'gpu-hungry'" in plan.message
    assert "allow_cpu_fallback" in plan.message
    assert plan.status_code == 503
    assert plan.code == "gpu_unavailable"


def test_gpu_with_fallback_runs_on_cpu() -> None:
    plan = plan_placements([model("f", device="gpu", allow_cpu_fallback=True)], cluster_gpus=0)["f"]
    assert isinstance(plan, Placement)
    assert plan.use_gpu is False
    assert plan.fell_back_to_cpu is True
    assert plan.actor_options(1)["num_gpus"] == 0


def test_too_few_gpus_for_all_workers_fails() -> None:
    plan = plan_placements([model("g", device="gpu", workers=3)], cluster_gpus=2)["g"]
    assert isinstance(plan, GpuUnavailable)
    assert "3 GPU worker(s)" in plan.message
    assert "2 free GPU(s) of 2" in plan.message


@pytest.mark.parametrize(("gpus", "use_gpu"), [(0, False), (1, True), (0.5, False)])
def test_device_auto(gpus: float, use_gpu: bool) -> None:
    plan = plan_placements([model("a", device="auto")], cluster_gpus=gpus)["a"]
    assert isinstance(plan, Placement)
    assert plan.use_gpu is use_gpu
    assert plan.fell_back_to_cpu is False


def test_gpus_handed_out_in_config_order() -> None:
    # The integration layout: 2 GPUs, gpu-echo takes both, the next two find none.
    models = [
        model("echo", device="cpu", workers=2),
        model("gpu-echo", device="gpu", workers=2),
        model("gpu-fallback", device="gpu", allow_cpu_fallback=True),
        model("gpu-hungry", device="gpu"),
        model("auto", device="auto"),
    ]
    plans = plan_placements(models, cluster_gpus=2)
    assert list(plans) == ["echo", "gpu-echo", "gpu-fallback", "gpu-hungry", "auto"]
    assert plans["echo"].use_gpu is False
    assert plans["gpu-echo"].use_gpu is True
    assert plans["gpu-fallback"].fell_back_to_cpu is True
    assert isinstance(plans["gpu-hungry"], GpuUnavailable)
    assert "0 free GPU(s) of 2" in plans["gpu-hungry"].message
    assert plans["auto"].use_gpu is False


def test_earlier_model_wins_the_gpu() -> None:
    first = plan_placements([model("a", device="gpu"), model("b", device="auto")], cluster_gpus=1)
    assert first["a"].use_gpu is True and first["b"].use_gpu is False
    second = plan_placements([model("b", device="auto"), model("a", device="gpu")], cluster_gpus=1)
    assert second["b"].use_gpu is True
    assert isinstance(second["a"], GpuUnavailable)


def test_disabled_models_are_skipped_and_take_no_gpu() -> None:
    plans = plan_placements(
        [model("off", device="gpu", enabled=False), model("on", device="gpu")], cluster_gpus=1
    )
    assert "off" not in plans
    assert plans["on"].use_gpu is True


def test_tensor_parallel_vllm_worker_reserves_a_placement_group() -> None:
    model = ModelConfig(name="big", runtime="vllm", path="/m", device="gpu", workers=2,
                        engine={"tensor_parallel_size": 2})
    plans = plan_placements([model], cluster_gpus=4)
    plan = plans["big"]
    assert plan.gpus_per_worker == 2 and plan.needs_placement_group
    assert plan.placement_group_bundles() == [{"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1}]
    # The bundles hold the GPUs; the worker actor itself takes none.
    assert plan.actor_options(8)["num_gpus"] == 0


def test_tensor_parallel_counts_every_gpu_of_every_worker() -> None:
    model = ModelConfig(name="big", runtime="vllm", path="/m", device="gpu", workers=2,
                        engine={"tensor_parallel_size": 2})
    err = plan_placements([model], cluster_gpus=3)["big"]
    assert "2 GPU(s) each" in err.message


def test_gpus_are_counted_for_every_region_and_dedicated_pool() -> None:
    from haif.config import HaifConfig

    config = HaifConfig.model_validate({
        "regions": [{"name": "a"}, {"name": "b"}],
        "models": [{"name": "g", "runtime": "echo", "device": "gpu", "regions": ["a", "b"],
                    "dedicated_tenants": ["acme"]}],
    })
    assert config.total_workers(config.models[0]) == 4
    assert plan_placements(config.models, 4, config.total_workers)["g"].use_gpu
    refused = plan_placements(config.models, 3, config.total_workers)["g"]
    assert "4 GPU worker(s)" in refused.message
