"""A test plugin that asks for several GPUs (loaded through WEIGHTSMITH_PLUGINS): the
scheduler must give it that many at once, in CUDA_VISIBLE_DEVICES."""

from pydantic import Field

from plugins import Plugin, Resources
from tests.plugins_for_tests import SleepConfig, sleep_run


class MultiGpuSleepConfig(SleepConfig):
    gpus: int = Field(2, ge=1, le=8, description="GPUs the job holds.")


def multi_gpu_resources(config: MultiGpuSleepConfig) -> Resources:
    requires = ("gpus", f"got {config.gpus}; the job needs {config.gpus} GPUs") \
        if config.gpus > 1 else None
    return Resources(gpus=config.gpus, requires_gpu=requires)


MULTI_GPU_SLEEPER = Plugin(name="test_multi_gpu_sleep", title="Sleep on several GPUs",
                           description="Sleeps holding gpus GPUs.", Config=MultiGpuSleepConfig,
                           run=sleep_run, resources=multi_gpu_resources)
