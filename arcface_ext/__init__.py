"""arcface_ext: fused margin-based softmax losses (ArcFace, CosFace, SphereFace and their combined
form, with per-sample margins for AdaFace, ElasticFace and MagFace) for face-recognition training, computed
without ever holding the N x C logit matrix; sub-center ArcFace, CurricularFace and Partial FC's
inter-class filtering on a chunked PyTorch path (``arcface_ext.chunked``); SGD and AdamW without
torch's parameter-sized temporaries (``arcface_ext.optim``)."""
from . import optim, reference
from .functional import (combined_margin_loss, extension_available, get_workspace_bytes,
                         set_workspace_bytes)
from .modules import (AdaFaceLoss, ArcFaceLoss, CombinedMarginLoss, CosFaceLoss, CurricularFaceLoss, ElasticFaceLoss,
                      MagFaceLoss, SphereFaceLoss)
from .distributed import (ShardedAdaFaceLoss, ShardedCombinedMarginLoss, ShardedCurricularFaceLoss,
                          ShardedElasticFaceLoss, ShardedSubCenterMarginLoss, class_shard, ddp_ignore_shards,
                          full_state_dict, shard_optimizer_state)
from .sampling import sample_classes, sample_size
from .subcenter import SubCenterMarginLoss, subcenter_margin_loss
from .chunked import chunked_margin_loss

__all__ = [
    "combined_margin_loss", "reference", "optim", "CombinedMarginLoss", "ArcFaceLoss", "CosFaceLoss",
    "SphereFaceLoss", "AdaFaceLoss", "ElasticFaceLoss", "MagFaceLoss", "ShardedCombinedMarginLoss",
    "ShardedAdaFaceLoss",
    "ShardedElasticFaceLoss", "class_shard", "ddp_ignore_shards", "sample_classes", "sample_size",
    "set_workspace_bytes", "get_workspace_bytes", "extension_available", "SubCenterMarginLoss",
    "subcenter_margin_loss", "CurricularFaceLoss", "chunked_margin_loss", "ShardedCurricularFaceLoss",
    "ShardedSubCenterMarginLoss", "full_state_dict", "shard_optimizer_state",
]
__version__ = "0.1.0"
