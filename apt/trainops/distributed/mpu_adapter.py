"""Megatron-core's parallel_state under the names DeepSpeed's ``mpu`` argument expects.

DeepSpeed reads the model-parallel group (for gradient-norm reductions) and the data-parallel
group (what ZeRO shards over) from ``mpu``; ``parallel_state`` has no
``get_model_parallel_world_size``, so it cannot be passed as is (FEASIBILITY.md)."""
from megatron.core import parallel_state as ps


class MegatronMPU:
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        ps.get_pipeline_model_parallel_world_size)

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return (ps.get_tensor_model_parallel_world_size()
                * ps.get_pipeline_model_parallel_world_size())

    @staticmethod
    def get_model_parallel_rank() -> int:
        return ps.get_model_parallel_group().rank()
