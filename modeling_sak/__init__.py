"""SAK for Hugging Face: a multi-task vision student distilled from a committee of vision foundation models."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForSemanticSegmentation,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .remote_code.configuration_sak import SAKConfig
from .remote_code.image_processing_sak import SAKImageProcessor
from .remote_code.modeling_sak import (
    SAKForDepthEstimation,
    SAKForMultiTask,
    SAKForSemanticSegmentation,
    SAKMultiTaskOutput,
    SAKPreTrainedModel,
)
from .remote_code.pipeline_sak import PIPELINE_TASK, SAKMultiTaskPipeline


AutoConfig.register("sak", SAKConfig, exist_ok=True)
AutoModel.register(SAKConfig, SAKForMultiTask, exist_ok=True)
AutoModelForSemanticSegmentation.register(SAKConfig, SAKForSemanticSegmentation, exist_ok=True)
AutoModelForDepthEstimation.register(SAKConfig, SAKForDepthEstimation, exist_ok=True)
AutoImageProcessor.register(SAKConfig, image_processor_classes={"pil": SAKImageProcessor}, exist_ok=True)
# Saving writes the code files and `auto_map`, so checkpoints load with trust_remote_code where this package is absent.
SAKConfig.register_for_auto_class()
SAKForMultiTask.register_for_auto_class("AutoModel")
SAKForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
SAKForDepthEstimation.register_for_auto_class("AutoModelForDepthEstimation")
SAKImageProcessor.register_for_auto_class("AutoImageProcessor")
# pipeline("sak-multi-task", ...) in this process; saved checkpoints name it in `custom_pipelines` for remote code.
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=SAKMultiTaskPipeline, pt_model=AutoModel, type="image"
)

__all__ = [
    "SAKConfig",
    "SAKForDepthEstimation",
    "SAKForMultiTask",
    "SAKForSemanticSegmentation",
    "SAKImageProcessor",
    "SAKMultiTaskOutput",
    "SAKMultiTaskPipeline",
    "SAKPreTrainedModel",
]
