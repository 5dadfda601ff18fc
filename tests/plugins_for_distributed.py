"""A test plugin that asks for several GPUs (loaded through WEIGHTSMITH_PLUGINS): the
scheduler must give it that many at once, in CUDA_VISIBLE_DEVICES."""

from pydantic import Field

from plugins import Plugin
from tests.plugins_for_tests import SleepConfig, sleep_run


class MultiGpuSleepConfig(SleepConfig):
    gpus: int = Field(2, ge=1, le=8, description="GPUs the job holds.")

    def gpu_requirement(self):
        return ("gpus", f"got {self.gpus}; the job needs {self.gpus} GPUs") if self.gpus > 1 \
            else None

    def gpu_count(self) -> int:
        return self.gpus


MULTI_GPU_SLEEPER = Plugin(name="test_multi_gpu_sleep", title="Sleep on several GPUs",
                           description="Sleeps holding gpus GPUs.", Config=MultiGpuSleepConfig,
                           run=sleep_run)
