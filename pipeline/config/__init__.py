"""The config: a torch-free leaf (schema with its checks, loader, recipes, what each key re-runs)."""
from pipeline.config.loader import GROUPS, PRESETS, load_config, presets, to_yaml, valid_keys
from pipeline.config.schema import (
                                    STAGES,
                                    Config,
                                    DataConfig,
                                    EvalConfig,
                                    ExportConfig,
                                    LossConfig,
                                    ModelConfig,
                                    ParallelConfig,
                                    TrackConfig,
                                    TrainConfig,
)

__all__ = ["GROUPS", "PRESETS", "STAGES", "Config", "DataConfig", "EvalConfig", "ExportConfig", "LossConfig",
           "ModelConfig", "ParallelConfig", "TrackConfig", "TrainConfig", "load_config", "presets", "to_yaml",
           "valid_keys"]
