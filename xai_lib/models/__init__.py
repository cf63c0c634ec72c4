"""Stage-1 detector model (SSL front end + Conformer-TCM back end) and its checkpoints."""
from xai_lib.models.checkpoint import (
    CheckpointError,
    LoadReport,
    atomic_torch_save,
    average_state_dicts,
    fairseq_to_hf_key,
    hf_to_fairseq_key,
    load_detector,
    safe_torch_load,
    save_detector,
)
from xai_lib.models.detector import (
    BackendOutput,
    Detector,
    DetectorBackEnd,
    DetectorOutput,
    PretrainedNotFoundError,
    build_ssl,
    ssl_config_dict,
)

__all__ = [
    "Detector",
    "DetectorBackEnd",
    "DetectorOutput",
    "BackendOutput",
    "PretrainedNotFoundError",
    "build_ssl",
    "ssl_config_dict",
    "load_detector",
    "save_detector",
    "average_state_dicts",
    "atomic_torch_save",
    "safe_torch_load",
    "fairseq_to_hf_key",
    "hf_to_fairseq_key",
    "CheckpointError",
    "LoadReport",
]
