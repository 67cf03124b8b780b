"""SAK for Hugging Face: a multi-task vision student distilled from a committee of vision foundation models."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_sak import SAKConfig
from .image_processing_sak import SAKImageProcessor
from .modeling_sak import SAKForMultiTask, SAKMultiTaskOutput, SAKPreTrainedModel


AutoConfig.register("sak", SAKConfig, exist_ok=True)
AutoModel.register(SAKConfig, SAKForMultiTask, exist_ok=True)
AutoImageProcessor.register(SAKConfig, image_processor_classes={"pil": SAKImageProcessor}, exist_ok=True)
# Saving writes the code files and `auto_map`, so checkpoints load with trust_remote_code where this package is absent.
SAKConfig.register_for_auto_class()
SAKForMultiTask.register_for_auto_class("AutoModel")
SAKImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["SAKConfig", "SAKForMultiTask", "SAKImageProcessor", "SAKMultiTaskOutput", "SAKPreTrainedModel"]
